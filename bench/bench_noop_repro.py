"""Time of a no-op ``dvc repro`` of the whole pipeline (every stage up to date): median of runs.

Needs a full ``dvc repro`` first: when ``dvc status`` reports any changed or missing stage or
output, this says which and exits non-zero without timing anything. The timed command is a real
``dvc repro``: if a file changes between the check and the run, DVC removes that stage's outputs
and runs it. Run it when nobody else is editing the tree (or in a copy of it). A timed run that
runs a stage is an error (it was not a no-op).

Run from the repository root: ``.venv/bin/python -m bench.bench_noop_repro [STAGE ...]`` (default:
the whole pipeline; the goal is for the whole pipeline). Goal: median <= 2 s.
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


def stale_stages(targets: list[str]) -> dict:
    """``dvc status`` as a dict: {} when every stage and output is up to date."""
    out = dvc("status", "--json", *targets)
    if out.returncode != 0:
        sys.exit(f"dvc status failed ({out.returncode}):\n{out.stderr.strip()}")
    return json.loads(out.stdout or "{}")


def require_up_to_date(targets: list[str]) -> None:
    stale = stale_stages(targets)
    if stale:
        listing = "\n".join(f"  - {stage}: {json.dumps(changes)}" for stage, changes in stale.items())
        sys.exit(f"the pipeline is not up to date; run `dvc repro` first. dvc status:\n{listing}")


def timed_repro(targets: list[str]) -> float:
    t0 = time.perf_counter()
    out = dvc("repro", *targets)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"dvc repro failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    if "Running stage" in out.stdout:
        sys.exit(f"dvc repro ran stages, so it was not a no-op:\n{out.stdout}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("targets", nargs="*", help="stages to reproduce (default: the whole pipeline)")
    args = parser.parse_args()

    runs = []
    for _ in range(args.runs):
        require_up_to_date(args.targets)  # again before each run: others may be editing the tree
        runs.append(timed_repro(args.targets))
    median = statistics.median(runs)
    report(
        "noop_repro",
        {
            "targets": args.targets or "whole pipeline",
            "runs_s": [round(s, 3) for s in runs],
            "median_s": round(median, 3),
            "goal_s": GOAL_S,
            "ok": median <= GOAL_S,
        },
    )


if __name__ == "__main__":
    main()
