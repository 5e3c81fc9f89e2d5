#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with the CPU build of torch and the project.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.installed
hash=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$hash" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first: the pinned release resolves to the local CPU build here; GPU machines may carry 2.11+.
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$hash" > "$stamp"
fi
# Headless Chromium for the report's browser test (tests/stages/test_report.py): Debian's package.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
  else
    echo "setup.sh: chromium is missing and this is not root: run 'sudo scripts/setup.sh'" \
         "(or 'sudo apt-get install chromium'); tests/stages/test_report.py fails without it" >&2
  fi
fi
# DVC needs a git repository (a fresh download of the sources may not be one).
[ -d .git ] || git init -q
