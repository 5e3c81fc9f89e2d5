"""DataLoader workers die with the training stage: a SIGKILLed stage leaves no process behind.

With ``forkserver`` the workers are children of the forkserver, not of the stage, and every child of
the forkserver holds the write end of the forkserver's "alive" pipe; the forkserver exits only at
EOF of that pipe, the workers only when their parent (the forkserver) is gone, and the resource
tracker only at EOF of its own pipe, whose write end they all hold. Nobody watched the stage.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline.reader import LoaderConfig, WindowDataset
from pipeline.store import StoreConfig, write_episode_store
from pipeline.train import TrainConfig, step_batches, train

ROOT = Path(__file__).resolve().parents[2]


def _session(store: str, ckpt: str, ready: str, method: str) -> None:
    """A training stage with 2 workers that runs until killed; touches ``ready`` at step 3."""
    loader = LoaderConfig(num_workers=2, start_method=method)
    ds = WindowDataset([(store, "frames")], window=4, cfg=loader)
    cfg = TrainConfig(steps=100_000, batch_size=64, warmup_steps=1, log_every=10, eval_every=10_000,
                      ckpt_every=10_000)

    def loss_fn(model, batch, step):
        if step == 3:
            Path(ready).touch()
        time.sleep(0.02)
        x = batch["frames"].float().flatten(1) / 255
        loss = model(x).pow(2).mean()
        return loss, {}

    torch.manual_seed(0)
    train(nn.Linear(4 * 16 * 16 * 3, 1), loss_fn, step_batches(ds, cfg, loader), cfg, ckpt)


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """``{pid: (ppid, pgid, cmdline)}`` of every process (from /proc)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if fields[0] == "Z":
            continue  # a zombie holds no memory; it is only waiting to be reaped
        out[int(d.name)] = (int(fields[1]), int(fields[2]), cmd)
    return out


def _descendants(pid: int, table: dict[int, tuple[int, int, str]]) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = {q for q, (pp, _, _) in table.items() if pp == p}
        todo.extend(kids - found)
        found |= kids
    return found


def _group(pgid: int) -> dict[int, str]:
    return {p: cmd for p, (_, g, cmd) in _proc_table().items() if g == pgid}


def test_sigkilled_stage_leaves_no_worker_forkserver_or_tracker(tmp_path):
    """Guards the leak of issue 7: after ``kill -9`` of a training stage its forkserver, its 2
    DataLoader workers and the resource tracker stayed alive for minutes (each worker holding the
    dataset in memory). All of them must be gone within a few seconds."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (400, 16, 16, 3), dtype=np.uint8)
    store = write_episode_store(tmp_path / "frames.zarr", [{"frames": frames[:200]}, {"frames": frames[200:]}],
                                StoreConfig(chunk_frames=16, shard_chunks=4))
    ready = tmp_path / "ready"
    code = (f"from tests.pipeline.test_worker_lifetime import _session; "
            f"_session({str(store)!r}, {str(tmp_path / 'ckpt')!r}, {str(ready)!r}, 'forkserver')")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while not ready.exists():
            if proc.poll() is not None:
                pytest.fail(f"the training stage exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
            if time.time() > deadline:
                pytest.fail("the training stage did not reach step 3 within 90 s")
            time.sleep(0.05)
        table = _proc_table()
        tree = {p: table[p][2] for p in _descendants(proc.pid, table)}
        # the setup is what the issue describes: the forkserver, 2 workers and the resource tracker
        assert sum("resource_tracker" in c for c in tree.values()) == 1, tree
        assert sum("forkserver" in c for c in tree.values()) == 3, tree  # workers fork from it
        assert len(tree) == 4, tree
        assert set(tree) <= set(_group(proc.pid)), "the stage's children share its process group"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 10
    left = _group(proc.pid)
    while left and time.time() < deadline:
        time.sleep(0.1)
        left = _group(proc.pid)
    for pid in left:  # do not leak them into the rest of the test session
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the killed stage still alive 10 s later: {left}"
