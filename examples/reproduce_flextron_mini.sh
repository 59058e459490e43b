#!/usr/bin/env bash
# A miniature reproduction of Flextron's claim on SmolLM2-135M: one elastic run of T tokens gives
# sub-networks at least as good as pruning alone, and as good as pruning each shape and training it
# separately on the same T tokens in total.
#
#   bash examples/reproduce_flextron_mini.sh              # PRESET gpu (one GPU) or cpu (reduced)
#   PRESET=smoke bash examples/reproduce_flextron_mini.sh # the CI form: 4 layers, a few steps
#
# Methods (shapes: the homogeneous sub-networks of budgets 1.0 0.75 0.5 0.35, i.e. MLP width and
# heads per KV group nearest to budget x full):
#   prune-only      baseline A: importance ranking, each shape cut out, no training; its
#                   budget 1.0 is the original model (ranking only permutes units)
#   prune+finetune  baseline B: each shape trained alone from the ranked model for T/4 tokens
#                   (T split evenly over the 4 shapes), same loss as Flextron's budget
#                   micro-batches: LM + KD from the original model
#   flextron        ranking + elastic training over all budgets for T tokens (LM + in-place KD)
#   flextron+router the static router's architecture for latency budgets, against a latency
#                   table measured on this machine
# Every method is evaluated on the Wikipedia test split (perplexity) and on zero-shot
# multiple-choice tasks built from it; each sub-network's forward time is measured. Results:
# $OUT/results.md, $OUT/results.csv, $OUT/results.png (and $OUT/eval/*.json).
# Environment: OUT (default runs/reproduce_mini_$PRESET), PRESET (gpu | cpu | smoke),
# PARALLEL_BASELINES (1: train baseline B's shapes concurrently; default 1 for gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
export PYTHONWARNINGS=ignore
if [ -z "${PRESET:-}" ]; then
  PRESET=$("$PY" -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")
fi
OUT=${OUT:-runs/reproduce_mini_$PRESET}
SHAPES=(1.0 0.75 0.5 0.35)
ROUTER_BUDGETS=(1.0 0.85 0.7 0.6)

# layers: a cut of SmolLM2 (the reduced forms: first and last layers) or all 30; iters: Flextron's iterations (each
# baseline-B shape gets iters/4); router: surrogate architectures, steps, allowed error.
case "$PRESET" in
  gpu)   layers=all; seq=1024; mbs=8; gbs=32; iters=120; evalseqs=64;  mc=100; calib=(32 512)
         router=(96 2000 500 0.1); extra=(--bf16); latency=(--bf16 --micro-batch-size 8)
         evalflags=(--bf16) ;;
  cpu)   layers=6;   seq=128;  mbs=2; gbs=8;  iters=40;  evalseqs=16;  mc=60;  calib=(16 128)
         router=(48 1000 300 0.2); extra=(); latency=(); evalflags=() ;;
  smoke) layers=4;   seq=64;   mbs=2; gbs=4;  iters=8;   evalseqs=4;   mc=12;  calib=(8 64)
         router=(16 200 100 10); extra=(); latency=(); evalflags=() ;;
  *) echo "unknown PRESET=$PRESET (gpu, cpu or smoke)" >&2; exit 2 ;;
esac
PARALLEL_BASELINES=${PARALLEL_BASELINES:-$([ "$PRESET" = gpu ] && echo 1 || echo 0)}
T=$((gbs * seq * iters))
echo "== preset $PRESET: SmolLM2-135M ($layers layers), T = $T training tokens per method" \
  "(seq $seq, global batch $gbs, $iters iterations; baseline B: $((iters / 4)) per shape)"
start=$(date +%s)
stage() { echo "== $1 [$(( $(date +%s) - start )) s]"; }
mkdir -p "$OUT/eval" "$OUT/logs"
fail() {  # fail WHAT LOG: the end of the log, then stop
  echo "$1 failed; the end of $2:" >&2
  tail -n 30 "$2" >&2
  exit 1
}
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # no background training outlives the script

if [ ! -f "$OUT/ranked/latest_checkpointed_iteration.txt" ]; then
  stage "1. SmolLM2 GGUF -> importance-ranked flextron checkpoint"
  GGUF=$("$PY" -c "from megatron_flextron.convert.formats.gguf import bundled_smollm2 as f; print(f())")
  cut=()
  if [ "$layers" != all ]; then  # the first and the last layers (a cut that keeps the output
    # layers starts far closer to the model: held-out loss 11 instead of 18 for 6 layers)
    keep="$(seq -s, 0 $((layers / 2 - 1))),$(seq -s, $((30 - (layers + 1) / 2)) 29)"
    cut=(--subnetwork "{\"layers\": [$keep]}")
  fi
  rm -rf "$OUT/ranked"
  "$PY" tools/convert_checkpoint.py --loader gguf --saver flextron --load-dir "$GGUF" \
    --save-dir "$OUT/ranked" "${cut[@]}" --head-choices 1,0.667,0.333 \
    --mlp-choices 1,0.75,0.5,0.25 --calibration-data wiki --calibration-samples "${calib[0]}" \
    --calibration-seq-length "${calib[1]}" > "$OUT/logs/convert.log" 2>&1 ||
    fail conversion "$OUT/logs/convert.log"
  tail -n 1 "$OUT/logs/convert.log"
fi
DATA="$OUT/data/wiki_train_text_document"
if [ ! -f "$DATA.idx" ]; then
  stage "2. tokenize the Wikipedia train split; multiple-choice tasks from the test split"
  "$PY" tools/preprocess_data.py --input wiki:train --output-prefix "$OUT/data/wiki_train" \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$OUT/ranked/tokenizer" --append-eod
fi
for kind in cloze continuation; do
  [ -f "$OUT/data/$kind.jsonl" ] || "$PY" tools/make_mc_tasks.py --kind "$kind" --count "$mc" \
    --split test --output "$OUT/data/$kind.jsonl" >/dev/null
done

train() {  # train OUTDIR ITERS [flags...]: elastic training from the ranked checkpoint
  local save=$1 n=$2
  shift 2
  "$PY" tools/torchrun.py --standalone --nproc-per-node 1 tools/pretrain_flextron.py \
    --load "$OUT/ranked" --save "$OUT/$save" --data-path "$DATA" --split 99,1,0 \
    --seq-length "$seq" --micro-batch-size "$mbs" --global-batch-size "$gbs" --train-iters "$n" \
    --lr 1e-4 --min-lr 1e-5 --lr-warmup-iters $((n / 10)) --weight-decay 0.01 --clip-grad 1.0 \
    --eval-interval "$n" --eval-iters 1 --log-interval $((n / 4 > 0 ? n / 4 : 1)) \
    --save-interval "$n" --metrics-file "$OUT/logs/$save.metrics.jsonl" "${extra[@]}" "$@" \
    > "$OUT/logs/$save.log" 2>&1 || fail "training $save" "$OUT/logs/$save.log"
  grep -E "^ *iteration" "$OUT/logs/$save.log" || true
}
evaluate() {  # evaluate NAME LABEL CKPT [flags...] -> $OUT/eval/NAME.json
  local name=$1 label=$2 ckpt=$3
  shift 3
  [ -f "$OUT/eval/$name.json" ] && return
  "$PY" tools/evaluate.py --load "$OUT/$ckpt" --wiki-split test --seq-length "$seq" \
    --max-sequences "$evalseqs" --micro-batch-size "$mbs" --measure-latency \
    --mc-tasks "$OUT/data/cloze.jsonl" "$OUT/data/continuation.jsonl" --label "$label" \
    --output "$OUT/eval/$name.json" "${evalflags[@]}" "$@" > "$OUT/logs/eval_$name.log" 2>&1 ||
    fail "evaluation $name" "$OUT/logs/eval_$name.log"
  grep "^|" "$OUT/logs/eval_$name.log" || true
}

stage "3. baseline A (prune-only; its budget 1.0 is the original model)"
evaluate prune-only prune-only ranked --budget-list "${SHAPES[@]}"

stage "4. Flextron: elastic training over budgets ${SHAPES[*]} ($iters iterations, $T tokens)"
[ -f "$OUT/flextron/latest_checkpointed_iteration.txt" ] || \
  train flextron "$iters" --budget-list "${SHAPES[@]}" --distill inplace
evaluate flextron flextron flextron --budget-list "${SHAPES[@]}"

stage "5. baseline B: each shape pruned and trained alone ($((iters / 4)) iterations each)"
# PARALLEL_BASELINES=1 (the gpu preset's default) trains the four shapes at once: each is a
# small job that leaves most of a GPU idle. Their evaluations (which time the forward pass) run
# one at a time.
pids=()
for b in "${SHAPES[@]}"; do
  [ -f "$OUT/finetune_$b/latest_checkpointed_iteration.txt" ] && continue
  if [ "$PARALLEL_BASELINES" = 1 ]; then
    train "finetune_$b" $((iters / 4)) --budget-list "$b" --original-model-sample-prob 0 \
      --distill frozen &
    pids+=($!)
  else
    train "finetune_$b" $((iters / 4)) --budget-list "$b" --original-model-sample-prob 0 \
      --distill frozen
  fi
done
for pid in "${pids[@]}"; do wait "$pid" || true; done  # each job's failure: reported below
for b in "${SHAPES[@]}"; do
  [ -f "$OUT/finetune_$b/latest_checkpointed_iteration.txt" ] ||
    fail "training finetune_$b" "$OUT/logs/finetune_$b.log"
  evaluate "prune+finetune-$b" prune+finetune "finetune_$b" --budget-list "$b"
done

stage "6. static router over measured latency: budgets ${ROUTER_BUDGETS[*]}"
TABLE="$OUT/flextron/latency_table.json"
if [ ! -f "$OUT/flextron/router/router.json" ] && [ ! -f "$OUT/eval/flextron+router.json" ]; then
  "$PY" tools/measure_latency.py --load "$OUT/flextron" --seq-length "$seq" "${latency[@]}" \
    --output "$TABLE" > "$OUT/logs/latency.log" 2>&1 || fail "latency table" "$OUT/logs/latency.log"
  grep "measured_ms" "$OUT/logs/latency.log" || true
  "$PY" tools/train_router.py --load "$OUT/flextron" --cost-metric latency --latency-table "$TABLE" \
    --router-budgets "${ROUTER_BUDGETS[@]}" --num-architectures "${router[0]}" \
    --surrogate-steps "${router[1]}" --router-steps "${router[2]}" \
    --max-surrogate-error "${router[3]}" > "$OUT/logs/router.log" 2>&1 ||
    fail "router training" "$OUT/logs/router.log"
  grep '^{' "$OUT/logs/router.log" || true
fi
evaluate flextron+router flextron+router flextron --budget-list "${ROUTER_BUDGETS[@]}"

stage "7. report"
"$PY" tools/make_report.py --output-prefix "$OUT/results" \
  --title "SmolLM2-135M ($layers layers), T=$T tokens, preset $PRESET" \
  --inputs "$OUT/eval/prune-only.json" \
  "$OUT"/eval/prune+finetune-*.json "$OUT/eval/flextron.json" "$OUT/eval/flextron+router.json"
echo "== done in $(( $(date +%s) - start )) s (preset $PRESET)"
