"""Shared test helpers: a loopback HTTP server serving a directory, small MP4s of known frames.

``http_server`` serves ``tmp_path / "www"`` on 127.0.0.1 and records every request; a path in
``fail_first`` answers 503 that many times before it is served (to exercise retries).
``marker_frames`` makes frames whose index can be read back after lossy coding (uniform gray
levels); ``make_video`` writes them (or given frames) to an H.264 MP4.
"""
from __future__ import annotations

import os

# Prefect's INFO log of its temporary server stopping, at interpreter exit, hits pytest's closed
# stdout ("Logging error"): keep Prefect to warnings before any test imports it.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import functools  # noqa: E402
import threading
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from pipeline.video import encode_video

MARKER_BASE, MARKER_STEP, MARKER_MAX = 10, 6, 40


@dataclass
class LoopbackServer:
    root: Path
    base_url: str
    requests: list[tuple[str, str]] = field(default_factory=list)
    fail_first: dict[str, int] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def gets(self, path: str) -> int:
        """How many GET requests asked for ``path`` (``/name.mp4``)."""
        return sum(1 for method, p in self.requests if method == "GET" and p == path)


class _Handler(SimpleHTTPRequestHandler):
    state: LoopbackServer

    def _record(self) -> bool:
        """Log the request; True when it was answered with a 503 from ``fail_first``."""
        state = self.state
        state.requests.append((self.command, self.path))
        if state.fail_first.get(self.path, 0) > 0:
            state.fail_first[self.path] -= 1
            self.send_error(503, "try again")
            return True
        return False

    def do_GET(self):
        if not self._record():
            super().do_GET()

    def do_HEAD(self):
        if not self._record():
            super().do_HEAD()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[LoopbackServer]:
    """An HTTP server on 127.0.0.1 serving ``tmp_path / "www"`` (created empty)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = type("Handler", (_Handler,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    handler.state = LoopbackServer(root, f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler.state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def marker_frames(n: int, height: int = 32, width: int = 48) -> np.ndarray:
    """``n`` RGB frames; frame k is a uniform gray of level 10 + 6k (n <= 40)."""
    if n > MARKER_MAX:
        raise ValueError(f"at most {MARKER_MAX} marker frames, asked for {n}")
    levels = MARKER_BASE + MARKER_STEP * np.arange(n, dtype=np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (n, height, width, 3)).copy()


def marker_index(frames: np.ndarray) -> np.ndarray:
    """The frame index of each decoded marker frame (its mean gray level, rounded)."""
    means = frames.reshape(len(frames), -1).mean(axis=1)
    return np.rint((means - MARKER_BASE) / MARKER_STEP).astype(int)


@pytest.fixture
def make_video():
    """``make_video(path, n=30, fps=10, width=48, height=32, frames=None)``: write an MP4.

    Without ``frames``, frame k is ``marker_frames``' k-th frame.
    """

    def make(path: Path, n: int = 30, fps: float = 10, width: int = 48, height: int = 32,
             frames: np.ndarray | None = None) -> Path:
        if frames is None:
            frames = marker_frames(n, height, width)
        return encode_video(frames, path, fps, crf=18)

    return make
