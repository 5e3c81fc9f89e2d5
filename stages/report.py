"""Stage ``report``: ``reports/index.html``, one offline page of what the pipeline measured and made.

The library is ``pipeline/report.py``; this module runs it at the repository root (DVC's
working directory) inside the stage's MLflow run, and logs every metric and the page with its
media to the pipeline state's parent run. The page links the media of ``reports/<ds>/``
relatively and fetches nothing.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline.cli import run_stage
from pipeline.config import flatten
from pipeline.paths import DATASETS
from pipeline.report import INDEX, REPORTS, ReportError, metrics_files, read_json, run
from pipeline.tracking import stage_run

log = logging.getLogger(__name__)


def main() -> None:
    with stage_run("report") as r:
        try:
            path = run(Path("."))
        except ReportError as exc:
            raise SystemExit(f"error: {exc}") from exc
        log.info("wrote %s", path)
        # the pipeline state's parent run gets every metric (``<metrics file>.<key>``) and the page
        # with its media, laid out as in reports/ so that its relative links hold
        log_to_parent(r.mlflow, {f.stem: read_json(f) for f in metrics_files()},
                      {"report": INDEX, **{f"report/{ds}": REPORTS / ds for ds in DATASETS}})


def log_to_parent(mlflow, metrics: dict, files: dict[str, Path]) -> None:
    """Log to the active stage run's parent (the pipeline state's run, which already holds all of
    params.yaml flattened): ``metrics`` flattened to dotted keys (numbers only) and ``files``
    ({artifact path: file or directory})."""
    from mlflow.entities import Metric

    parent = mlflow.active_run().data.tags["mlflow.parentRunId"]
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    clean = [Metric(k.replace("@", "_"), float(v), now, 0) for k, v in flatten(metrics).items()
             if isinstance(v, (int, float)) and v == v]  # bools count as 0/1; NaN and strings skipped
    for s in range(0, len(clean), 1000):
        client.log_batch(parent, metrics=clean[s : s + 1000])
    for artifact_path, f in files.items():
        if Path(f).is_dir():
            client.log_artifacts(parent, str(f), artifact_path=artifact_path)
        else:
            client.log_artifact(parent, str(f), artifact_path=artifact_path)


if __name__ == "__main__":
    run_stage(main)
