"""Atomic outputs: the one implementation every writer of the pipeline uses.

A file or directory is written under a temporary sibling name, ``.<name>.tmp-<pid>-<token>``, and
renamed into place only when complete, so an output path holds either the previous complete output
or the new one, never a half-written one. A killed writer leaves its temporary sibling behind;
``clean_stale`` removes those of dead processes only (the pid in the name is checked), never the
temporary output of a writer that is still running.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

_TMP = re.compile(r"\.tmp-(\d+)-[0-9a-f]+$")
_OLD = re.compile(r"\.old-(\d+)-[0-9a-f]+$")


def tmp_sibling(path: Path | str, kind: str = "tmp") -> Path:
    """A fresh temporary sibling of ``path`` owned by this process: ``.<name>.<kind>-<pid>-<token>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM  # exists, owned by someone else
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def clean_stale(path: Path | str) -> list[Path]:
    """Remove the temporary siblings of ``path`` left by writers that are no longer running.

    Siblings of a live process (a concurrent writer, or this one) are kept. Returns what was removed.
    """
    path = Path(path)
    removed: list[Path] = []
    if not path.parent.exists():
        return removed
    for p in path.parent.glob(f".{path.name}.*-*"):
        m = _TMP.search(p.name) or _OLD.search(p.name)
        if m is None or p.name[: m.start()] != f".{path.name}":
            continue
        if pid_alive(int(m.group(1))):
            continue
        _remove(p)
        removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling path to write ``path``'s new content to (a file or a directory);
    on a clean exit it replaces ``path``, on an exception it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: nothing was written for {path}")
        replace(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)


def replace(tmp: Path | str, path: Path | str) -> None:
    """Move the finished ``tmp`` (file or directory) to ``path``, replacing what is there.

    A file is replaced by one ``os.replace``. A directory cannot be replaced in one step: the old one
    is first renamed aside (``.<name>.old-<pid>-<token>``), then removed after the new one is in place.
    """
    tmp, path = Path(tmp), Path(path)
    if not (tmp.is_dir() and path.exists()):
        os.replace(tmp, path)
        return
    old = tmp_sibling(path, "old")
    os.replace(path, old)
    os.replace(tmp, path)
    _remove(old)


def write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def dumps_json(obj: Any) -> str:
    """Canonical JSON (sorted keys, 2-space indent, trailing newline): same object, same bytes."""
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def write_json(path: Path | str, obj: Any) -> None:
    write_text(path, dumps_json(obj))
