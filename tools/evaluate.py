"""Perplexity of a flextron checkpoint, or of one of its sub-networks, at any TP/PP.

  python tools/evaluate.py --load ckpt/smollm2 --wiki-split test --subnetwork '{"mlp": 768}'
  torchrun --nproc-per-node 3 tools/evaluate.py --load ckpt/smollm2 \\
      --tensor-model-parallel-size 3 \\
      --tokens-jsonl data.jsonl

Prints one JSON line: loss (mean next-token NLL over every predicted position of every
sequence), ppl, tokens, sequences. --tokens-jsonl: one JSON list of token ids per line, each
sequence evaluated on its own (no packing, nothing added; longer than --seq-length + 1 tokens is
cut there). --text-file / --wiki-split: documents tokenized with the checkpoint's tokenizer, joined
with end-of-document tokens and cut into --seq-length windows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.convert.checkpoint import CheckpointError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="flextron checkpoint directory")
    p.add_argument("--subnetwork", help="sub-network spec (JSON or file); default: full model")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--text-file", help="plain text; documents separated by blank lines")
    data.add_argument("--tokens-jsonl", help="one JSON list of token ids per line")
    data.add_argument("--wiki-split", choices=["valid", "test"], help="the bundled corpus")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--max-sequences", type=int, default=None)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    return p.parse_args(argv)


def load_sequences(args, tokenizer_dir):
    from megatron_flextron.data.corpus import read_token_lists, token_sequences

    if args.tokens_jsonl:
        seqs = read_token_lists(args.tokens_jsonl, args.seq_length)
    else:
        source = f"wiki:{args.wiki_split}" if args.wiki_split else args.text_file
        seqs = token_sequences(source, tokenizer_dir, args.seq_length)
    seqs = seqs[: args.max_sequences]
    if not seqs:
        raise ValueError("no sequence to evaluate")
    return seqs


def evaluate(args) -> dict:
    from megatron_flextron.config import ElasticConfig, ModelConfig
    from megatron_flextron.convert.formats.flextron import load_flextron_into_model, read_config
    from megatron_flextron.elastic import build_gpt_model, count_parameters, set_subnetwork
    from megatron_flextron.training.lm_step import forward_backward, pad_microbatches

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    config = read_config(args.load)
    model_cfg = ModelConfig.from_dict(config["model"])
    elastic = (
        ElasticConfig.from_dict(config["elastic"])
        if config.get("elastic")
        else ElasticConfig.from_ratios(model_cfg, tensor_model_parallel_size=tp)
    )
    tokenizer = os.path.join(args.load, "tokenizer")
    seqs = load_sequences(args, tokenizer if os.path.isdir(tokenizer) else None)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_gpt_model(model_cfg, model_cfg.transformer_config(tp, pp)).to(device)
    load_flextron_into_model(model, args.load)
    model.eval()
    subnet = set_subnetwork(model, args.subnetwork, model_cfg, elastic)
    with torch.no_grad():
        out = forward_backward(model, pad_microbatches(seqs, args.micro_batch_size, device), True)
    loss = out["nll_sum"] / out["tokens"]
    return {
        "loss": round(loss, 6),
        "ppl": round(math.exp(loss), 4),
        "tokens": int(out["tokens"]),
        "sequences": len(seqs),
        "subnetwork": subnet.to_dict(),
        "params": count_parameters(subnet, model_cfg)["total"],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_flextron.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    try:
        result = evaluate(args)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_model_parallel()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
