"""CSV manifests (one row per video) and file digests, shared by the gameplay stages."""
from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

from pipeline.atomic import write_text


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def one_line(message: object) -> str:
    """A message on one line (yt-dlp's messages carry carriage returns)."""
    return " ".join(str(message).split())


def write_manifest(path: Path | str, rows: list[dict], columns: list[str]) -> None:
    """Write ``rows`` as CSV with ``columns``, atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def read_manifest(path: Path | str) -> list[dict]:
    """The rows of a manifest (an empty list when there is none)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
