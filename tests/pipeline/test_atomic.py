"""Atomic outputs: complete or untouched, and stale temporaries of dead writers only are cleaned."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.atomic import (
    atomic_path,
    clean_stale,
    pid_alive,
    tmp_sibling,
    write_json,
    write_text,
)


def test_atomic_file_and_directory(tmp_path):
    write_text(tmp_path / "a.txt", "one")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "a.txt").read_text() == "one"
    with atomic_path(tmp_path / "d") as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("1")
    with atomic_path(tmp_path / "d") as tmp:  # a directory replaces a directory
        tmp.mkdir()
        (tmp / "y").write_text("2")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["y"]
    write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d", "m.json"]


def test_clean_stale_keeps_a_live_writers_temporary(tmp_path):
    """Guards: clean_stale removed every temporary sibling, a concurrent live writer's included."""
    out = tmp_path / "store.zarr"
    live = tmp_sibling(out)  # this process: alive
    live.mkdir()
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    assert not pid_alive(dead_pid)
    dead = out.with_name(f".{out.name}.tmp-{dead_pid}-0badc0de")
    dead.mkdir()
    dead_old = out.with_name(f".{out.name}.old-{dead_pid}-0badc0de")
    dead_old.mkdir()
    other = tmp_path / f".store.zarr.backup.tmp-{dead_pid}-0badc0de"  # another output's sibling
    other.mkdir()
    removed = clean_stale(out)
    assert sorted(removed) == sorted([dead, dead_old])
    assert live.exists() and other.exists() and not dead.exists() and not dead_old.exists()
    assert pid_alive(os.getpid())
