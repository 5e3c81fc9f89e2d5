"""Training-window reads: the project's reader vs the same windows from an in-memory numpy array.

A sharded zarr 3 episode store (the default ``store`` params) of 64x64x3 uint8 frames is written
with ``EpisodeStoreWriter``; 16-frame windows are read in random order through ``make_loader``
(``loader`` params: workers, start method) and, as the baseline, from a numpy array through an
equivalent Dataset in a DataLoader with the same workers, start method and batch size.

Warm throughput is samples/s by wall clock and by CPU time of the process tree (main process and
workers: less sensitive to other load on the machine), medians of interleaved epochs after a
warm-up epoch. Start-up (first ``iter`` to first batch: starting workers, opening and loading
the store) is reported apart; the first loader of a process, which also starts the forkserver, is
timed on its own. For context: the reader's chunk-cache path (``memory_budget_mb: 0``) and a naive
reader that reads each window from zarr on its own, no cache.

Run from the repository root: ``.venv/bin/python -m bench.bench_reader``. Goal: ratio >= 0.8.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

from bench.common import report, tree_cpu_seconds
from pipeline.config import load_section
from pipeline.reader import LoaderConfig, WindowDataset, make_loader
from pipeline.store import EpisodeStore, EpisodeStoreWriter, StoreConfig

GOAL = 0.8


class ArrayWindows(Dataset):
    """Baseline: the same windows sliced from a numpy array that the dataset holds."""

    def __init__(self, frames: np.ndarray, windows: np.ndarray):
        self.frames, self.windows = frames, windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start, end = self.windows[i]
        return {"frames": self.frames[start:end]}


class NaiveZarrWindows(Dataset):
    """Context: each window read from zarr on its own, no cache (the store opened per process)."""

    def __init__(self, path: Path, windows: np.ndarray):
        self.path, self.windows, self.array = str(path), windows, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "array": None}

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if self.array is None:
            self.array = EpisodeStore.open(self.path).array("frames")
        start, end = self.windows[i]
        return {"frames": self.array[start:end]}


def moving_frames(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size, 3) uint8: a drifting colour gradient, a bouncing square and mild noise.

    Compresses (and H.264-encodes) like simple rendered content, unlike pure noise.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phase = (x + 0.5 * y)[..., None] + rng.uniform(0, 1, 3).astype(np.float32)
    side, step = size // 4, max(1, size // 32)
    span = size - side
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        frame = 128 + 80 * np.sin(2 * np.pi * (phase + 0.01 * i)) + rng.normal(0, 4, phase.shape)
        p = abs((i * step) % (2 * span) - span)  # bounces along the diagonal
        frame[p : p + side, p : p + side] = 255
        out[i] = np.clip(frame, 0, 255)
    return out


def write_store(path: Path, episodes: int, length: int, cfg: StoreConfig) -> None:
    with EpisodeStoreWriter(path, cfg, attrs={"source": "bench"}) as w:
        for e in range(episodes):
            w.add_episode(frames=moving_frames(length, 64, seed=e))


def epoch(loader: DataLoader) -> tuple[float, float]:
    """Samples per second over one epoch: by wall clock, and by CPU time of this process tree."""
    t0, c0 = time.perf_counter(), tree_cpu_seconds()
    n = sum(len(batch["frames"]) for batch in loader)
    return n / (time.perf_counter() - t0), n / (tree_cpu_seconds() - c0)


def start(loader: DataLoader) -> float:
    """Seconds from the first ``iter`` to the first batch; then finishes the (warm-up) epoch."""
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    startup = time.perf_counter() - t0
    for _ in it:
        pass
    return startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--length", type=int, default=128, help="frames per episode")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7, help="timed epochs of each, interleaved")
    args = parser.parse_args()

    store_cfg = load_section("store", StoreConfig)
    cfg = load_section("loader", LoaderConfig)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frames.zarr"
        write_store(path, args.episodes, args.length, store_cfg)
        reader = WindowDataset([(path, "frames")], window=args.window, cfg=cfg)
        baseline = ArrayWindows(EpisodeStore.open(path).array("frames")[:], reader.windows)
        cached = WindowDataset([(path, "frames")], args.window, cfg=cfg.model_copy(update={"memory_budget_mb": 0}))
        naive = NaiveZarrWindows(path, reader.windows)

        # The first loader of a process also starts the forkserver (once): timed on its own.
        boot = start(make_loader(reader, args.batch_size, shuffle=True, seed=0, cfg=cfg))
        loaders = {
            name: make_loader(ds, args.batch_size, shuffle=True, seed=0, cfg=cfg)
            for name, ds in {"reader": reader, "numpy": baseline, "chunk_cache": cached, "naive_zarr": naive}.items()
        }
        startup = {name: start(loader) for name, loader in loaders.items()}
        got: dict[str, list[tuple[float, float]]] = {name: [] for name in loaders}
        for r in range(args.rounds):  # interleaved, alternating which goes first
            pair = ("reader", "numpy") if r % 2 else ("numpy", "reader")
            for name in pair if r else loaders:  # the slower context paths: one epoch
                got[name].append(epoch(loaders[name]))
        del loaders

    wall = {name: statistics.median(w for w, _ in v) for name, v in got.items()}
    cpu = {name: statistics.median(c for _, c in v) for name, v in got.items()}
    ratio = wall["reader"] / wall["numpy"]
    report(
        "reader",
        {
            "frames": args.episodes * args.length,
            "windows": len(reader),
            "window": args.window,
            "batch_size": args.batch_size,
            "num_workers": cfg.num_workers,
            "start_method": cfg.start_method,
            "in_memory": reader.in_memory,
            "samples_per_s": {k: round(v, 1) for k, v in wall.items()},
            "cpu_samples_per_s": {k: round(v, 1) for k, v in cpu.items()},
            "epoch_samples_per_s": {k: [round(w, 1) for w, _ in v] for k, v in got.items()},
            "startup_s": {k: round(v, 3) for k, v in startup.items()},
            "first_loader_startup_s": round(boot, 3),
            "ratio": round(ratio, 3),
            "cpu_ratio": round(cpu["reader"] / cpu["numpy"], 3),
            "goal": GOAL,
            "ok": ratio >= GOAL,
        },
    )


if __name__ == "__main__":
    main()
