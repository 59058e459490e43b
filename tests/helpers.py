"""Shared test builders: tiny architectures, random canonical weights, a megatron train step."""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.elastic import build_elastic_model, build_gpt_model, set_subnetwork
from megatron_flextron.elastic.tp_layout import load_canonical_state_dict

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
        # routers at a larger scale: clear top-k margins, so float noise never flips a choice
        scale = 1.0 if name.endswith("router.weight") else 0.05
        state[name] = base + scale * torch.randn_like(p)
    for name, buffer in gpt.named_buffers():
        if name.endswith("router.expert_bias"):
            state[name] = 0.1 * torch.randn_like(buffer)
    return state


def elastic_logits(ckpt, tokens: torch.Tensor, spec=None, choices=None) -> torch.Tensor:
    """The elastic model (megatron's HybridModel, SDPA core attention) loaded from ``ckpt``'s
    canonical state at sub-network ``spec`` (None: full size) among ``choices`` (default: the
    model's ratio choices)."""
    m = ckpt.model
    model = build_elastic_model(m, m.transformer_config())
    load_canonical_state_dict(model, ckpt.state, m)
    set_subnetwork(model, spec, m, choices or ElasticConfig.from_ratios(m))
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.size(1)).expand_as(tokens), None)


def tiny_moe(**overrides) -> ModelConfig:
    """A 2-layer Llama-style mixture of 8 experts of 32 neurons, top-2."""
    base = dict(num_layers=2, num_moe_experts=8, moe_ffn_hidden_size=32, moe_router_topk=2)
    return tiny_config("llama", **{**base, **overrides})


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


def train_tiny_tokenizer(tok_dir: str, texts) -> None:
    """A byte-level BPE of 320 tokens (``<|endoftext|>`` = 0) trained on ``texts``, saved as
    ``tok_dir``/tokenizer.json: what a tiny flextron checkpoint carries to generate text."""
    import os

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    os.makedirs(tok_dir, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(texts, trainer)
    tok.save(os.path.join(tok_dir, "tokenizer.json"))


def write_training_setup(
    directory: str, family: str = "llama", docs: int = 300, model: ModelConfig = None
) -> dict:
    """A tiny flextron checkpoint (random weights) with a byte-level BPE tokenizer trained on the
    bundled corpus, and that corpus preprocessed to .bin/.idx: what the trainer needs."""
    import os

    from megatron_flextron.checkpoint.flextron import save_flextron
    from megatron_flextron.checkpoint.state import Checkpoint
    from megatron_flextron.data.corpus import wiki_documents
    from megatron_flextron.data.gpt_data import write_indexed_dataset
    from megatron_flextron.data.tokenizer import build_tokenizer

    tok_dir = os.path.join(directory, "tokenizer")
    texts = wiki_documents("train")[:docs]
    train_tiny_tokenizer(tok_dir, texts)
    model = tiny_config(family) if model is None else model
    model = dataclasses.replace(model, vocab_size=320)
    ckpt = Checkpoint(
        model=model,
        state=random_canonical_state(model),
        tokenizer_dir=tok_dir,
        elastic=elastic_choices(model),
    )
    ckpt_dir = os.path.join(directory, "ckpt")
    os.makedirs(ckpt_dir)
    save_flextron(ckpt, ckpt_dir)
    prefix = os.path.join(directory, "wiki_text_document")
    write_indexed_dataset(
        iter(texts), build_tokenizer("HuggingFaceTokenizer", tok_dir), prefix, append_eod=True
    )
    return {"load": ckpt_dir, "data_path": prefix, "model": model}


def evaluate_rows(load: str, **options) -> list:
    """The JSON rows tools/evaluate.py prints, from the library: ``options`` are the fields of
    megatron_flextron.evaluation.perplexity.PerplexityOptions."""
    from megatron_flextron.evaluation.perplexity import PerplexityOptions, evaluate_perplexity

    return [r.to_dict() for r in evaluate_perplexity(PerplexityOptions(load=load, **options))]


def training_flags(setup: dict, **flags) -> list:
    """Command-line flags of a short tiny-model run; keyword arguments override/extend them."""
    base = {
        "load": setup["load"],
        "data_path": setup["data_path"],
        "split": "98,2,0",
        "seq_length": 32,
        "micro_batch_size": 2,
        "global_batch_size": 8,
        "train_iters": 8,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "lr_warmup_iters": 2,
        "eval_interval": 4,
        "eval_iters": 2,
        "log_interval": 1,
    }
    base.update(flags)
    argv = []
    for key, value in base.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def run_example(script: str, out_dir: str, *args: str, timeout: int = 1500, **env_vars):
    """Run ``examples/<script> args`` with PRESET=smoke, OUT=out_dir (and ``env_vars``) outside
    any torchrun environment of the test process; asserts exit 0, returns the CompletedProcess."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(PRESET="smoke", OUT=out_dir, **env_vars)
    out = subprocess.run(
        ["bash", f"examples/{script}", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _train_body(rank, world_size, argv, out_path):
    import json

    from megatron_flextron.training.arguments import parse_args
    from megatron_flextron.training.trainer import pretrain

    history = pretrain(parse_args(argv))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(history, f)


def train_history(tmp_path, name: str, world_size: int, argv: list) -> list:
    """Run the trainer with ``argv`` on ``world_size`` gloo ranks; rank 0's per-iteration stats."""
    import json

    from distributed import run_distributed

    out = tmp_path / f"{name}.json"
    run_distributed(_train_body, world_size, argv, str(out))
    return json.loads(out.read_text())


class IdTokenizer:
    """Token ids written as text ("5 6 7"): the generator's tokenizer in tiny-model tests."""

    eod, vocab_size = 0, 128

    def tokenize(self, text):
        return [int(t) for t in text.split()]

    def detokenize(self, ids):
        return " ".join(map(str, ids))
