"""Build a small elastic GPT and run it at several sub-network sizes (any TP/PP, under torchrun).

Prints, per sub-network: the spec, its parameter count, the LM loss on a fixed batch and the
forward time. The weights are random (the loss sits near ln(vocab)): this shows the mechanics and
the cost of nested sub-networks; examples/ and the converter bring real pretrained weights.

  python tools/demo_subnetworks.py
  torchrun --nproc-per-node 2 tools/demo_subnetworks.py --tensor-model-parallel-size 2
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.cli import ArgumentParser, run_main  # noqa: E402
from megatron_flextron.config import ElasticConfig, ModelConfig  # noqa: E402
from megatron_flextron.elastic import (  # noqa: E402
    build_elastic_model,
    count_parameters,
    set_subnetwork,
)
from megatron_flextron.lm_step import forward_backward  # noqa: E402
from megatron_flextron.parallel import destroy_model_parallel, initialize_model_parallel  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=["gpt3", "llama"], default="llama")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--ffn-hidden-size", type=int, default=768)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument(
        "--num-query-groups", type=int, default=None, help="default: 2 for llama, MHA for gpt3"
    )
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--repeats", type=int, default=3, help="timed forward passes per sub-network")
    p.add_argument(
        "--subnetwork",
        action="append",
        default=None,
        help="a sub-network spec (JSON); repeatable. Default: a ladder of sizes",
    )
    return p.parse_args(argv)


def default_subnetworks(model: ModelConfig, elastic: ElasticConfig) -> list:
    specs = [None]
    for width, heads in zip(
        elastic.mlp_choices[1:], elastic.head_choices[1:] or elastic.head_choices
    ):
        specs.append({"mlp": width, "heads": heads})
    n, choices = model.num_layers, elastic.mlp_choices
    specs.append({"mlp": [choices[i % len(choices)] for i in range(n)]})  # heterogeneous
    specs.append({"layers": list(range(0, n, 2)) + ([n - 1] if (n - 1) % 2 else [])})  # depth
    return specs


def _main(argv=None):
    args = parse_args(argv)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    initialize_model_parallel(tp, pp, seed=args.seed)
    groups = args.num_query_groups or (2 if args.family == "llama" else None)
    model_cfg = ModelConfig(
        args.family,
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=groups,
        vocab_size=args.vocab_size,
        max_position_embeddings=args.seq_length,
    )
    elastic = ElasticConfig.from_ratios(model_cfg, tensor_model_parallel_size=tp)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_elastic_model(model_cfg, model_cfg.transformer_config(tp, pp)).to(device)
    model.eval()

    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(
        0, args.vocab_size, (args.micro_batch_size, args.seq_length + 1), generator=g
    )
    batch = [{"tokens": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device)}]

    specs = args.subnetwork or default_subnetworks(model_cfg, elastic)
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        print(
            f"{args.family} elastic GPT, TP={tp} PP={pp}, {device.type}; MLP choices "
            f"{list(elastic.mlp_choices)}, head choices {list(elastic.head_choices)}"
        )
        print("random weights: losses sit near ln(vocab); a TP>1 run initialises another model")
        print(f"{'sub-network':<44}{'params (M)':>11}{'loss':>9}{'fwd ms':>9}{'vs full':>9}")
    full_ms = None
    for spec in specs:
        subnet = set_subnetwork(model, spec, model_cfg, elastic)
        times = []
        with torch.no_grad():
            for _ in range(args.repeats + 1):
                t0 = time.perf_counter()
                loss = forward_backward(model, batch, forward_only=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        ms = statistics.median(times[1:]) * 1e3
        full_ms = full_ms or ms
        params = count_parameters(subnet, model_cfg)["total"] / 1e6
        if rank0:
            label = "full" if spec is None else json.dumps(subnet.to_dict(), separators=(",", ":"))
            print(
                f"{label[:43]:<44}{params:>11.2f}{loss['loss']:>9.4f}{ms:>9.1f}{ms / full_ms:>9.2f}"
            )
    destroy_model_parallel()


def main(argv=None) -> int:
    return run_main(lambda: _main(argv))


if __name__ == "__main__":
    main()
