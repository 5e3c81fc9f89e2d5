"""MLflow tracking: a real SQLite store, runs named after the stage, params, metrics, commit tag."""

from pathlib import Path

import mlflow

from pipeline.paths import repo_root
from pipeline.tracking import stage_run, tracking_uri


def test_stage_run_logs_to_sqlite(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "test-exp")
    art = tmp_path / "note.txt"
    art.write_text("hello")
    with stage_run("actions", "gameplay", {"method": "phase_correlation", "nested": {"k": 3}}) as r:
        r.log_metrics({"accuracy": 0.95, "confusion": {"a": 1}, "collapsed": False, "label": "x"})
        r.log_artifact(art)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("test-exp")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "actions@gameplay"
    assert run.data.params == {"method": "phase_correlation", "nested.k": "3"}
    assert run.data.metrics == {"accuracy": 0.95, "confusion.a": 1.0, "collapsed": 0.0}
    assert run.data.tags["stage"] == "actions" and run.data.tags["item"] == "gameplay"
    assert "git_commit" in run.data.tags
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]


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
        procs = [subprocess.Popen([sys.executable, "-c", STAGE_AT, str(start), str(i)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err[-2000:]
        client = mlflow.MlflowClient(f"sqlite:///{db}")
        exp = client.get_experiment_by_name("race")
        assert len(client.search_runs([exp.experiment_id])) == 3
