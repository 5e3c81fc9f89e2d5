"""Decode + resize + store (the gameplay_frames path) vs bare PyAV decoding of the same files.

H.264 MP4s of Crafter play (random moves held a few steps; Crafter is the default gameplay
source) are generated with ``pipeline.video.encode_video``: 256x256 sources (resized to the
``gameplay_frames`` size, 64x64) and 64x64 sources (the same frames, downscaled). The project's
path is ``decode_video`` (with the ``gameplay_frames`` params: fps, size, crop, threads) feeding
an ``EpisodeStoreWriter`` (the ``store`` params), one episode per video, one video at a time like
the baseline; for context also ``concurrency`` videos decoded at once, as the stage does. The
baseline decodes the same files with bare PyAV (``container.decode`` then
``frame.to_ndarray(format="rgb24")``, PyAV's default threading) and keeps the arrays.

Figures per source size: frames/s by wall clock and by this process's CPU time (all threads; less
sensitive to other load on the machine), medians of interleaved rounds. ``ratio`` (the goal's
figure) is the project's wall-clock frames/s over the baseline's, the lower of the two sizes.

Run from the repository root: ``.venv/bin/python -m bench.bench_decode``. Goal: ratio >= 0.8.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import av
import numpy as np

from bench.common import crafter_frames, report
from pipeline.config import load_section
from pipeline.frames import Config as FramesConfig
from pipeline.store import EpisodeStoreWriter, StoreConfig
from pipeline.video import decode_video, encode_video

GOAL = 0.8


def downscale(frames: np.ndarray, size: int) -> np.ndarray:
    return np.stack([
        av.VideoFrame.from_ndarray(f, format="rgb24").reformat(size, size, interpolation="AREA").to_ndarray()
        for f in frames
    ])


def bare(files: list[Path]) -> int:
    """Bare PyAV: every frame of every file to an RGB array. Returns the number of frames."""
    n = 0
    for path in files:
        with av.open(str(path)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        n += len(np.stack(frames))
    return n


def project(files: list[Path], out: Path, cfg: FramesConfig, store_cfg: StoreConfig, concurrency: int = 1) -> int:
    """decode_video (resample, crop, resize) into an episode store, ``concurrency`` videos decoded
    at once (episodes appended in order, as the stage does). Returns the number of frames."""
    def decode(path: Path) -> tuple[np.ndarray, np.ndarray]:
        return decode_video(path, fps=cfg.fps, size=(cfg.width, cfg.height), crop=cfg.crop, threads=cfg.threads)

    n = 0
    with EpisodeStoreWriter(out, store_cfg, attrs={"source": "bench"}) as writer:
        with ThreadPoolExecutor(concurrency) as pool:
            for frames, timestamps in pool.map(decode, files):
                writer.add_episode(frames=frames, timestamps=timestamps)
                n += len(frames)
    return n


def rates(fn, *args) -> tuple[float, float]:
    """(frames per wall-clock second, frames per CPU second of this process, all threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    n = fn(*args)
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def measure(runs: dict[str, Callable[[], int]], rounds: int) -> dict[str, dict]:
    """Each run once per round, the order rotated every round; medians of wall and CPU frames/s."""
    got: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            got[name].append(rates(runs[name]))
    return {
        name: {
            "wall_frames_per_s": round(statistics.median(w for w, _ in v), 1),
            "cpu_frames_per_s": round(statistics.median(c for _, c in v), 1),
            "rounds_wall_frames_per_s": [round(w, 1) for w, _ in v],
        }
        for name, v in got.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=3, help="videos per source size")
    parser.add_argument("--frames", type=int, default=200, help="frames per video")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 64], help="source sizes (square)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    cfg = load_section("gameplay_frames", FramesConfig)
    store_cfg = load_section("store", StoreConfig)
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = [crafter_frames(args.frames, max(args.sizes), seed=i) for i in range(args.videos)]
        for size in args.sizes:
            files = [
                encode_video(downscale(frames, size), tmp / f"{size}_{i}.mp4", fps=cfg.fps or 10)
                for i, frames in enumerate(source)
            ]
            out = tmp / "frames.zarr"
            runs = {
                "bare_pyav": lambda: bare(files),
                "project": lambda: project(files, out, cfg, store_cfg),
                f"project_concurrency_{cfg.concurrency}": lambda: project(files, out, cfg, store_cfg, cfg.concurrency),
            }
            m = measure(runs, args.rounds)
            figures[f"{size}x{size}"] = {
                **m,
                "ratio": round(m["project"]["wall_frames_per_s"] / m["bare_pyav"]["wall_frames_per_s"], 3),
                "cpu_ratio": round(m["project"]["cpu_frames_per_s"] / m["bare_pyav"]["cpu_frames_per_s"], 3),
            }
    ratio = min(f["ratio"] for f in figures.values())
    report(
        "decode",
        {
            "videos_per_size": args.videos,
            "frames_per_video": args.frames,
            "output_size": [cfg.width, cfg.height],
            "threads": cfg.threads,
            "store": store_cfg.model_dump(),
            "sources": figures,
            "ratio": ratio,
            "goal": GOAL,
            "ok": ratio >= GOAL,
        },
    )


if __name__ == "__main__":
    main()
