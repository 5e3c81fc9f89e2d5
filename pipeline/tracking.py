"""MLflow tracking shared by every stage: one parent run per pipeline state, one nested run per stage.

The default store is a SQLite database at the repository root (``mlflow.db``), its path made
absolute from the repository root so that ``dvc exp run --temp`` logs to the same place;
``MLFLOW_TRACKING_URI`` overrides it.

The tree. Every stage run (named after the stage: ``tokenizer@mnist``) is nested under a parent
run that stands for one pipeline state, whose key (tag ``pipeline.key``) is the git commit, a
hash of ``params.yaml``'s content (parsed, key-sorted JSON; tag ``params_hash``), a hash of the
uncommitted code changes if any (``git diff HEAD`` of ``*.py`` and ``dvc.yaml``; tag
``code_diff_hash``) and, under ``dvc exp run``, the experiment's name (DVC's ``DVC_EXP_NAME``; tag
``dvc.exp_name``). The first stage of a state creates the parent (named after the experiment, else
``pipeline@<commit>-<params hash>``, plus ``-code-<hash>`` when the code differs from the commit)
with all of ``params.yaml`` as its params; later stages, in other processes, find it by that tag.
Stages that start at once make one parent: the search and creation hold a lock file next to a
SQLite store (``mlflow.db.lock``), and on any store the earliest parent with the key wins (a
duplicate is deleted). A ``dvc repro`` that runs nothing logs nothing.

Each stage run holds: its own params section unprefixed (as ``dvc.yaml`` gives it to the stage);
under ``params.<section>`` the params sections that ``dvc.yaml`` lists for the stage and for every
stage upstream of it; tags ``inputs.<path>`` = the md5 that ``dvc.lock`` records for each data
dependency produced by an upstream stage (read when the stage starts: the upstream stages have
finished, so these are the md5s of what it reads; ``inputs.source`` says so); the tags ``stage``,
``item``, ``git_commit``; its metrics; and, for the model stages, the model as it is on disk
under artifact ``model/`` (``model.pt`` is a state dict of tensors, plus the ``<family>.json``
that says which class and config load it).

In the MLflow UI (``mlflow ui --backend-store-uri sqlite:///mlflow.db``), click the experiment
(``world-models``): in the runs table (table view) each parent run has an expand arrow left of
its name that opens its stage runs: one tree per pipeline state. To compare two experiments by
their parents, type ``tags.`pipeline.parent` = 'true'`` in the search box (only the parents
remain: ``dvc exp run``'s named after their experiments, the others ``pipeline@...``), tick two
of them and click "Compare": their params are all of ``params.yaml`` (turn on "Show diff only" to
see just the params that differ). For metrics, expand both parents, tick their two stage runs of
the same name (``evaluate@mnist``) and "Compare".
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import yaml

from pipeline.config import StrictModel, dig, flatten, params_path, read_params
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

    def log_model(self, out_dir: Path | str) -> None:
        """A model stage's output directory (``model.pt``, a state dict, and ``<family>.json``)
        under artifact ``model/``."""
        self.log_artifact(out_dir, "model")

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


PARAM_BATCH = 100     # MLflow's most params per log_batch
PARAM_VALUE_MAX = 6000


def _log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:PARAM_VALUE_MAX]) for k, v in params.items()]
    for i in range(0, len(items), PARAM_BATCH):
        client.log_batch(run_id, params=items[i : i + PARAM_BATCH])


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def params_hash(params: dict | None = None) -> str:
    """The first 12 hex digits of the sha256 of ``params.yaml``'s content (parsed, as key-sorted
    JSON: a reformatting by ``dvc exp run -S`` does not change it)."""
    params = _read_yaml(params_path()) if params is None else params
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


def code_diff_hash() -> str:
    """The first 12 hex digits of the sha256 of ``git diff HEAD`` of the code (``*.py``,
    ``dvc.yaml``): uncommitted code changes, "" when there are none (or no git)."""
    try:
        out = subprocess.run(["git", "diff", "HEAD", "--", "*.py", "dvc.yaml"], capture_output=True,
                             check=True, timeout=30).stdout
    except Exception:
        return ""
    return hashlib.sha256(out).hexdigest()[:12] if out else ""


def pipeline_key(commit: str, phash: str, exp_name: str | None, code: str = "") -> str:
    return f"{commit}:{phash}" + (f":code-{code}" if code else "") + (f":{exp_name}" if exp_name else "")


def dvc_stages(dvc_yaml: Path = Path("dvc.yaml")) -> dict[str, dict[str, list]]:
    """The stages of ``dvc.yaml``, ``foreach`` expanded (``${item}`` substituted), by address
    (``tokenizer@mnist``): ``{"deps": [...], "outs": [...], "params": [...]}`` (params: the
    keys read from ``params.yaml``)."""
    def names(entries: Any) -> list[str]:
        out = []
        for e in entries or []:
            out.extend([e] if isinstance(e, str) else list(e))
        return out

    def params(entries: Any) -> list[str]:
        out = []
        for e in entries or []:
            if isinstance(e, str):
                out.append(e)
            elif isinstance(e, dict):
                for file, keys in e.items():
                    if file == "params.yaml" and isinstance(keys, list):
                        out.extend(keys)
        return out

    def expand(body: dict, item: Any) -> dict[str, list]:
        sub = lambda x: x.replace("${item}", str(item)) if item is not None else x  # noqa: E731
        return {
            "deps": [sub(d) for d in names(body.get("deps"))],
            "outs": [sub(o) for k in ("outs", "metrics", "plots") for o in names(body.get(k))],
            "params": [sub(q) for q in params(body.get("params"))],
        }

    stages: dict[str, dict[str, list]] = {}
    for name, body in (_read_yaml(dvc_yaml).get("stages") or {}).items():
        if isinstance(body, dict) and "foreach" in body and isinstance(body["foreach"], list):
            for item in body["foreach"]:
                stages[f"{name}@{item}"] = expand(body.get("do") or {}, item)
        elif isinstance(body, dict):
            stages[name] = expand(body, None)
    return stages


def _under(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def upstream(stages: dict[str, dict[str, list]], address: str) -> list[str]:
    """The stages whose outputs ``address`` reads, directly or through others (sorted)."""
    seen: set[str] = set()
    todo = [address]
    while todo:
        deps = stages.get(todo.pop(), {}).get("deps", [])
        for name, body in stages.items():
            if name not in seen and name != address and any(_under(d, o) for d in deps for o in body["outs"]):
                seen.add(name)
                todo.append(name)
    return sorted(seen)


def stage_lineage(address: str, params: dict) -> tuple[dict[str, Any], dict[str, str]]:
    """For the stage at ``address``: the params sections ``dvc.yaml`` lists for it and every stage
    upstream, flattened under ``params.<section>``; and tags ``inputs.<path>`` = the md5
    ``dvc.lock`` records for each of its deps that an upstream stage wrote."""
    stages = dvc_stages()
    if address not in stages:
        return {}, {}
    flat: dict[str, Any] = {}
    for name in [address, *upstream(stages, address)]:
        for section in stages[name]["params"]:
            value = dig(params, section)
            if isinstance(value, dict):
                flat.update(flatten(value, f"params.{section}."))
            elif value is not None:
                flat[f"params.{section}"] = value
    outs = {}
    for body in (_read_yaml(Path("dvc.lock")).get("stages") or {}).values():
        for out in body.get("outs") or []:
            if isinstance(out, dict) and "path" in out and "md5" in out:
                outs[out["path"].rstrip("/")] = out["md5"]
    inputs = {f"inputs.{d}": outs[d.rstrip("/")] for d in stages[address]["deps"] if d.rstrip("/") in outs}
    if inputs:
        inputs["inputs.source"] = "dvc.lock: the md5 of each upstream output, read when the stage started"
    return flat, inputs


def parent_run(client: Any, experiment_id: str, uri: str, params: dict) -> str:
    """The id of the parent run of this pipeline state, found by tag ``pipeline.key`` or created."""
    from mlflow.entities import RunStatus

    commit, phash, exp = git_commit(), params_hash(params), os.environ.get("DVC_EXP_NAME") or None
    code = code_diff_hash()
    key = pipeline_key(commit, phash, exp, code)
    filt = f"tags.`pipeline.key` = '{key}'"

    def found() -> list:
        runs = client.search_runs([experiment_id], filter_string=filt, max_results=50)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    with _store_lock(uri):
        runs = found()
        if runs:
            return runs[0].info.run_id
        name = exp or f"pipeline@{commit[:7]}-{phash[:8]}" + (f"-code-{code[:6]}" if code else "")
        tags = {"pipeline.key": key, "pipeline.parent": "true", "git_commit": commit, "params_hash": phash,
                "code_diff_hash": code, "mlflow.source.git.commit": commit, "dvc.exp_name": exp or ""}
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        _log_params(client, run.info.run_id, flatten(params))
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED))
        mine = run.info.run_id
        runs = found()
    winner = runs[0].info.run_id if runs else mine  # another store's racer may have made one too
    if winner != mine:
        client.delete_run(mine)
    return winner


@contextlib.contextmanager
def stage_run(stage: str, item: str | None = None, params: Any = None) -> Iterator[StageRun]:
    """Open an MLflow run for a stage, nested under its pipeline state's parent run; log its
    params, its upstream params and input md5s, and the git commit; close it on exit."""
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with _store_lock(uri):  # the first use creates and migrates the store: one process at a time
        experiment = mlflow.set_experiment(experiment_name())
    client = mlflow.MlflowClient(uri)
    all_params = _read_yaml(params_path())
    parent = parent_run(client, experiment.experiment_id, uri, all_params)
    name = run_name(stage, item)
    lineage, inputs = stage_lineage(name, all_params)
    commit = git_commit()
    tags = {"stage": stage, "item": item or "", "git_commit": commit, "mlflow.source.git.commit": commit,
            "mlflow.parentRunId": parent, **inputs}
    with mlflow.start_run(run_name=name, tags=tags) as run:
        flat = dict(flatten(params)) if params is not None else {}
        flat.update(lineage)
        if flat:
            _log_params(client, run.info.run_id, flat)
        log.info("MLflow run %s (%s, parent %s) at %s", name, run.info.run_id, parent, uri)
        yield StageRun(mlflow)
