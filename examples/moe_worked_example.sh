#!/usr/bin/env bash
# The worked example of docs/moe.md: a mixture of experts from transformers to an elastic
# flextron checkpoint, elastic training, a sub-network exported back to transformers, generation.
#   1. a tiny Qwen3-MoE (random init, 8 experts of 64 neurons, top-2) saved with save_pretrained,
#      with the bundled SmolLM2 tokenizer
#   2. tools/convert_checkpoint.py --loader hf --saver flextron --calibration-data wiki: experts
#      and their neurons ranked; expert choices 8/4, expert widths 64/32, top-k 2/1
#   3. the Wikipedia train split -> megatron .bin/.idx with that tokenizer
#   4. torchrun tools/pretrain_flextron.py: budgets 1.0 and 0.5 of the active parameters (an
#      active budget keeps every expert and narrows experts, top-k and heads)
#   5. the half sub-network (4 experts of 32 neurons, top-1) exported with --saver hf
#   6. tools/generate.py on the flextron checkpoint at that sub-network, and transformers on the
#      export: the same greedy tokens
#
#   bash examples/moe_worked_example.sh     # CPU, about a minute or two; OUT=dir (runs/moe_example)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
export PYTHONWARNINGS=ignore
OUT=${OUT:-runs/moe_example}
SUB='{"experts": 4, "moe_ffn": 32, "topk": 1}'
PROMPT="The capital of France is"
rm -rf "$OUT"/{qwen3_moe,flextron,data,trained,hf_half,generated.jsonl}
mkdir -p "$OUT"
start=$(date +%s)

echo "== 1. a tiny Qwen3-MoE made with transformers (random weights), SmolLM2's tokenizer"
"$PY" - "$OUT/qwen3_moe" <<'EOF'
import os
import sys

import torch
import transformers

from megatron_flextron.convert.formats.gguf import bundled_smollm2

gguf = bundled_smollm2()  # the tokenizer inside the bundled SmolLM2 GGUF
tokenizer = transformers.AutoTokenizer.from_pretrained(
    os.path.dirname(gguf), gguf_file=os.path.basename(gguf)
)
config = transformers.Qwen3MoeConfig(
    vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=64, intermediate_size=128, norm_topk_prob=True,
    max_position_embeddings=256,
    tie_word_embeddings=False, initializer_range=0.1,
    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
)
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
EOF

echo "== 2. convert to flextron, ranking experts and their neurons on Wikipedia text"
# --mlp-choices 1,0.5 scales the three expert axes: experts 8/4, expert width 64/32, top-k 2/1
"$PY" tools/convert_checkpoint.py --loader hf --saver flextron --load-dir "$OUT/qwen3_moe" \
  --save-dir "$OUT/flextron" --mlp-choices 1,0.5 \
  --calibration-data wiki --calibration-samples 16 --calibration-seq-length 64

echo "== 3. tokenize the Wikipedia train split"
"$PY" tools/preprocess_data.py --input wiki:train --output-prefix "$OUT/data/wiki_train" \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$OUT/flextron/tokenizer" --append-eod

echo "== 4. elastic training under torchrun: budgets 1.0 and 0.5 of the active parameters"
"$PY" tools/torchrun.py --standalone --nproc-per-node 1 tools/pretrain_flextron.py \
  --load "$OUT/flextron" --save "$OUT/trained" \
  --data-path "$OUT/data/wiki_train_text_document" --split 99,1,0 \
  --seq-length 64 --micro-batch-size 2 --global-batch-size 4 --train-iters 6 \
  --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 1 --budget-list 1.0 0.5 --budget-type active \
  --mlp-choices 1 0.5 --distill inplace --eval-interval 6 --eval-iters 1 --log-interval 2 \
  --save-interval 6

echo "== 5. export the sub-network $SUB to transformers"
"$PY" tools/convert_checkpoint.py --loader flextron --saver hf --load-dir "$OUT/trained" \
  --save-dir "$OUT/hf_half" --subnetwork "$SUB"

echo "== 6. generate: the elastic model at that sub-network, then transformers on the export"
"$PY" tools/generate.py --load "$OUT/trained" --subnetwork "$SUB" --prompt "$PROMPT" \
  --max-new-tokens 8 --greedy | tee "$OUT/generated.jsonl"
"$PY" - "$OUT/hf_half" "$OUT/generated.jsonl" "$PROMPT" <<'EOF'
import json
import sys

import torch
import transformers

directory, generated, prompt = sys.argv[1:]
tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
ids = tokenizer(prompt, return_tensors="pt").input_ids
new = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
print(json.dumps({"transformers": model.config.model_type, "experts": model.config.num_experts,
                  "topk": model.config.num_experts_per_tok, "tokens": new,
                  "text": tokenizer.decode(new)}))
lines = [line for line in open(generated) if line.startswith("{")]
elastic = json.loads(lines[-1])["tokens"]
if new != elastic:
    sys.exit(f"transformers generated {new}, the elastic sub-network {elastic}")
print("transformers on the export continues exactly as the elastic sub-network")
EOF
echo "== done in $(( $(date +%s) - start )) s; checkpoints in $OUT"
