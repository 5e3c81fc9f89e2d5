"""Time of a no-op ``dvc repro`` of the whole pipeline (every stage up to date): median of runs.

Needs a full ``dvc repro`` first: when ``dvc status`` reports any changed or missing stage or
output, this says which and exits non-zero without timing anything. A timed run that runs a
stage is an error too (it was not a no-op).

Run from the repository root: ``.venv/bin/python -m bench.bench_noop_repro``. Goal: median <= 2 s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import report

GOAL_S = 2.0
REPO = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))


def dvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DVC, *args], cwd=REPO, capture_output=True, text=True)


def stale_stages() -> dict:
    """``dvc status`` as a dict: {} when every stage and output is up to date."""
    out = dvc("status", "--json")
    if out.returncode != 0:
        sys.exit(f"dvc status failed ({out.returncode}):\n{out.stderr.strip()}")
    return json.loads(out.stdout or "{}")


def timed_repro() -> float:
    t0 = time.perf_counter()
    out = dvc("repro")
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"dvc repro failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    if "Running stage" in out.stdout:
        sys.exit(f"dvc repro ran stages, so it was not a no-op:\n{out.stdout}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    stale = stale_stages()
    if stale:
        listing = "\n".join(f"  - {stage}: {json.dumps(changes)}" for stage, changes in stale.items())
        sys.exit(f"the pipeline is not up to date; run `dvc repro` first. dvc status:\n{listing}")
    runs = [timed_repro() for _ in range(args.runs)]
    median = statistics.median(runs)
    report(
        "noop_repro",
        {
            "runs_s": [round(s, 3) for s in runs],
            "median_s": round(median, 3),
            "goal_s": GOAL_S,
            "ok": median <= GOAL_S,
        },
    )


if __name__ == "__main__":
    main()
