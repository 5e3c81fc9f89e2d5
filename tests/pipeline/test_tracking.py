"""MLflow tracking: a real SQLite store, runs named after the stage, params, metrics, commit tag,
each stage run nested under one parent run per pipeline state (commit, params hash, DVC experiment)."""

from pathlib import Path

import mlflow
import yaml

from pipeline.paths import repo_root
from pipeline.tracking import stage_run, tracking_uri

# A two-stage DAG: `actions@gameplay` reads `frames`'s output.
DVC_YAML = {"stages": {
    "frames": {"cmd": "x", "deps": ["stages/frames.py"], "params": ["frames", "store"],
               "outs": ["data/gameplay/frames.zarr"]},
    "actions": {"foreach": ["mnist", "gameplay"], "do": {
        "cmd": "x", "deps": ["stages/actions.py", "data/${item}/frames.zarr"],
        "params": ["actions.${item}"], "outs": ["data/${item}/actions.zarr"]}},
}}
PARAMS = {"store": {"chunk": 16}, "frames": {"fps": 10},
          "actions": {"mnist": {"k": 1}, "gameplay": {"method": "phase_correlation", "nested": {"k": 3}}}}
LOCK = {"schema": "2.0", "stages": {"frames": {"cmd": "x", "outs": [
    {"path": "data/gameplay/frames.zarr", "hash": "md5", "md5": "abc.dir"}]}}}


def _dag(tmp_path: Path, params: dict = PARAMS) -> None:
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(LOCK))


def _store(tmp_path: Path, monkeypatch, experiment: str) -> str:
    """A SQLite store and experiment in ``tmp_path`` (the cwd, holding the two-stage DAG), outside
    any DVC experiment; returns the store's URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    _dag(tmp_path)
    return uri


def test_stage_run_logs_to_sqlite(tmp_path, monkeypatch):
    uri = _store(tmp_path, monkeypatch, "test-exp")
    art = tmp_path / "note.txt"
    art.write_text("hello")
    with stage_run("actions", "gameplay", {"method": "phase_correlation", "nested": {"k": 3}}) as r:
        r.log_metrics({"accuracy": 0.95, "confusion": {"a": 1}, "collapsed": False, "label": "x"})
        r.log_artifact(art)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("test-exp")
    run, parent = sorted(client.search_runs([exp.experiment_id]), key=lambda r: "pipeline.key" in r.data.tags)
    assert run.info.run_name == "actions@gameplay"
    # its own section unprefixed; under params. the sections of it and of every stage upstream
    assert run.data.params == {"method": "phase_correlation", "nested.k": "3",
                               "params.actions.gameplay.method": "phase_correlation",
                               "params.actions.gameplay.nested.k": "3",
                               "params.frames.fps": "10", "params.store.chunk": "16"}
    assert run.data.metrics == {"accuracy": 0.95, "confusion.a": 1.0, "collapsed": 0.0}
    assert run.data.tags["stage"] == "actions" and run.data.tags["item"] == "gameplay"
    assert run.data.tags["inputs.data/gameplay/frames.zarr"] == "abc.dir"  # upstream out's md5 in dvc.lock
    assert "git_commit" in run.data.tags
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
    # the parent: the pipeline state, all of params.yaml
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.run_name.startswith("pipeline@")
    assert parent.data.params["actions.mnist.k"] == "1" and len(parent.data.params) == 5
    assert parent.data.tags["pipeline.key"].startswith(parent.data.tags["git_commit"] + ":")


def test_one_parent_per_pipeline_state(tmp_path, monkeypatch):
    """Stages of one state share a parent; a params change or a DVC experiment makes another."""
    uri = _store(tmp_path, monkeypatch, "tree")
    for item in ("mnist", "gameplay"):
        with stage_run("actions", item):
            pass
    _dag(tmp_path, {**PARAMS, "frames": {"fps": 12}})
    with stage_run("frames"):
        pass
    monkeypatch.setenv("DVC_EXP_NAME", "sunny-dove")
    with stage_run("frames"):
        pass
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("tree")
    runs = client.search_runs([exp.experiment_id])
    parents = {r.info.run_id: r for r in runs if "pipeline.key" in r.data.tags}
    tree = {}
    for r in runs:
        if r.info.run_id not in parents:
            tree.setdefault(parents[r.data.tags["mlflow.parentRunId"]].info.run_name, []).append(r.info.run_name)
    assert len(parents) == 3
    assert sorted(map(sorted, tree.values())) == [["actions@gameplay", "actions@mnist"], ["frames"], ["frames"]]
    assert tree["sunny-dove"] == ["frames"]
    (exp_parent,) = [p for p in parents.values() if p.info.run_name == "sunny-dove"]
    assert exp_parent.data.tags["dvc.exp_name"] == "sunny-dove" and exp_parent.data.params["frames.fps"] == "12"


def test_default_uri_is_absolute_sqlite_at_repo_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / ".dvc").mkdir()
    sub = tmp_path / "stages"
    sub.mkdir()
    monkeypatch.chdir(sub)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_repo_root_from_dvc_exp_temp_workspace(tmp_path):
    temp_ws = tmp_path / ".dvc" / "tmp" / "exps" / "standalone" / "tmpabc"
    temp_ws.mkdir(parents=True)
    (temp_ws / ".dvc").mkdir()
    assert repo_root(temp_ws) == tmp_path.resolve()


STAGE_AT = """
import sys, time
from pipeline.tracking import stage_run
start = float(sys.argv[1])
while time.time() < start:
    time.sleep(0.005)
with stage_run("stage", sys.argv[2]) as r:
    r.log_metrics({"x": 1.0})
"""


def test_stages_starting_at_once_on_a_new_store_all_log(tmp_path):
    """Guards: two stages of `pipeline.dag --concurrency 2` creating a new mlflow.db at once raced
    on its migrations ("Online migration expected to match one row") and one stage failed."""
    import os
    import subprocess
    import sys
    import time

    from pipeline.paths import repo_root as root

    for attempt in range(1):
        db = tmp_path / f"mlflow-{attempt}.db"
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "MLFLOW_EXPERIMENT_NAME": "race",
               "PYTHONPATH": str(root(Path(__file__)))}
        start = time.time() + 8  # after every process has imported mlflow
        procs = [subprocess.Popen([sys.executable, "-c", STAGE_AT, str(start), str(i)], env=env, cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err[-2000:]
        client = mlflow.MlflowClient(f"sqlite:///{db}")
        exp = client.get_experiment_by_name("race")
        runs = client.search_runs([exp.experiment_id])
        parents = [r for r in runs if "pipeline.key" in r.data.tags]
        assert len(parents) == 1, "stages starting at once made one parent"
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
        assert sorted(r.info.run_name for r in children) == ["stage@0", "stage@1", "stage@2"]


def test_racing_parents_without_a_lock_keep_the_earliest(tmp_path, monkeypatch):
    """On a store with no lock file (not SQLite), two stages may both create the parent: the one
    created first wins, and the other's is deleted."""
    import contextlib

    import pipeline.tracking as tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    _dag(tmp_path)
    monkeypatch.setattr(tracking, "_store_lock", lambda uri: contextlib.nullcontext())
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment("race")
    create = client.create_run
    racer = {}

    def create_after_a_racer(experiment_id, **kw):
        racer["run"] = create(experiment_id, start_time=1, tags=kw["tags"], run_name="racer")
        return create(experiment_id, **kw)

    monkeypatch.setattr(client, "create_run", create_after_a_racer)
    winner = tracking.parent_run(client, exp_id, uri, PARAMS)
    assert winner == racer["run"].info.run_id
    (alive,) = client.search_runs([exp_id])
    assert alive.info.run_id == winner


def test_uncommitted_code_makes_its_own_parent(tmp_path, monkeypatch):
    """A code change not yet committed is another pipeline state; dvc.lock changing (every stage
    that finishes rewrites it) is not."""
    import subprocess

    uri = _store(tmp_path, monkeypatch, "code")
    (tmp_path / "a.py").write_text("x = 1\n")
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "i"]):
        subprocess.run(["git", *cmd], cwd=tmp_path, check=True)
    with stage_run("frames"):
        pass
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({**LOCK, "stages": {}}))
    with stage_run("actions", "mnist"):
        pass
    (tmp_path / "a.py").write_text("x = 2\n")
    with stage_run("actions", "gameplay"):
        pass
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("code").experiment_id])
    parents = {r.info.run_id: r.info.run_name for r in runs if "pipeline.key" in r.data.tags}
    tree = {}
    for r in runs:
        if r.info.run_id not in parents:
            tree.setdefault(parents[r.data.tags["mlflow.parentRunId"]], []).append(r.info.run_name)
    (clean,) = [n for n in tree if "-code-" not in n]
    (dirty,) = [n for n in tree if "-code-" in n]
    assert sorted(tree[clean]) == ["actions@mnist", "frames"] and tree[dirty] == ["actions@gameplay"]
