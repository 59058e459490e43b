#!/usr/bin/env bash
# Create (once) and update the project's virtual environment in .venv, then print its python.
# Idempotent: a second run installs nothing new. Override the interpreter with PYTHON=...
# FLEXTRON_PYTHON=/path/to/python skips the environment and uses that interpreter as it is (a
# machine without a package registry whose python already has what requirements.txt lists).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${FLEXTRON_PYTHON:-}" ]; then
  echo "$FLEXTRON_PYTHON"
  exit 0
fi
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"' >&2
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv >&2
fi
stamp=.venv/.requirements.sha
want=$(cat requirements.txt requirements-megatron.txt requirements-data.txt setup.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch is pinned in requirements.txt and installed in the same command, so pip takes the
  # CPU wheel instead of pulling a multi-GB CUDA build.
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt >&2
  # its metadata asks for Python >= 3.12; the wheel runs on 3.11 (requirements-megatron.txt)
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --ignore-requires-python \
    -r requirements-megatron.txt >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-data.txt >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e . >&2
  echo "$want" > "$stamp"
fi
echo "$PWD/.venv/bin/python"
