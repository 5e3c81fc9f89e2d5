"""Drive the DVC DAG with Prefect: independent branches run in parallel.

DVC stays the one definition of the DAG and owns caching; this only schedules. Each stage is run
as ``dvc --wait-for-lock repro --single-item <stage>`` (a no-op when DVC finds it up to date) as
soon as every stage it depends on has finished, at most ``--concurrency`` at a time. A failed stage
stops its downstream stages; independent branches carry on. Usage::

    python -m pipeline.dag [TARGET ...] [--concurrency 2]

DVC's repository lock, and why ``--wait-for-lock``: ``dvc repro`` holds the repo lock
(``.dvc/tmp/lock``) while it collects the stages, checks their status, restores from the run cache
and hashes the deps; it *releases* it while the stage's command runs (``dvc.stage.run.run_stage``
wraps the command in ``unlocked_repo``; the stage's own deps/outs stay guarded by DVC's per-path
read/write locks, ``.dvc/tmp/rwlock``), then takes it again to hash and cache the outputs and write
``dvc.lock``. Without ``--wait-for-lock`` each acquisition gives up after 3 s (6 tries,
``dvc.lock.DEFAULT_TIMEOUT``), so when another ``dvc repro`` of the runner is committing a large
output (a zarr store of many chunk files) a stage failed "Unable to acquire lock", at its start or,
worse, after its command had done all its work; everything downstream was then skipped.
``--wait-for-lock`` (a global DVC option, before the sub-command) makes both acquisitions wait
as long as needed. The commands themselves still run in parallel; only DVC's bookkeeping around them
is serialised, which is what DVC requires anyway. (DVC's default lock is an ``fcntl`` lock that
the kernel releases when its process dies, so a killed run cannot leave a lock to wait on forever;
with ``core.hardlink_lock`` a killed run's lock file would have to be removed by hand.)
Measured with DVC 3.67 on 2 busy cores: caching a 2000-file output held the lock 4-6 s, and of 4
such independent stages at concurrency 2, 2 failed without the option and none with it
(tests/pipeline/test_dag.py). Running a stage's command outside ``dvc repro`` and then ``dvc
commit`` would give no more parallelism (DVC already runs commands unlocked) and would duplicate
DVC's status, run-cache and output handling, so it was not done.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import networkx as nx

# One stage, waiting for DVC's repo lock instead of failing after 3 s (see the module docstring).
DVC_REPRO = ["dvc", "--wait-for-lock", "repro", "--single-item"]


def stage_graph(repo_dir: Path | str = ".", targets: list[str] | None = None) -> nx.DiGraph:
    """Stage names with an edge ``upstream -> downstream``, limited to ``targets`` and their ancestors."""
    from dvc.repo import Repo

    with Repo(str(repo_dir)) as repo:
        dvc_graph = repo.index.graph  # edges point from a stage to the stages it depends on
        g = nx.DiGraph()
        for stage in dvc_graph:
            g.add_node(stage.name)
            for upstream in dvc_graph.successors(stage):
                g.add_edge(upstream.name, stage.name)
    if targets:
        unknown = sorted(set(targets) - set(g))
        if unknown:
            raise ValueError(f"dvc.yaml has no stage(s) {unknown}; stages: {sorted(g)}")
        keep = set(targets).union(*(nx.ancestors(g, t) for t in targets))
        g = g.subgraph(keep).copy()
    return g


def run(repo_dir: Path | str = ".", targets: list[str] | None = None, concurrency: int = 2) -> dict[str, str]:
    """Reproduce the DAG; returns each stage's outcome: ``ok``, ``failed`` or ``skipped``."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.futures import as_completed
    from prefect.task_runners import ThreadPoolTaskRunner

    import pipeline.flows  # noqa: F401  (first: Prefect settings for offline, quiet runs)

    g = stage_graph(repo_dir, targets)

    @task(name="dvc-repro", cache_policy=NO_CACHE, persist_result=False)
    def repro(stage: str) -> None:
        proc = subprocess.run(DVC_REPRO + [stage], cwd=repo_dir)
        if proc.returncode != 0:
            raise RuntimeError(f"dvc repro --single-item {stage} failed with exit code {proc.returncode}")

    @flow(name="dvc-dag", task_runner=ThreadPoolTaskRunner(max_workers=concurrency))
    def dag() -> dict[str, str]:
        status: dict[str, str] = {}
        running: dict = {}  # future -> stage
        pending = set(g)
        while pending or running:
            for stage in sorted(pending):
                ups = set(g.predecessors(stage))
                if any(status.get(u) in ("failed", "skipped") for u in ups):
                    status[stage] = "skipped"
                    pending.discard(stage)
                elif all(status.get(u) == "ok" for u in ups):
                    running[repro.submit(stage)] = stage
                    pending.discard(stage)
            if not running:
                continue
            fut = next(as_completed(list(running)))
            stage = running.pop(fut)
            failed = isinstance(fut.result(raise_on_failure=False), BaseException)
            status[stage] = "failed" if failed else "ok"
        return status

    return dag()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help="stages to reproduce (default: all)")
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    status = run(".", args.targets or None, args.concurrency)
    for stage, outcome in sorted(status.items()):
        print(f"{outcome:8s} {stage}")
    sys.exit(0 if all(v == "ok" for v in status.values()) else 1)


if __name__ == "__main__":
    main()
