#!/usr/bin/env bash
# Sets up .venv with btrm and its pinned dependencies. Idempotent: reinstalls only when pyproject.toml
# or the requested extras change.   ./setup.sh [EXTRAS]   (default: quickstart; tests use: dev)
# PYTHON: the interpreter (default python3; 3.11+). TORCH_INDEX: an index to take torch from, e.g.
# https://download.pytorch.org/whl/cpu for the CPU build (on Linux, PyPI's torch is the CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-quickstart}"
python="${PYTHON:-python3}"

too_old() { ! "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if too_old "$python"; then
  echo "setup.sh: btrm needs Python 3.11+; $python is $("$python" --version 2>&1 | head -1). Set PYTHON, e.g. PYTHON=python3.11 ./setup.sh" >&2
  exit 1
fi
if [ -x .venv/bin/python ] && too_old .venv/bin/python; then
  echo "setup.sh: .venv has $(.venv/bin/python --version 2>&1); making it anew with $python"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
fi
stamp=".venv/.btrm-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
  # torch first and alone, at the exact pin (from TORCH_INDEX where given), so that btrm's install keeps it.
  .venv/bin/pip install --quiet "torch==2.13.0" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
  .venv/bin/pip install --quiet -e ".[$extras]"
  echo "$want" >> "$stamp"
fi
echo "btrm is installed in .venv ($(.venv/bin/python -c 'import btrm; print(btrm.__version__)'), extras: $extras)"
