"""Helpers shared by the benchmarks: the machine, and the result line and file."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np

from pipeline.atomic import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def report(name: str, figures: dict) -> dict:
    """Print one JSON line and write ``bench/results/<name>.json``."""
    out = {"bench": name, **figures, "machine": machine()}
    print(json.dumps(out, sort_keys=True))
    write_json(RESULTS / f"{name}.json", out)
    return out


def tree_cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (all threads) and of its living descendants (Linux).

    Counts the work of DataLoader workers, which ``time.process_time`` of the parent does not.
    """
    pid = os.getpid() if pid is None else pid
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        children = [
            int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()
        ]
    except FileNotFoundError:  # the process ended meanwhile
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return own + sum(tree_cpu_seconds(c) for c in children)


def crafter_frames(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size, 3) uint8 frames of a Crafter episode under random moves held 2-8 steps."""
    import crafter

    env = crafter.Env(size=(size, size), seed=seed)
    rng = np.random.default_rng(seed)
    frames, action, hold = [env.reset()], 0, 0
    while len(frames) < n:
        if hold == 0:
            action, hold = int(rng.integers(1, 5)), int(rng.integers(2, 9))  # 1-4: moves
        obs, _, done, _ = env.step(action)
        frames.append(env.reset() if done else obs)
        hold -= 1
    return np.stack(frames)
