#!/usr/bin/env bash
# The bundled default: build a small elastic GPT and run it at several sub-network sizes.
# Installs what it needs on first use. Extra args go to tools/demo_subnetworks.py, e.g.
#   bash examples/quickstart.sh --tensor-model-parallel-size 2   (runs 2 ranks under torchrun)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
export PYTHONWARNINGS=ignore
NPROC=1
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --tensor-model-parallel-size|--pipeline-model-parallel-size) NPROC=$((NPROC * args[i + 1])) ;;
  esac
done
exec "$PY" tools/torchrun.py --standalone --nproc-per-node "$NPROC" \
  tools/demo_subnetworks.py "$@"
