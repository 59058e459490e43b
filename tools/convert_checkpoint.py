"""Convert checkpoints into and out of megatron_flextron (in the style of Megatron's convert.py).

  python tools/convert_checkpoint.py --loader gguf --saver flextron \\
      --load-dir SmolLM2.gguf --save-dir ckpt/smollm2 --calibration-data wiki
  python tools/convert_checkpoint.py --loader flextron --saver hf \\
      --load-dir ckpt/smollm2 --save-dir out/smollm2-half --subnetwork '{"mlp": 768, "heads": 6}'

Loaders: hf (transformers dir: Llama, Mistral, Qwen2, Qwen3, GPT-2; mixtures of experts: Mixtral,
Qwen2-MoE, Qwen3-MoE), gguf (Llama family, Qwen3),
megatron (Megatron-LM torch_dist checkpoints: the root or one iteration folder), megatron_legacy
(Megatron GPT-3 torch checkpoints; unpickles the file: convert only checkpoints you trust),
flextron.
Every loader is exact or refuses (exit 2) naming the field or tensor it cannot represent.
Savers: flextron (elastic, Megatron-Core dist checkpoint + config), hf, megatron (dense, stock),
gguf (one model.gguf for llama.cpp: llama, qwen3, deci for per-layer sub-networks, or gpt2).
A failed conversion exits non-zero and leaves nothing at --save-dir.

Importance ranking sharded over tensor/pipeline parallelism (each rank holds its shard of the
model; the checkpoint is written by all ranks, dealt for that TP size):
  torchrun --nproc-per-node 4 tools/convert_checkpoint.py --loader hf --saver flextron \\
      --load-dir hf/llama --save-dir ckpt/llama --calibration-data wiki \\
      --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Before torch loads OpenMP: idle threads sleep instead of spinning. On a busy machine the
# spinning threads burned 14.1 CPU-s per ranking sequence instead of 1.9 (docs/ranking.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from megatron_flextron.cli import ArgumentParser, check_output, run_main  # noqa: E402
from megatron_flextron.compat.memory import return_freed_tensors_to_the_os  # noqa: E402
from megatron_flextron.config import DEFAULT_RATIOS  # noqa: E402
from megatron_flextron.convert import (  # noqa: E402
    GGUF_TYPES,
    LOADERS,
    PARAMS_DTYPES,
    SAVERS,
    ConvertOptions,
    convert,
)
from megatron_flextron.training.arguments import positive_int  # noqa: E402


def _ratios(text: str):
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ratios, got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"ratios must lie in (0, 1], got {text!r}")
    return values


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--loader", required=True, choices=LOADERS)
    p.add_argument("--saver", required=True, choices=SAVERS)
    p.add_argument("--load-dir", required=True, help="source directory (gguf: the .gguf file)")
    p.add_argument(
        "--save-dir", required=True, help="output directory (must not exist or be empty)"
    )
    p.add_argument(
        "--params-dtype",
        choices=sorted(PARAMS_DTYPES),
        help="write the weights in this dtype (default: the source's, e.g. bf16 stays bf16)",
    )
    p.add_argument(
        "--gguf-type",
        choices=GGUF_TYPES,
        help="--saver gguf: tensor type of the matrices (default: the source's dtype)",
    )
    p.add_argument(
        "--tokenizer-model",
        help="tokenizer to carry into the output (a folder, tokenizer.json or sentencepiece "
        ".model), e.g. when a Megatron checkpoint's tokenizer_model is not on this machine",
    )
    p.add_argument(
        "--target-tensor-parallel-size",
        type=positive_int,
        help="TP size the checkpoint is dealt for (default 1; under torchrun the "
        "--tensor-model-parallel-size)",
    )
    p.add_argument("--target-pipeline-parallel-size", type=positive_int, default=1)
    p.add_argument(
        "--tensor-model-parallel-size",
        type=positive_int,
        default=1,
        help="TP size of the model that ranks units (under torchrun)",
    )
    p.add_argument(
        "--pipeline-model-parallel-size",
        type=positive_int,
        default=1,
        help="PP size of the model that ranks units (under torchrun)",
    )
    p.add_argument("--subnetwork", help="export this sub-network (JSON or a JSON file)")
    p.add_argument("--budget", type=float, help="export the static router's choice for a budget")
    p.add_argument(
        "--calibration-data",
        help="rank units by importance on this data (flextron "
        "saver): a text file, a jsonl of token lists, or 'wiki' (bundled corpus)",
    )
    p.add_argument("--calibration-samples", type=positive_int, default=64)
    p.add_argument("--calibration-seq-length", type=positive_int, default=256)
    p.add_argument(
        "--head-estimator",
        default="auto",
        choices=["auto", "activation", "taylor", "taylor_token", "ablation"],
        help="head importance (docs/ranking.md); auto: taylor_token in the fast mode, the best "
        "on held-out loss in the thorough mode",
    )
    p.add_argument(
        "--ranking-mode",
        default="fast",
        choices=["fast", "thorough"],
        help="fast: fixed estimators, one pass over the calibration data; thorough: estimators "
        "chosen on held-out loss, then heads re-estimated after each cut (~3x the CPU time; "
        "docs/ranking.md)",
    )
    p.add_argument(
        "--mlp-choices",
        type=_ratios,
        default=DEFAULT_RATIOS,
        help="MLP width ratios of the elastic model (comma-separated)",
    )
    p.add_argument(
        "--head-choices",
        type=_ratios,
        default=DEFAULT_RATIOS,
        help="head-count ratios (rounded to what the layout can express)",
    )
    p.add_argument(
        "--megatron-model-class",
        choices=["hybrid", "gpt"],
        help="--saver megatron: megatron-core's HybridModel (default; what Megatron-LM trains "
        "today) or GPTModel (older installations; per-layer sub-networks are always GPTModel)",
    )
    return p.parse_args(argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_flextron.parallel import destroy_model_parallel, initialize_model_parallel

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ValueError(f"{world} processes do not hold TP={tp} x PP={pp}")
    if not os.path.exists(args.load_dir):
        raise ValueError(f"--load-dir {args.load_dir} does not exist")
    check_output(args.save_dir, "--save-dir", folder=True)
    return_freed_tensors_to_the_os()  # tensors of every size come and go: keep RSS honest
    initialize_model_parallel(tp, pp)
    rank = int(os.environ.get("RANK", "0"))
    opts = ConvertOptions(
        loader=args.loader,
        saver=args.saver,
        load_dir=args.load_dir,
        save_dir=args.save_dir,
        target_tensor_parallel_size=args.target_tensor_parallel_size or (tp if world > 1 else 1),
        target_pipeline_parallel_size=args.target_pipeline_parallel_size,
        subnetwork=args.subnetwork,
        budget=args.budget,
        calibration_data=args.calibration_data,
        mlp_ratios=args.mlp_choices,
        head_ratios=args.head_choices,
        ranking=dict(
            samples=args.calibration_samples,
            seq_length=args.calibration_seq_length,
            head_estimator=args.head_estimator,
            mode=args.ranking_mode,
        ),
        tokenizer_model=args.tokenizer_model,
        params_dtype=args.params_dtype,
        megatron_model_class=args.megatron_model_class,
        gguf_type=args.gguf_type,
    )
    t0 = time.time()
    try:
        ckpt = convert(opts)
    finally:
        destroy_model_parallel()
    if rank:
        return 0
    m = ckpt.model
    tokenizer = ckpt.metadata.get("tokenizer") or {}
    if tokenizer and not tokenizer.get("carried"):
        print(f"note: tokenizer {tokenizer['note']}", file=sys.stderr)
    print(
        json.dumps(
            {
                "saved": args.save_dir,
                "saver": args.saver,
                "family": m.family,
                "layers": m.num_layers,
                "ffn": m.ffn_hidden_size,
                "heads": m.num_attention_heads,
                "kv_groups": m.num_query_groups,
                "seconds": round(time.time() - t0, 1),
                **(
                    {"router_choice": ckpt.metadata["router_choice"]}
                    if "router_choice" in ckpt.metadata
                    else {}
                ),
            }
        )
    )
    return 0


def main(argv=None) -> int:
    return run_main(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
