"""Common entry point for stage modules: ``python -m stages.<name> [--item ITEM]``."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from pipeline.config import ParamsError


def run_stage(main: Callable[..., object], *, foreach: tuple[str, ...] | None = None) -> None:
    parser = argparse.ArgumentParser()
    if foreach:
        parser.add_argument("--item", required=True, choices=list(foreach))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if foreach:
            main(args.item)
        else:
            main()
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
