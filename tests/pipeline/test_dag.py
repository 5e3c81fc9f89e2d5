"""The Prefect driver of the DVC DAG, on a tiny real DVC repository."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.dag import run, stage_graph

WRITE = "python -c \"import sys, pathlib; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])\""


@pytest.fixture
def tiny_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    stages = {
        "a": {"cmd": f"{WRITE} a.txt A", "outs": ["a.txt"]},
        "b": {"cmd": f"{WRITE} b.txt B", "outs": ["b.txt"]},
        "bad": {"cmd": "python -c \"raise SystemExit(3)\"", "outs": ["bad.txt"]},
        "after_bad": {"cmd": f"{WRITE} x.txt X", "deps": ["bad.txt"], "outs": ["x.txt"]},
        "c": {
            "cmd": "python -c \"import pathlib; pathlib.Path('c.txt').write_text("
                   "pathlib.Path('a.txt').read_text() + pathlib.Path('b.txt').read_text())\"",
            "deps": ["a.txt", "b.txt"], "outs": ["c.txt"],
        },
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    return tmp_path


def test_graph_edges_and_targets(tiny_repo):
    g = stage_graph(tiny_repo)
    assert set(g.edges) == {("a", "c"), ("b", "c"), ("bad", "after_bad")}
    assert set(stage_graph(tiny_repo, ["c"])) == {"a", "b", "c"}
    with pytest.raises(ValueError, match="no stage"):
        stage_graph(tiny_repo, ["nope"])


def test_runs_branches_and_stops_downstream_of_a_failure(tiny_repo):
    status = run(tiny_repo, None, concurrency=2)
    assert status == {"a": "ok", "b": "ok", "c": "ok", "bad": "failed", "after_bad": "skipped"}
    assert (tiny_repo / "c.txt").read_text() == "AB"
    assert not (tiny_repo / "x.txt").exists()
    lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"a", "b", "c"}
    out = subprocess.run(["dvc", "status", "c"], cwd=tiny_repo, capture_output=True, text=True, check=True)
    assert "up to date" in out.stdout
