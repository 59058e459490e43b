"""The mixture-of-experts shapes the MoE benchmarks build, from one Llama-style builder.

moe_slicing.py times ``TINY_MOE``, moe_ranking.py trains ``ranking_moe`` and moe_budgets.py
counts the parameters of ``qwen3_30b_a3b``; each is ``moe_config`` with the fields it changes.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.config import ModelConfig  # noqa: E402

# 2 layers, hidden 256, 8 experts of 512 neurons, top-2: large enough that the experts dominate
# a training step on one CPU thread
TINY_MOE = dict(
    num_layers=2,
    hidden_size=256,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=64,
    ffn_hidden_size=512,
    num_moe_experts=8,
    moe_ffn_hidden_size=512,
    moe_router_topk=2,
    vocab_size=1024,
    max_position_embeddings=256,
)


def moe_config(**overrides) -> ModelConfig:
    """A Llama-style MoE: ``TINY_MOE`` with ``overrides``."""
    return ModelConfig("llama", **{**TINY_MOE, **overrides})


def ranking_moe(vocab: int, seq: int, experts: int) -> ModelConfig:
    """4 layers, hidden 128, ``experts`` experts of 128 neurons, top-2: trainable on a CPU in
    minutes."""
    return moe_config(
        num_layers=4,
        hidden_size=128,
        ffn_hidden_size=128,
        kv_channels=32,
        vocab_size=vocab,
        max_position_embeddings=seq,
        num_moe_experts=experts,
        moe_ffn_hidden_size=128,
    )


def qwen3_30b_a3b() -> ModelConfig:
    """Qwen3-30B-A3B's shape: 48 layers, hidden 2048, 32 query heads in 4 KV groups, 128 experts
    of 768 neurons, top-8, vocab 151,936."""
    return moe_config(
        num_layers=48,
        hidden_size=2048,
        ffn_hidden_size=6144,
        num_attention_heads=32,
        num_query_groups=4,
        kv_channels=128,
        vocab_size=151936,
        max_position_embeddings=4096,
        qk_layernorm=True,
        tie_embeddings=False,
        num_moe_experts=128,
        moe_ffn_hidden_size=768,
        moe_router_topk=8,
    )
