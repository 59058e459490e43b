#!/usr/bin/env bash
# Train Flextron's static router for a checkpoint against latency measured on this machine, then
# evaluate the router's architecture for every budget on held-out text.
#   bash examples/train_router.sh [CKPT] [extra tools/train_router.py flags]
# CKPT defaults to the output of examples/pretrain_flextron.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
export PYTHONWARNINGS=ignore
CKPT=${1:-runs/pretrain_flextron/elastic}
shift || true
SEQ=${SEQ:-128}
BUDGETS=${BUDGETS:-"1.0 0.85 0.7 0.55"}
DEVICE=$("$PY" -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")
TABLE="$CKPT/latency_${DEVICE}_seq${SEQ}.json"
echo "== 1. latency table on this $DEVICE (batch 1 x $SEQ tokens) -> $TABLE"
"$PY" tools/measure_latency.py --load "$CKPT" --seq-length "$SEQ" --output "$TABLE"
echo "== 2. surrogate (phase 1) and router (phase 2), latency budgets: $BUDGETS"
# shellcheck disable=SC2086
"$PY" tools/train_router.py --load "$CKPT" --cost-metric latency --latency-table "$TABLE" \
  --router-budgets $BUDGETS "$@"
echo "== 3. held-out loss of the router's architecture per budget (Wikipedia test, 32 x $SEQ)"
# shellcheck disable=SC2086
"$PY" tools/evaluate.py --load "$CKPT" --wiki-split test --seq-length "$SEQ" --max-sequences 32 \
  --budget-list $BUDGETS | grep '^|'
