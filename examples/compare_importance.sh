#!/usr/bin/env bash
# SmolLM2-135M: held-out perplexity of prefix sub-networks in the source unit order vs after
# importance ranking (no training). Prints a markdown table.
#   bash examples/compare_importance.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
export PYTHONWARNINGS=ignore
OUT=${1:-runs/compare_importance}
GGUF=$("$PY" -c "from megatron_flextron.convert.formats.gguf import bundled_smollm2 as f; print(f())")
[ -d "$OUT/source" ] || "$PY" tools/convert_checkpoint.py --loader gguf --saver flextron \
  --load-dir "$GGUF" --save-dir "$OUT/source" --head-choices 1,0.667,0.333
[ -d "$OUT/ranked" ] || "$PY" tools/convert_checkpoint.py --loader gguf --saver flextron \
  --load-dir "$GGUF" --save-dir "$OUT/ranked" --head-choices 1,0.667,0.333 \
  --calibration-data wiki --calibration-samples 40 --calibration-seq-length 256
echo "| sub-network | params (M) | source order: loss | ranked: loss |"
echo "| --- | ---: | ---: | ---: |"
for spec in '{}' '{"mlp":1152}' '{"mlp":768}' '{"heads":6}' '{"mlp":768,"heads":6}' '{"mlp":384,"heads":3}'; do
  row=()
  for ckpt in source ranked; do
    row+=("$("$PY" tools/evaluate.py --load "$OUT/$ckpt" --wiki-split test --seq-length 256 \
      --max-sequences 32 --subnetwork "$spec" | tail -1)")
  done
  "$PY" - "$spec" "${row[@]}" <<'PYEOF'
import json, sys
spec, a, b = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"| `{spec}` | {a['params'] / 1e6:.1f} | {a['loss']:.3f} | {b['loss']:.3f} |")
PYEOF
done
