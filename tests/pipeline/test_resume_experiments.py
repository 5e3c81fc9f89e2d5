"""A killed training run resumes from a DVC experiment workspace, and experiments of different params
keep their own state.

``dvc exp run --temp`` (and ``--queue``) runs a stage in ``<repo>/.dvc/tmp/exps/standalone/tmpXXXX``,
a fresh copy removed afterwards: checkpoints relative to the working directory were lost with it, so a
killed experiment started from scratch. ``pipeline.paths.checkpoint_dir`` puts them under the main
repository; ``pipeline.train`` keys them by the run's configs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.paths import checkpoint_dir
from pipeline.train import STATE, STATE_JSON, clear_checkpoint, run_dir
from tests.pipeline.test_train import cfg, fit

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
        **extra,
    }


def _run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _repo(path: Path, env: dict) -> Path:
    """A real git + DVC repository at ``path``."""
    path.mkdir()
    _run(["git", "init", "-q"], path, env)
    _run(["dvc", "init", "-q"], path, env)
    return path


def _workspace(repo: Path, name: str) -> Path:
    """A directory shaped like a ``dvc exp run --temp`` workspace: its own ``.dvc`` and git checkout."""
    ws = repo / ".dvc" / "tmp" / "exps" / "standalone" / name
    (ws / ".dvc").mkdir(parents=True)
    (ws / ".git").write_text(f"gitdir: {repo / '.git'}\n")
    return ws


def test_killed_run_resumes_from_another_experiment_workspace(tmp_path, monkeypatch):
    """Guards issue 7: resume did nothing under ``dvc exp run --temp``/``--queue`` (checkpoints were
    kept in the throwaway workspace), and two experiments of different params running at once
    overwrote each other's state."""
    repo = _repo(tmp_path / "repo", _env())
    c = cfg()
    monkeypatch.chdir(_workspace(repo, "tmpfirst"))
    base = checkpoint_dir("unit")
    assert base == repo / "checkpoints" / "unit"
    killed = fit(base, c, stop_after=7, config={"lr": 0.05})  # last checkpoint at step 5
    assert killed.ckpt_dir == run_dir(repo / "checkpoints" / "unit", c, {"lr": 0.05})
    other = fit(base, c, stop_after=6, config={"lr": 0.01})   # another experiment, at the same time
    assert other.ckpt_dir != killed.ckpt_dir

    monkeypatch.chdir(_workspace(repo, "tmpsecond"))  # the rerun gets a new workspace
    assert checkpoint_dir("unit") == base
    resumed = fit(checkpoint_dir("unit"), c, config={"lr": 0.05})
    assert resumed.resumed_from == 5 and resumed.step == 12
    clear_checkpoint(checkpoint_dir("unit"))
    assert not killed.ckpt_dir.exists() and (other.ckpt_dir / STATE).exists()
    assert fit(checkpoint_dir("unit"), c, config={"lr": 0.01}).resumed_from == 5


STAGE = '''
"""Train a tiny regression with pipeline.train; SIGKILL itself at step $DIE_AT when it is set."""
import json, os, signal, sys
from pathlib import Path

import torch, torch.nn as nn, yaml

from pipeline.paths import checkpoint_dir
from pipeline.train import clear_checkpoint, step_batches, train
from tests.pipeline.test_train import NO_WORKERS, Points, cfg

lr = yaml.safe_load(open("params.yaml"))["lr"]
c = cfg(lr=lr)
die_at = int(os.environ.get("DIE_AT", "0"))


def loss_fn(model, batch, step):
    if die_at and step == die_at:
        os.kill(os.getpid(), signal.SIGKILL)
    loss = nn.functional.mse_loss(model(batch["x"]), batch["y"])
    return loss, {}


torch.manual_seed(0)
base = checkpoint_dir("fit")
result = train(nn.Linear(4, 1), loss_fn, step_batches(Points(), c, NO_WORKERS), c, base, config={"lr": lr})
Path("out.json").write_text(json.dumps({"step": result.step}))
Path(os.environ["RESULT"]).write_text(json.dumps(
    {"resumed_from": result.resumed_from, "step": result.step, "cwd": os.getcwd(), "ckpt_dir": str(result.ckpt_dir)}))
clear_checkpoint(base)
'''


@pytest.mark.slow
def test_dvc_exp_run_temp_resumes_a_killed_experiment(tmp_path):
    """``dvc exp run --temp`` of a one-stage repository whose stage dies (SIGKILL) at step 7 the
    first time: the second ``dvc exp run --temp`` resumes from its checkpoint of step 5."""
    env = _env()
    repo = _repo(tmp_path / "repo", env)
    (repo / "stage.py").write_text(STAGE)
    (repo / "params.yaml").write_text("lr: 0.05\n")
    (repo / "dvc.yaml").write_text(
        "stages:\n  fit:\n    cmd: python stage.py\n    deps: [stage.py]\n    params: [lr]\n    outs: [out.json]\n")
    (repo / ".gitignore").write_text("/checkpoints/\n")
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "init"], repo, env)
    result = tmp_path / "result.json"

    first = _run(["dvc", "exp", "run", "--temp"], repo, _env(DIE_AT="7", RESULT=str(result)), check=False)
    assert first.returncode != 0 and not result.exists(), first.stdout + first.stderr
    states = list((repo / "checkpoints" / "fit").glob(f"*/{STATE_JSON}"))
    assert len(states) == 1 and json.loads(states[0].read_text())["step"] == 5, first.stdout + first.stderr

    _run(["dvc", "exp", "run", "--temp"], repo, _env(RESULT=str(result)))
    out = json.loads(result.read_text())
    assert ".dvc/tmp/exps" in out["cwd"]
    assert out["resumed_from"] == 5 and out["step"] == 12
    assert Path(out["ckpt_dir"]) == states[0].parent
    assert not (repo / "checkpoints" / "fit").exists(), "a completed run's state is removed"
