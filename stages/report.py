"""Stage ``report``: ``reports/index.html``, one offline page of what the pipeline measured and made.

The library is ``pipeline/report.py``; this module only runs it at the repository root (DVC's
working directory). The page links the media of ``reports/<ds>/`` relatively and fetches nothing.
"""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.cli import run_stage
from pipeline.report import ReportError, run

log = logging.getLogger(__name__)


def main() -> None:
    try:
        path = run(Path("."))
    except ReportError as exc:
        raise SystemExit(f"error: {exc}") from exc
    log.info("wrote %s", path)


if __name__ == "__main__":
    run_stage(main)
