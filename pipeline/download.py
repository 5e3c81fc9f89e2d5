"""Verified downloads: only from the schemes and hosts the params name, checked by sha256.

``fetch`` streams a URL to a temporary file next to its destination, verifies the digest and
renames the file into place, so the destination holds either the verified file or nothing.
Redirects are followed only to allowed schemes and hosts.
"""
from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

from tqdm import tqdm

from pipeline.atomic import atomic_path

CHUNK = 1 << 20
TIMEOUT_S = 60


def check_url(url: str, allowed_schemes: Sequence[str], allowed_hosts: Sequence[str]) -> None:
    """Raise ValueError unless ``url``'s scheme and host are in the allowed lists."""
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in {s.lower() for s in allowed_schemes}:
        raise ValueError(
            f"refusing to download {url!r}: scheme {scheme!r} is not in the allowed schemes {list(allowed_schemes)}"
        )
    if host not in {h.lower() for h in allowed_hosts}:
        raise ValueError(
            f"refusing to download {url!r}: host {host!r} is not in the allowed hosts {list(allowed_hosts)}"
        )


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only when its target passes ``check_url``."""

    def __init__(self, allowed_schemes: Sequence[str], allowed_hosts: Sequence[str]):
        self.allowed_schemes = allowed_schemes
        self.allowed_hosts = allowed_hosts

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_url(newurl, self.allowed_schemes, self.allowed_hosts)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(
    url: str,
    dest: Path,
    sha256: str | None,
    allowed_schemes: Sequence[str],
    allowed_hosts: Sequence[str],
    desc: str | None = None,
) -> Path:
    """Download ``url`` to ``dest``, verifying ``sha256`` (when given); returns ``dest``.

    On any failure (refused URL or redirect, HTTP error, digest mismatch) nothing is left at
    ``dest`` and no temporary file remains.
    """
    check_url(url, allowed_schemes, allowed_hosts)
    dest = Path(dest)
    opener = urllib.request.build_opener(_CheckedRedirects(allowed_schemes, allowed_hosts))
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as out:
            digest = _stream(opener, url, out, desc or dest.name)
        if sha256 is not None and digest != sha256.lower():
            raise ValueError(f"{url}: sha256 mismatch: expected {sha256.lower()}, got {digest}")
    return dest


def _stream(opener: urllib.request.OpenerDirector, url: str, out, desc: str) -> str:
    """Copy the response body of ``url`` to ``out`` with a progress bar; return its sha256."""
    h = hashlib.sha256()
    try:
        with opener.open(url, timeout=TIMEOUT_S) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=desc) as bar:
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
    except urllib.error.URLError as exc:
        raise OSError(f"download of {url} failed: {exc}") from exc
    return h.hexdigest()
