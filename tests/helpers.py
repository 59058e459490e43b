"""Shared test builders: tiny architectures, random canonical weights, a megatron train step."""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.elastic import build_gpt_model

SEQ, BATCH = 16, 2


def tiny_config(family: str, **overrides) -> ModelConfig:
    """3-4 layer models; vocab and widths divisible by TP up to 4."""
    if family == "gpt3":
        base = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8)
    else:
        base = dict(
            num_layers=4,
            hidden_size=64,
            ffn_hidden_size=128,
            num_attention_heads=8,
            num_query_groups=4,
            kv_channels=16,
        )
    base.update(vocab_size=128, max_position_embeddings=64)
    base.update(overrides)
    return ModelConfig(family, **base)


def elastic_choices(model: ModelConfig) -> ElasticConfig:
    return ElasticConfig.from_ratios(model, tensor_model_parallel_size=2)


def random_canonical_state(model: ModelConfig, seed: int = 0) -> dict:
    """Random weights (norms and biases too) of a TP=1 model: the canonical state dict."""
    torch.manual_seed(seed)
    gpt = build_gpt_model(model, model.transformer_config(), elastic=True)
    state = {}
    for name, p in gpt.named_parameters():
        base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
        state[name] = base + 0.05 * torch.randn_like(p)
    return state


def batch(seed: int = 1, vocab: int = 128):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def wrap_ddp(gpt, transformer_config):
    ddp_config = DistributedDataParallelConfig(
        overlap_grad_reduce=False, use_distributed_optimizer=False
    )
    return DistributedDataParallel(transformer_config, ddp_config, gpt)


def _loss_func(labels, logits):
    """Mean next-token NLL from vocab-parallel logits; also returns the gathered logits."""
    # Gather first: megatron's vocab-parallel cross entropy works in place on fp32 logits.
    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits.detach().clone())
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels).mean()
    return loss, {"loss": loss.detach().clone(), "logits": full}


def _forward_step(tokens, labels, data_iterator, model):
    position_ids = torch.arange(tokens.size(1)).expand_as(tokens)
    logits = model(tokens, position_ids, None)
    return logits, partial(_loss_func, labels)


def train_step(ddp_model, tokens, labels, forward_only: bool = False):
    """One megatron forward/backward (any PP stage); returns (loss, logits) on the last stage."""
    ddp_model.zero_grad_buffer()
    config = ddp_model.config
    config.finalize_model_grads_func = finalize_model_grads
    out = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, tokens, labels),
        data_iterator=iter([None]),
        model=[ddp_model],
        num_microbatches=1,
        seq_length=tokens.size(1),
        micro_batch_size=tokens.size(0),
        forward_only=forward_only,
    )
    if parallel_state.is_pipeline_last_stage():
        return out[0]["loss"], out[0]["logits"]
    return None, None
