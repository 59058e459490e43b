"""Checkpoint conversion: exact round trips, transformers as the reference, legacy Megatron GPT-3,
TP-independent sub-network export, and bad input."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch
from distributed import run_distributed
from helpers import random_canonical_state, tiny_config

from megatron_flextron.checkpoint.flextron import read_flextron
from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError
from megatron_flextron.convert import ConvertOptions, convert, load_checkpoint
from megatron_flextron.convert.export import export_subnetwork
from megatron_flextron.convert.formats.hf import load_hf, save_hf
from megatron_flextron.elastic import Subnetwork, build_gpt_model, set_subnetwork

pytestmark = pytest.mark.usefixtures("megatron_single_process")
import transformers  # noqa: E402  (a missing dependency fails, it is not skipped)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_hf(kind: str, directory: str, **overrides):
    """A random transformers model saved to ``directory``; returns the live model."""
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=64,
            rope_theta=1e5,
            tie_word_embeddings=False,
            **overrides,
        )
        model = transformers.LlamaForCausalLM(cfg)
    else:
        kwargs = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
        cfg = transformers.GPT2Config(**{**kwargs, **overrides})
        model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(directory)
    return model


def megatron_logits(ckpt: Checkpoint, tokens: torch.Tensor, spec=None) -> torch.Tensor:
    m = ckpt.model
    gpt = build_gpt_model(m, m.transformer_config(), elastic=True)
    gpt.load_state_dict(ckpt.state, strict=False)
    if spec is not None:
        from megatron_flextron.config import ElasticConfig

        loose = ElasticConfig(range(1, 10**5), range(1, 1000))
        set_subnetwork(gpt, spec, m, loose)
    with torch.no_grad():
        return gpt(tokens, torch.arange(tokens.size(1)).expand_as(tokens), None)


def hf_logits(directory: str, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(tokens).logits


TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hf_round_trip_is_exact_and_matches_transformers(tmp_path, kind):
    source = tiny_hf(kind, tmp_path / "src")
    with torch.no_grad():
        ref = source(TOKENS).logits
    ckpt = load_hf(str(tmp_path / "src"))
    assert (megatron_logits(ckpt, TOKENS) - ref).abs().max() <= 1e-5
    os.makedirs(tmp_path / "out")
    save_hf(ckpt, str(tmp_path / "out"))
    again = load_hf(str(tmp_path / "out"))
    assert again.state.keys() == ckpt.state.keys()
    assert all(torch.equal(again.state[k], v) for k, v in ckpt.state.items())
    assert (hf_logits(str(tmp_path / "out"), TOKENS) - ref).abs().max() <= 1e-6


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_flextron_round_trip_and_tp_independent_export(tmp_path, kind):
    tiny_hf(kind, tmp_path / "src")
    ckpt = load_hf(str(tmp_path / "src"))
    for tp in (1, 2):
        convert(
            ConvertOptions(
                "hf",
                "flextron",
                str(tmp_path / "src"),
                str(tmp_path / f"f{tp}"),
                target_tensor_parallel_size=tp,
            )
        )
        back = read_flextron(str(tmp_path / f"f{tp}"))
        assert all(torch.equal(back.state[k], v) for k, v in ckpt.state.items())
        assert back.state.keys() == ckpt.state.keys()
    spec = '{"mlp": 48, "heads": 2}' if kind == "llama" else '{"mlp": 128}'  # gpt2: no head trim
    for tp in (1, 2):
        convert(
            ConvertOptions(
                "flextron",
                "hf",
                str(tmp_path / f"f{tp}"),
                str(tmp_path / f"h{tp}"),
                subnetwork=spec,
            )
        )
    a, b = load_hf(str(tmp_path / "h1")), load_hf(str(tmp_path / "h2"))
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    # The exported dense model is the elastic model run at that sub-network.
    ref = megatron_logits(ckpt, TOKENS, spec=spec)
    assert (hf_logits(str(tmp_path / "h1"), TOKENS) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "spec",
    [
        {"mlp": 64, "heads": 4, "layers": [0, 1, 3]},
        {"mlp": [32, 128, 64, 96], "heads": [8, 4, 4, 8], "layers": [0, 2, 3]},  # per-layer sizes
    ],
)
def test_megatron_saver_subnetwork_equals_elastic_forward(tmp_path, spec):
    from megatron.core import dist_checkpointing

    from megatron_flextron.convert.formats.megatron import save_megatron
    from megatron_flextron.elastic.hybrid import build_hybrid_model
    from megatron_flextron.elastic.model import build_heterogeneous_gpt_model

    m = tiny_config("llama")
    ckpt = Checkpoint(model=m, state=random_canonical_state(m))
    small = export_subnetwork(ckpt, Subnetwork.parse(spec, m))
    os.makedirs(tmp_path / "meg")
    save_megatron(small, str(tmp_path / "meg"))
    if small.layer_shapes:
        dense = build_heterogeneous_gpt_model(small.model, small.layer_shapes)
        assert not (tmp_path / "meg" / "megatron_args.txt").exists()
        with pytest.raises(CheckpointError, match="heterogeneous"):
            save_hf(small, str(tmp_path))
    else:  # a HybridModel, megatron's own layout
        dense = build_hybrid_model(small.model, small.model.transformer_config(), elastic=False)
        flags = (tmp_path / "meg" / "megatron_args.txt").read_text()
        assert "--num-layers 6 --hybrid-layer-pattern *-*-*-" in flags
    back = load_checkpoint("megatron", str(tmp_path / "meg"))  # --loader megatron reads it back
    assert back.model == small.model and back.layer_shapes == small.layer_shapes
    assert back.state.keys() == small.state.keys()
    assert all(torch.equal(back.state[k], v) for k, v in small.state.items())
    from megatron_flextron.elastic import count_parameters

    subnet = Subnetwork.parse(spec, m)
    assert count_parameters(subnet, m)["total"] == sum(p.numel() for p in dense.parameters())
    loaded = dist_checkpointing.load(dense.sharded_state_dict(), str(tmp_path / "meg" / "release"))
    dense.load_state_dict(loaded, strict=False)
    with torch.no_grad():
        out = dense(TOKENS, torch.arange(12).expand(2, 12), None)
    assert (out - megatron_logits(ckpt, TOKENS, spec)).abs().max() <= 1e-5


# ---------------- Megatron legacy GPT-3 (TP=2, PP=2), written from a transformers GPT-2 ----------


def write_legacy(hf_model, directory, tp: int, pp: int, version: float = 3.0):
    """Write Megatron-LM's legacy layout from a GPT-2 (MHA, exact GeLU): contiguous TP shards."""
    cfg = hf_model.config
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    h, heads, layers = cfg.n_embd, cfg.n_head, cfg.n_layer
    args = argparse.Namespace(
        num_layers=layers,
        hidden_size=h,
        ffn_hidden_size=4 * h,
        num_attention_heads=heads,
        max_position_embeddings=cfg.n_positions,
        padded_vocab_size=cfg.vocab_size,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        layernorm_epsilon=1e-5,
        swiglu=False,
        openai_gelu=False,
        untie_embeddings_and_output_weights=False,
    )

    def qkv(x):  # GPT-2 [q_all; k_all; v_all] (Conv1D: transposed) -> version 3 [heads, 3, d]
        x = x.t() if x.dim() == 2 else x
        return x.reshape(3, heads, -1, *x.shape[1:]).transpose(0, 1).reshape(x.shape)

    os.makedirs(directory / "release")
    (directory / "latest_checkpointed_iteration.txt").write_text("release")
    per_stage = layers // pp
    for p in range(pp):
        for t in range(tp):

            def col(x, t=t):
                return x.chunk(tp, 0)[t].clone()

            def row(x, t=t):
                return x.chunk(tp, 1)[t].clone()

            encoder = {}
            for local in range(per_stage):
                i, src = p * per_stage + local, f"transformer.h.{p * per_stage + local}."
                dst = f"layers.{local}."
                encoder[dst + "input_norm.weight"] = sd[src + "ln_1.weight"]
                encoder[dst + "input_norm.bias"] = sd[src + "ln_1.bias"]
                encoder[dst + "self_attention.query_key_value.weight"] = col(
                    qkv(sd[src + "attn.c_attn.weight"])
                )
                encoder[dst + "self_attention.query_key_value.bias"] = col(
                    qkv(sd[src + "attn.c_attn.bias"])
                )
                encoder[dst + "self_attention.dense.weight"] = row(
                    sd[src + "attn.c_proj.weight"].t()
                )
                encoder[dst + "self_attention.dense.bias"] = sd[src + "attn.c_proj.bias"]
                encoder[dst + "post_attention_norm.weight"] = sd[src + "ln_2.weight"]
                encoder[dst + "post_attention_norm.bias"] = sd[src + "ln_2.bias"]
                encoder[dst + "mlp.dense_h_to_4h.weight"] = col(sd[src + "mlp.c_fc.weight"].t())
                encoder[dst + "mlp.dense_h_to_4h.bias"] = col(sd[src + "mlp.c_fc.bias"])
                encoder[dst + "mlp.dense_4h_to_h.weight"] = row(sd[src + "mlp.c_proj.weight"].t())
                encoder[dst + "mlp.dense_4h_to_h.bias"] = sd[src + "mlp.c_proj.bias"]
                assert i < layers
            model = {"language_model": {"encoder": encoder}}
            if p == 0:
                model["language_model"]["embedding"] = {
                    "word_embeddings": {"weight": col(sd["transformer.wte.weight"])},
                    "position_embeddings": {"weight": sd["transformer.wpe.weight"]},
                }
            if p == pp - 1:
                encoder["final_norm.weight"] = sd["transformer.ln_f.weight"]
                encoder["final_norm.bias"] = sd["transformer.ln_f.bias"]
                if pp > 1:
                    model["word_embeddings_for_head"] = {
                        "weight": col(sd["transformer.wte.weight"])
                    }
            name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
            os.makedirs(directory / "release" / name)
            torch.save(
                {"model": model, "args": args, "checkpoint_version": version, "iteration": 0},
                directory / "release" / name / "model_optim_rng.pt",
            )


def test_megatron_legacy_tp2_pp2_converts_to_hf_and_flextron(tmp_path):
    source = tiny_hf("gpt2", tmp_path / "gpt2", activation_function="gelu", n_layer=4)
    with torch.no_grad():
        ref = source(TOKENS).logits
    write_legacy(source, tmp_path / "legacy", tp=2, pp=2)
    ckpt = load_checkpoint("megatron_legacy", str(tmp_path / "legacy"))
    assert ckpt.model.activation == "gelu" and ckpt.model.num_layers == 4
    assert (megatron_logits(ckpt, TOKENS) - ref).abs().max() <= 1e-5
    convert(ConvertOptions("megatron_legacy", "hf", str(tmp_path / "legacy"), str(tmp_path / "hf")))
    assert (hf_logits(str(tmp_path / "hf"), TOKENS) - ref).abs().max() <= 1e-5
    convert(
        ConvertOptions(
            "megatron_legacy",
            "flextron",
            str(tmp_path / "legacy"),
            str(tmp_path / "fx"),
            target_tensor_parallel_size=2,
        )
    )
    assert (megatron_logits(read_flextron(str(tmp_path / "fx")), TOKENS) - ref).abs().max() <= 1e-5


# ---------------- bad input: a clear error, nothing written ----------------


def _fails(tmp_path, message, **kw):
    opts = dict(
        loader="hf",
        saver="flextron",
        load_dir=str(tmp_path / "src"),
        save_dir=str(tmp_path / "out"),
    )
    opts.update(kw)
    with pytest.raises((CheckpointError, ValueError), match=message):
        convert(ConvertOptions(**opts))
    assert not os.path.exists(tmp_path / "out")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.tmp")]


def test_bad_inputs_fail_cleanly(tmp_path):
    tiny_hf("llama", tmp_path / "src")
    _fails(tmp_path, "unknown loader", loader="onnx")
    _fails(tmp_path, "does not exist", loader="gguf", load_dir=str(tmp_path / "nope.gguf"))
    _fails(tmp_path, "not divisible by 3", target_tensor_parallel_size=3)
    _fails(
        tmp_path,
        "MLP width 50 is not one of the configured choices",
        saver="hf",
        subnetwork='{"mlp": 50}',
    )
    _fails(tmp_path, "needs --loader flextron", budget=0.5)
    _fails(
        tmp_path,
        "no latest_checkpointed_iteration.txt",
        loader="megatron_legacy",
        load_dir=str(tmp_path / "src"),
    )
    # a truncated weights file
    weights = tmp_path / "src" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    _fails(tmp_path, "cannot read .*model.safetensors")
    # weights whose shapes disagree with config.json
    tiny_hf("llama", tmp_path / "src2")
    cfg = (
        (tmp_path / "src2" / "config.json")
        .read_text()
        .replace('"intermediate_size": 96', '"intermediate_size": 80')
    )
    (tmp_path / "src2" / "config.json").write_text(cfg)
    _fails(tmp_path, "shape", load_dir=str(tmp_path / "src2"))


def test_cli_exit_code_and_message(tmp_path):
    tiny_hf("llama", tmp_path / "src")
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "convert_checkpoint.py"),
            "--loader",
            "hf",
            "--saver",
            "hf",
            "--load-dir",
            str(tmp_path / "src"),
            "--save-dir",
            str(tmp_path / "out"),
            "--target-tensor-parallel-size",
            "3",
        ],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")},
    )
    assert out.returncode == 2 and "not divisible by 3" in out.stderr
    assert not os.path.exists(tmp_path / "out")


# ---------------- TP=2 loads of dealt checkpoints and permuted weights ----------------


def _tp2_body(rank, world_size, directory, tokens, ref_full, ref_sub, spec, atol=1e-5):
    from megatron.core import tensor_parallel

    from megatron_flextron.checkpoint.flextron import load_flextron_into_model, read_config
    from megatron_flextron.config import ElasticConfig, ModelConfig
    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(world_size, 1)
    m = ModelConfig.from_dict(read_config(directory)["model"])
    gpt = build_gpt_model(m, m.transformer_config(world_size))
    load_flextron_into_model(gpt, directory)
    for subnet, ref in ((None, ref_full), (spec, ref_sub)):
        set_subnetwork(gpt, subnet, m, ElasticConfig(range(1, 10**5), range(1, 1000)))
        with torch.no_grad():
            out = gpt(tokens, torch.arange(tokens.size(1)).expand_as(tokens), None)
        out = tensor_parallel.gather_from_tensor_model_parallel_region(out)
        assert (out - ref).abs().max() <= atol, (subnet, (out - ref).abs().max())


def test_flextron_checkpoint_loads_at_another_tp(tmp_path):
    """Dealt for TP=1, loaded by 2 ranks (re-dealt): same full model and sub-network."""
    tiny_hf("llama", tmp_path / "src")
    ckpt = convert(ConvertOptions("hf", "flextron", str(tmp_path / "src"), str(tmp_path / "fx")))
    spec = {"mlp": 48, "heads": 2}
    run_distributed(
        _tp2_body,
        2,
        str(tmp_path / "fx"),
        TOKENS,
        megatron_logits(ckpt, TOKENS),
        megatron_logits(ckpt, TOKENS, spec),
        spec,
    )
