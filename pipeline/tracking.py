"""MLflow tracking shared by every stage: one run per stage (and foreach item).

The default store is a SQLite database at the repository root (``mlflow.db``), its path made
absolute from the repository root so that ``dvc exp run --temp`` logs to the same place;
``MLFLOW_TRACKING_URI`` overrides it. Runs are named after the stage (``actions@gameplay``) and
tagged with the git commit.
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

from pipeline.config import StrictModel, flatten, params_path, read_params
from pipeline.paths import repo_root

EXPERIMENT = "world-models"
log = logging.getLogger(__name__)


def tracking_uri() -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(repo_root() / 'mlflow.db').resolve()}"


class MlflowConfig(StrictModel):
    """The ``mlflow`` section of params.yaml."""

    experiment: str = EXPERIMENT


def experiment_name() -> str:
    """``MLFLOW_EXPERIMENT_NAME``, else params' ``mlflow.experiment``, else the default."""
    env = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if env:
        return env
    if params_path().exists():
        return MlflowConfig.model_validate(read_params().get("mlflow") or {}).experiment
    return EXPERIMENT


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except Exception:  # no git, or no commit yet
        return "unknown"


def run_name(stage: str, item: str | None = None) -> str:
    return stage if item is None else f"{stage}@{item}"


class StageRun:
    """Thin handle over the active MLflow run."""

    def __init__(self, mlflow_mod: Any):
        self.mlflow = mlflow_mod

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        clean = {}
        for k, v in flatten(metrics).items():
            if isinstance(v, bool):
                v = float(v)
            if isinstance(v, (int, float)) and v == v:  # skip NaN and non-numbers
                clean[k.replace("@", "_")] = float(v)
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        elif path.exists():
            self.mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dict(self, d: dict, name: str) -> None:
        self.mlflow.log_dict(d, name)

    def log_image(self, image: Any, name: str) -> None:
        self.mlflow.log_image(image, name)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.mlflow.set_tags({k: str(v) for k, v in tags.items()})


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock on a SQLite tracking store (``<db>.lock``, fcntl) while it is opened.

    Stages that start at once (``python -m pipeline.dag --concurrency 2``) would otherwise both
    create and migrate a new ``mlflow.db`` and one fails ("Online migration expected to match one
    row"). Other stores need no lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock_path = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def stage_run(stage: str, item: str | None = None, params: Any = None) -> Iterator[StageRun]:
    """Open an MLflow run for a stage, log its params and the git commit; close it on exit."""
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with _store_lock(uri):  # the first use creates and migrates the store: one process at a time
        mlflow.set_experiment(experiment_name())
    name = run_name(stage, item)
    with mlflow.start_run(run_name=name) as run:
        mlflow.set_tags(
            {"stage": stage, "item": item or "", "git_commit": git_commit(), "mlflow.source.git.commit": git_commit()}
        )
        if params is not None:
            flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
            if flat:
                mlflow.log_params(flat)
        log.info("MLflow run %s (%s) at %s", name, run.info.run_id, tracking_uri())
        yield StageRun(mlflow)
