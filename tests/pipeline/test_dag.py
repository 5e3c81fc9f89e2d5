"""The Prefect driver of the DVC DAG, on tiny real DVC repositories (the real DAG: tests/test_dvc_pipeline.py)."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline.dag import run, stage_graph

ROOT = Path(__file__).resolve().parents[2]
WRITE = "python -c \"import sys, pathlib; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])\""

# A stage command of the lock tests: logs its start, optionally waits for a file to appear (at most
# 120 s), sleeps, writes `n_files` new files into out_<name>/, logs its end (log/<name>.txt, one line
# "start end" per run; log/ is no output of DVC's).
WORK_PY = '''\
import pathlib, sys, time
name, n_files, sleep_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
wait_for = pathlib.Path(sys.argv[4]) if len(sys.argv) > 4 else None
log = pathlib.Path("log"); log.mkdir(exist_ok=True)
start = time.time()
(log / f"{name}.started").write_text(str(start))
if wait_for is not None:
    while not wait_for.exists() and time.time() - start < 120:
        time.sleep(0.05)
time.sleep(sleep_s)
out = pathlib.Path(f"out_{name}"); out.mkdir(exist_ok=True)
for i in range(n_files):
    (out / f"{i}.txt").write_text(f"{name} {i} {start}")  # new content: DVC caches every file anew
with open(log / f"{name}.txt", "a") as f:
    f.write(f"{start} {time.time()}\\n")
'''


def init_repo(path: Path, stages: dict, files: dict[str, str] | None = None) -> Path:
    """``path`` as a git + DVC repository with ``stages`` in dvc.yaml and ``files`` written; returns it."""
    for name, text in (files or {}).items():
        (path / name).write_text(text)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=path, check=True)
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    return path


@pytest.fixture
def dvc_env(monkeypatch):
    """The venv's ``dvc`` first on PATH, no analytics."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")


@pytest.fixture
def tiny_repo(tmp_path, dvc_env):
    stages = {
        "a": {"cmd": f"{WRITE} a.txt A", "outs": ["a.txt"]},
        "b": {"cmd": f"{WRITE} b.txt B", "outs": ["b.txt"]},
        "bad": {"cmd": "python -c \"raise SystemExit(3)\"", "outs": ["bad.txt"]},
        "after_bad": {"cmd": f"{WRITE} x.txt X", "deps": ["bad.txt"], "outs": ["x.txt"]},
        "c": {
            "cmd": "python -c \"import pathlib; pathlib.Path('c.txt').write_text("
                   "pathlib.Path('a.txt').read_text() + pathlib.Path('b.txt').read_text())\"",
            "deps": ["a.txt", "b.txt"], "outs": ["c.txt"],
        },
    }
    return init_repo(tmp_path, stages)


def test_graph_edges_and_targets(tiny_repo):
    g = stage_graph(tiny_repo)
    assert set(g.edges) == {("a", "c"), ("b", "c"), ("bad", "after_bad")}
    assert set(stage_graph(tiny_repo, ["c"])) == {"a", "b", "c"}
    with pytest.raises(ValueError, match="no stage"):
        stage_graph(tiny_repo, ["nope"])


def test_runs_branches_and_stops_downstream_of_a_failure(tiny_repo):
    status = run(tiny_repo, None, concurrency=2)
    assert status == {"a": "ok", "b": "ok", "c": "ok", "bad": "failed", "after_bad": "skipped"}
    assert (tiny_repo / "c.txt").read_text() == "AB"
    assert not (tiny_repo / "x.txt").exists()
    lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"a", "b", "c"}
    out = subprocess.run(["dvc", "status", "c"], cwd=tiny_repo, capture_output=True, text=True, check=True)
    assert "up to date" in out.stdout


def intervals(repo: Path, name: str) -> list[tuple[float, float]]:
    """(start, end) of each run of stage ``name``'s command, from its log."""
    lines = (repo / "log" / f"{name}.txt").read_text().split("\n")
    return [tuple(map(float, line.split())) for line in lines if line]


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The largest number of ``spans`` that overlap at one instant."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def four_stage_repo(path: Path, n_files: int, sleep_s: float) -> Path:
    """Four independent stages a..d; each sleeps ``sleep_s`` then writes ``n_files`` new files."""
    stages = {n: {"cmd": f"python work.py {n} {n_files} {sleep_s}", "deps": ["work.py"], "outs": [f"out_{n}"]}
              for n in "abcd"}
    return init_repo(path, stages, {"work.py": WORK_PY})


def test_independent_stages_overlap_and_succeed(tmp_path, dvc_env):
    """Four independent 2 s stages at concurrency 2: all succeed, two commands at a time.

    The stage commands run in parallel (DVC releases its repo lock while a command runs), never more
    than ``concurrency`` at once. (The real DAG, shrunk, runs through this runner at concurrency 2
    in tests/test_dvc_pipeline.py.)
    """
    repo = four_stage_repo(tmp_path, n_files=3, sleep_s=2.0)
    for attempt in range(1):
        if attempt:  # a changed dependency: every stage runs again
            (repo / "work.py").write_text(WORK_PY + "# again\n")
        status = run(repo, None, concurrency=2)
        assert status == dict.fromkeys("abcd", "ok"), f"run {attempt}: {status}"
        spans = [intervals(repo, n)[attempt] for n in "abcd"]
        assert most_at_once(spans) == 2, f"run {attempt}: commands did not overlap (or exceeded 2): {spans}"
    out = subprocess.run(["dvc", "status"], cwd=repo, capture_output=True, text=True, check=True)
    assert "up to date" in out.stdout, out.stdout


def test_a_stage_waits_while_another_dvc_process_holds_the_repo_lock(tmp_path, dvc_env):
    """A stage finishes even when DVC's repo lock is held for 6 s when it wants it back.

    Guards issue 7, item 5 deterministically: the test takes DVC's own repo lock (as another
    `dvc repro` caching a large output does) while stage ``w``'s command runs, and holds it past
    the command's end, so `dvc repro` must take the lock again to cache ``w``'s output and write
    dvc.lock. Before the fix it gave up after 3 s and ``w`` failed.
    """
    from dvc.lock import make_lock

    stages = {
        "w": {"cmd": "python work.py w 3 0.2 log/held", "deps": ["work.py"], "outs": ["out_w"]},
        "v": {"cmd": "python work.py v 3 0.2", "deps": ["work.py"], "outs": ["out_v"]},
    }
    repo = init_repo(tmp_path, stages, {"work.py": WORK_PY})
    held: list[float] = []

    def hold_lock() -> None:
        started = repo / "log" / "w.started"
        deadline = time.time() + 300
        while not started.exists() and time.time() < deadline:
            time.sleep(0.05)
        lock = make_lock(str(repo / ".dvc" / "tmp" / "lock"), tmp_dir=str(repo / ".dvc" / "tmp"))
        lock.lock()  # free: `dvc repro` releases it while the stage's command runs
        try:
            held.append(time.time())
            (repo / "log" / "held").write_text("")
            time.sleep(6.0)
        finally:
            held.append(time.time())
            lock.unlock()

    holder = threading.Thread(target=hold_lock, daemon=True)
    holder.start()
    status = run(repo, None, concurrency=2)
    holder.join(timeout=60)
    assert len(held) == 2, "the test never held the lock"
    assert status == {"w": "ok", "v": "ok"}, status
    (w_start, w_end), = intervals(repo, "w")
    assert held[0] < w_end < held[1]  # the command ended while the lock was held
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"w", "v"}
