"""The cost of encoding with x264's C code (``pipeline.video.X264_PARAMS``, ``asm=0``) against its
SIMD code, on the gameplay_videos stage's work.

Crafter episodes at the ``gameplay_videos.crafter`` params (size, steps, fps, crf) under random
moves held 2-8 steps are played once (timed: the recording's own share of the stage), then each is
encoded with ``encode_video`` as the stage does, with the project's x264 options and with the same
options less ``asm=0`` (x264's SIMD code for this CPU), in interleaved rounds. Figures: seconds per
episode of each (medians of the rounds), ``ratio`` (C / SIMD encoding time), and ``stage_cost``:
the extra seconds per episode over the SIMD stage's seconds per episode (playing + encoding), the
fraction by which the C code lengthens the stage's work.

Run from the repository root: ``.venv/bin/python -m bench.bench_encode [--episodes 8] [--rounds 3]``.
No goal: it reports the price of encodes that do not depend on the CPU.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from bench.common import crafter_frames, report
from pipeline import video

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg = yaml.safe_load((ROOT / "params.yaml").read_text())["gameplay_videos"]["crafter"]

    t0 = time.perf_counter()
    episodes = [crafter_frames(cfg["steps"] + 1, cfg["size"], seed) for seed in range(args.episodes)]
    record_s = (time.perf_counter() - t0) / args.episodes

    variants = {"c": video.X264_PARAMS, "simd": video.X264_PARAMS.replace("asm=0:", "")}
    assert variants["c"] != variants["simd"], "X264_PARAMS no longer starts with asm=0"
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, params in variants.items():
                video.X264_PARAMS = params
                t0 = time.perf_counter()
                for i, frames in enumerate(episodes):
                    video.encode_video(frames, Path(tmp) / f"{name}_{i}.mp4", cfg["fps"], cfg["crf"])
                times[name].append((time.perf_counter() - t0) / args.episodes)
    video.X264_PARAMS = variants["c"]
    c, simd = (statistics.median(times[name]) for name in ("c", "simd"))
    report("encode", {
        "episodes": args.episodes,
        "frames_per_episode": float(np.mean([len(e) for e in episodes])),
        "size": cfg["size"],
        "record_s_per_episode": record_s,
        "encode_c_s_per_episode": c,
        "encode_simd_s_per_episode": simd,
        "ratio": c / simd,
        "stage_cost": (c - simd) / (record_s + simd),
        "rounds": {name: times[name] for name in times},
    })


if __name__ == "__main__":
    main()
