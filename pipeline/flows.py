"""Per-item work as a Prefect flow: one task per item on a thread pool, with retries.

Prefect 3 runs flows against an API; without ``PREFECT_API_URL`` it starts a temporary local
server for the process (8-17 s on 2 busy cores; later flows of the process reuse it). The
defaults below are set before Prefect is imported: a longer start-up timeout than Prefect's 20 s
for busy machines, and no usage telemetry (stages run offline).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# INFO logs at interpreter exit (the temporary server stopping) hit a closed stdout: keep warnings only.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.futures import as_completed  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402
from tqdm import tqdm  # noqa: E402

# What one item ended with: its task's return value, or the exception of its last attempt.
Outcome = Any


def run_tasks(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    name: str,
    concurrency: int,
    retries: int = 0,
    retry_backoff_s: float = 0.0,
    labels: Sequence[str] | None = None,
    on_result: Callable[[int, Outcome], None] | None = None,
) -> list[Outcome]:
    """Run ``fn(item)`` for every item, one Prefect task each, at most ``concurrency`` at once.

    A failing task is retried ``retries`` times after ``retry_backoff_s * 2**i`` seconds. A task
    that still fails does not stop the others: its exception is its outcome. ``on_result(i,
    outcome)`` is called in the flow's thread as each item finishes (in completion order); the
    returned list is in item order. ``labels`` name the task runs (default: the item's index).
    """
    if not items:
        return []
    labels = list(labels) if labels is not None else [str(i) for i in range(len(items))]
    item_task = task(
        fn,
        name=name,
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=retry_backoff_s) if retries else 0,
        cache_policy=NO_CACHE,
        persist_result=False,
    )
    outcomes: list[Outcome] = [None] * len(items)

    @flow(name=name, task_runner=ThreadPoolTaskRunner(max_workers=concurrency), validate_parameters=False)
    def body() -> None:
        futures = [
            item_task.with_options(task_run_name=f"{name}-{label}").submit(item)
            for item, label in zip(items, labels)
        ]
        index = {f.task_run_id: i for i, f in enumerate(futures)}
        for future in tqdm(as_completed(futures), total=len(futures), desc=name, unit="item"):
            i = index[future.task_run_id]
            try:
                outcomes[i] = future.result()
            except Exception as exc:  # the item failed after its retries: record it, go on
                outcomes[i] = exc
            if on_result is not None:
                on_result(i, outcomes[i])

    body()
    return outcomes
