#!/usr/bin/env bash
# Install what the tests need (scripts/setup_env.sh) and run the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$PY" -m pytest -q --durations=15 "$@"  # the 15 slowest tests, with their times
