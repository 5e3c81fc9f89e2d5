"""The shared training loop: schedule, data order, checkpoints, resumption after a kill, EMA, MLflow."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from pipeline.checkpoint import save_torch
from pipeline.reader import LoaderConfig, WindowDataset
from pipeline.store import StoreConfig, write_episode_store
from pipeline.train import (
    STATE,
    STATE_JSON,
    TrainConfig,
    clear_checkpoint,
    lr_at,
    run_dir,
    step_batches,
    train,
)

ROOT = Path(__file__).resolve().parents[2]
NO_WORKERS = LoaderConfig(num_workers=0)


class Points(Dataset):
    """A linear regression problem: y = x . w."""

    def __init__(self, n: int = 40):
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(n, 4)).astype(np.float32)
        self.y = (self.x @ np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32))[:, None]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "i": i}


def noisy_loss(model, batch, step):
    """MSE on inputs with a little noise: the run consumes the torch RNG, as dropout or masks do."""
    x = batch["x"] + 0.01 * torch.randn_like(batch["x"])
    loss = nn.functional.mse_loss(model(x), batch["y"])
    return loss, {"mse": loss.item()}


def cfg(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=8, lr=0.05, warmup_steps=2, log_every=1, eval_every=4, ckpt_every=5)
    return TrainConfig(**{**base, **kw})


def fit(ckpt: Path, c: TrainConfig, stop_after=None, config=None, loss_fn=noisy_loss, loader=NO_WORKERS, **kw):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    return train(model, loss_fn, step_batches(Points(), c, loader), c, ckpt,
                 config=config or {"run": 1}, stop_after=stop_after, **kw)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    c = cfg(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, c) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, c) == pytest.approx(0.1) and lrs[-1] > 0.1


def test_step_batches_depend_only_on_the_step():
    c = cfg(steps=20)
    batches = step_batches(Points(n=20), c, NO_WORKERS)
    full = [b["i"].tolist() for b in batches(0)]
    assert len(full) == 20 and all(len(b) == 8 for b in full)
    # every epoch (20 samples) is a permutation of the dataset
    flat = sum(full, [])
    assert sorted(flat[:20]) == list(range(20)) and flat[:20] != flat[20:40]
    tail = [b["i"].tolist() for b in batches(7)]
    assert tail == full[7:]


def test_step_batches_with_spawn_workers_over_a_window_store(tmp_path):
    frames = np.arange(30 * 2 * 2 * 1, dtype=np.uint8).reshape(30, 2, 2, 1)
    write_episode_store(tmp_path / "f.zarr", [{"frames": frames[:12]}, {"frames": frames[12:]}],
                        StoreConfig(chunk_frames=4, shard_chunks=2))
    ds = WindowDataset([(tmp_path / "f.zarr", "frames")], window=3, stride=2)
    c = cfg(steps=4, batch_size=3)
    spawned = [b["frames"] for b in step_batches(ds, c, LoaderConfig(num_workers=1))(1)]
    local = [b["frames"] for b in step_batches(ds, c, NO_WORKERS)(1)]
    assert len(spawned) == 3 and all(torch.equal(a, b) for a, b in zip(spawned, local))
    assert spawned[0].shape == (3, 3, 2, 2, 1)


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    c = cfg()
    full = fit(tmp_path / "full", c)
    assert full.step == 12 and not full.stopped_early and full.resumed_from == 0

    part = fit(tmp_path / "run", c, stop_after=7)  # dies at step 7; last checkpoint at step 5
    assert part.stopped_early and part.step == 7
    assert part.ckpt_dir == run_dir(tmp_path / "run", c, {"run": 1}) and part.ckpt_dir.parent == tmp_path / "run"
    saved = torch.load(part.ckpt_dir / STATE, weights_only=True)
    assert saved["step"] == 5
    assert json.loads((part.ckpt_dir / STATE_JSON).read_text())["step"] == 5

    resumed = fit(tmp_path / "run", c)
    assert resumed.resumed_from == 5 and resumed.step == full.step == 12
    # the loss curve continues exactly where the uninterrupted run's went
    assert [h["step"] for h in resumed.history] == list(range(1, 13))
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-6)
    assert torch.allclose(resumed.model.weight, full.model.weight, atol=1e-6)
    assert full.history[-1]["loss"] < full.history[0]["loss"]


def _session(ckpt: str) -> None:
    """A training session slow enough to be killed mid-run (run in a subprocess by the next test)."""
    def slow_loss(model, batch, step):
        time.sleep(0.1)
        return noisy_loss(model, batch, step)

    fit(Path(ckpt), cfg(steps=40, ckpt_every=2, eval_every=100), loss_fn=slow_loss)


def test_run_killed_by_sigkill_resumes(tmp_path):
    ckpt = tmp_path / "ckpt"
    state_dir = run_dir(ckpt, cfg(steps=40, ckpt_every=2, eval_every=100), {"run": 1})
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from tests.pipeline.test_train import _session; _session({str(ckpt)!r})"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            meta = state_dir / STATE_JSON
            if meta.exists() and json.loads(meta.read_text())["step"] >= 4:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the training subprocess wrote no checkpoint within 60 s")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = torch.load(state_dir / STATE, weights_only=True)["step"]
    assert 4 <= killed_at < 40
    resumed = fit(ckpt, cfg(steps=40, ckpt_every=2, eval_every=100))
    assert resumed.resumed_from == killed_at and resumed.step == 40
    assert [h["step"] for h in resumed.history] == list(range(1, 41))


def test_checkpoint_of_another_config_is_not_resumed(tmp_path):
    fit(tmp_path / "c", cfg(), stop_after=6, config={"run": 1})
    other = fit(tmp_path / "c", cfg(), config={"run": 2})
    assert other.resumed_from == 0 and other.step == 12


def test_ema_model_is_the_average_of_the_weights(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    w0 = model.weight.detach().clone()
    c = cfg(steps=1, ema_decay=0.5, warmup_steps=0)
    result = train(model, noisy_loss, step_batches(Points(), c, NO_WORKERS), c, tmp_path / "e")
    assert result.model is not model
    assert torch.allclose(result.model.weight, 0.5 * w0 + 0.5 * model.weight)


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    def nan_loss(model, batch, step):
        return model(batch["x"]).sum() * float("nan"), {}

    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        fit(tmp_path / "n", cfg(), loss_fn=nan_loss)


def test_metrics_and_image_grids_go_to_mlflow(tmp_path, monkeypatch):
    import mlflow

    from pipeline.tracking import stage_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)

    def evaluate(model, step):
        return {"score": float(step), "images": np.zeros((8, 16, 3), dtype=np.uint8)}

    with stage_run("unit", None, None) as run:
        fit(tmp_path / "m", cfg(steps=4, log_every=2, eval_every=2), evaluate=evaluate, run=run)
        run_id = mlflow.active_run().info.run_id
    client = mlflow.tracking.MlflowClient()
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [2, 4]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/score")] == [(2, 2.0), (4, 4.0)]
    images = [f.path for f in client.list_artifacts(run_id, "reconstructions")]
    assert images == ["reconstructions/step_000002.png", "reconstructions/step_000004.png"]


# -- checkpoints that cannot be resumed: a warning naming the file, then a fresh start ----------


def _bad_checkpoint(kind: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "foreign-state-dict":  # a readable torch file written by something else
        save_torch(nn.Linear(4, 1).state_dict(), path)
    elif kind == "not-a-dict":
        save_torch([torch.zeros(3)], path)
    elif kind == "truncated":
        save_torch(nn.Linear(4, 1).state_dict(), path)
        path.write_bytes(path.read_bytes()[:40])


@pytest.mark.parametrize("kind", ["foreign-state-dict", "not-a-dict", "truncated"])
def test_checkpoint_that_is_not_a_training_state_is_refused_naming_it(tmp_path, kind):
    """Guards the bug of issue 7: a readable torch file lacking the training state's keys raised a
    bare ``KeyError: 'config'``. Now every file that is not a training state (an unreadable one too)
    raises ``CheckpointError`` naming it and the way out, and is left as it is."""
    from pipeline.checkpoint import CheckpointError

    c = cfg()
    state = run_dir(tmp_path / "c", c, {"run": 1}) / STATE
    _bad_checkpoint(kind, state)
    before = state.read_bytes()
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(state))}: .*remove {re.escape(str(state))} to start"):
        fit(tmp_path / "c", c)
    assert state.read_bytes() == before


def test_checkpoint_whose_weights_do_not_fit_the_model_warns_and_starts_afresh(tmp_path, caplog):
    """Same config, another model (the code changed between the kill and the rerun): the state
    must not be half loaded (RuntimeError from load_state_dict before); the run starts afresh."""
    c = cfg()
    fit(tmp_path / "w", c, stop_after=6)
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        result = train(wider, noisy_loss, step_batches(Points(), c, NO_WORKERS), c, tmp_path / "w",
                       config={"run": 1})
    assert result.resumed_from == 0 and result.step == 12
    assert any("weights do not fit" in r.getMessage() and str(result.ckpt_dir / STATE) in r.getMessage()
               and "starting afresh" in r.getMessage()
               for r in caplog.records)


# -- checkpoints keyed by the run's config -------------------------------------------------------


def test_runs_of_different_configs_keep_their_own_state(tmp_path):
    """Guards issue 7: two experiments of different params under one checkpoint directory (queued
    experiments may run at once) overwrote each other's state, so neither resumed."""
    c = cfg()
    a = fit(tmp_path / "base", c, stop_after=7, config={"lr": "a"})   # last checkpoint: step 5
    b = fit(tmp_path / "base", c, stop_after=6, config={"lr": "b"})   # its own directory
    assert a.ckpt_dir != b.ckpt_dir and a.ckpt_dir.parent == b.ckpt_dir.parent == tmp_path / "base"
    resumed_a = fit(tmp_path / "base", c, config={"lr": "a"})
    assert resumed_a.resumed_from == 5 and resumed_a.step == 12
    # a completed run's state goes; the other run's (stopped, waiting to be resumed) stays
    clear_checkpoint(tmp_path / "base")
    assert not a.ckpt_dir.exists() and (b.ckpt_dir / STATE).exists()
    resumed_b = fit(tmp_path / "base", c, config={"lr": "b"})
    assert resumed_b.resumed_from == 5
    clear_checkpoint(tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_clear_checkpoint_removes_the_old_flat_layout(tmp_path):
    save_torch({"step": 3}, tmp_path / "old" / STATE)
    clear_checkpoint(tmp_path / "old")
    assert not (tmp_path / "old").exists()
