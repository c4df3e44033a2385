#!/usr/bin/env bash
# Sets up .venv with btrm and its pinned dependencies. Idempotent: reinstalls only when pyproject.toml
# or the requested extras change.   ./setup.sh [EXTRAS]   (default: quickstart; tests use: dev)
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-quickstart}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
fi
stamp=".venv/.btrm-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
  # torch first and alone, at the exact pin: a looser request pulls a multi-GB CUDA build on CPU machines.
  .venv/bin/pip install --quiet "torch==2.13.0"
  .venv/bin/pip install --quiet -e ".[$extras]"
  echo "$want" >> "$stamp"
fi
echo "btrm is installed in .venv ($(.venv/bin/python -c 'import btrm; print(btrm.__version__)'), extras: $extras)"
