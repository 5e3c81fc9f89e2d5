"""pipeline.download against a real HTTP server on 127.0.0.1."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from pipeline.download import check_url, fetch

LOOPBACK = dict(allowed_schemes=["http"], allowed_hosts=["127.0.0.1"])


class _Handler(SimpleHTTPRequestHandler):
    """Serves a directory; paths in ``redirects`` answer 302 to the mapped URL."""

    redirects: dict[str, str] = {}

    def do_GET(self):
        if self.path in self.redirects:
            self.send_response(302)
            self.send_header("Location", self.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(directory: Path, redirects: dict[str, str] | None = None) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1; yields the base URL (``http://127.0.0.1:PORT``).

    ``redirects`` maps a request path to a URL, where ``{base}`` stands for the base URL and
    ``{port}`` for the port.
    """
    handler = type("Handler", (_Handler,), {"redirects": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    port = server.server_address[1]
    base = f"http://127.0.0.1:{port}"
    handler.redirects = {k: v.format(base=base, port=port) for k, v in (redirects or {}).items()}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield base
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    payload = bytes(range(256)) * 4096  # 1 MiB: more than one read chunk
    (root / "file.bin").write_bytes(payload)
    redirects = {
        "/same": "{base}/file.bin",
        "/elsewhere": "http://localhost:{port}/file.bin",
        "/to-https": "https://127.0.0.1:{port}/file.bin",
    }
    with serve(root, redirects) as base:
        yield base, payload


def test_fetch_downloads_and_verifies(served, tmp_path):
    base, payload = served
    dest = tmp_path / "out" / "file.bin"
    got = fetch(f"{base}/file.bin", dest, sha256_of(payload), **LOOPBACK)
    assert got == dest
    assert dest.read_bytes() == payload
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]


def test_fetch_without_digest_downloads(served, tmp_path):
    base, payload = served
    dest = fetch(f"{base}/file.bin", tmp_path / "file.bin", None, **LOOPBACK)
    assert dest.read_bytes() == payload


def test_checksum_mismatch_leaves_nothing(served, tmp_path):
    base, payload = served
    out = tmp_path / "out"
    url = f"{base}/file.bin"
    wrong = "0" * 64
    with pytest.raises(ValueError) as exc:
        fetch(url, out / "file.bin", wrong, **LOOPBACK)
    msg = str(exc.value)
    assert url in msg and wrong in msg and sha256_of(payload) in msg
    assert list(out.iterdir()) == []


def test_http_error_names_url_and_leaves_nothing(served, tmp_path):
    base, _ = served
    url = f"{base}/missing.bin"
    with pytest.raises(OSError, match="missing.bin"):
        fetch(url, tmp_path / "out" / "x.bin", None, **LOOPBACK)
    assert list((tmp_path / "out").iterdir()) == []


def test_disallowed_host_refused(served, tmp_path):
    base, _ = served
    url = base.replace("127.0.0.1", "localhost") + "/file.bin"
    with pytest.raises(ValueError, match=r"host 'localhost' is not in the allowed hosts \['127.0.0.1'\]"):
        fetch(url, tmp_path / "file.bin", None, **LOOPBACK)
    assert not (tmp_path / "file.bin").exists()


def test_disallowed_scheme_refused(tmp_path):
    with pytest.raises(ValueError, match=r"scheme 'file' is not in the allowed schemes \['http'\]"):
        fetch(f"file://127.0.0.1{tmp_path}/x", tmp_path / "x.bin", None, **LOOPBACK)
    with pytest.raises(ValueError, match="ftp://127.0.0.1/x"):
        check_url("ftp://127.0.0.1/x", ["http", "https"], ["127.0.0.1"])


def test_check_url_accepts_allowed_case_insensitively():
    check_url("HTTPS://Storage.GoogleAPIs.com/a.gz", ["https"], ["storage.googleapis.com"])


def test_redirect_within_allowed_host_followed(served, tmp_path):
    base, payload = served
    dest = fetch(f"{base}/same", tmp_path / "file.bin", sha256_of(payload), **LOOPBACK)
    assert dest.read_bytes() == payload


@pytest.mark.parametrize("path, refused", [("/elsewhere", "host 'localhost'"), ("/to-https", "scheme 'https'")])
def test_redirect_to_disallowed_target_refused(served, tmp_path, path, refused):
    base, _ = served
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=refused):
        fetch(f"{base}{path}", out / "file.bin", None, **LOOPBACK)
    assert list(out.iterdir()) == []
