"""Megatron-LM torch_dist checkpoints (--loader megatron): fixtures written by megatron-core itself
(a stock GPTModel whose weights come from a transformers model, saved with dist_checkpointing in
Megatron-LM's layout with its common state), converted to HF and flextron and compared with
transformers; the megatron saver's output read back exactly."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import pytest
import torch
from distributed import run_distributed
from helpers import random_canonical_state, tiny_config
from test_convert import TOKENS, _tp2_body, hf_logits, megatron_logits, tiny_hf

from megatron_flextron.checkpoint.flextron import load_state_strict, read_flextron
from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError
from megatron_flextron.convert import ConvertOptions, convert, load_checkpoint
from megatron_flextron.convert.formats.hf import load_hf
from megatron_flextron.convert.formats.megatron_dist import read_common
from megatron_flextron.elastic import build_gpt_model
from megatron_flextron.elastic.blocks import hybrid_name
from megatron_flextron.elastic.hybrid import build_hybrid_model, layer_pattern

pytestmark = pytest.mark.usefixtures("megatron_single_process")
GPT2_VOCAB, GPT2_PADDED = 50257, 50304  # Megatron pads GPT-2's vocabulary to a multiple of 128
_LOCAL_NAMES = {  # how a spec without megatron's TE key map stores the norms
    "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
    "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
}


def megatron_lm_args(**kw) -> argparse.Namespace:
    """Megatron-LM args as pretrain_gpt.py stores them (a subset, with non-model arguments and
    the enum and dtype values Megatron keeps, which the loader must allow-list)."""
    from megatron.core.transformer.enums import AttnBackend

    base = dict(
        micro_batch_size=4,
        lr=3e-4,
        seq_length=64,
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=1,
        attention_backend=AttnBackend.auto,
        transformer_impl="transformer_engine",
        ckpt_format="torch_dist",
        make_vocab_size_divisible_by=128,
        rotary_percent=1.0,
        params_dtype=torch.float32,
    )
    return argparse.Namespace(**{**base, **kw})


def write_megatron_dist(
    directory, ckpt: Checkpoint, args, names="te", dtype=torch.float32, hybrid=False
):
    """Megatron-LM's layout: iter_0000010/ (torch_dist shards, the args in their common state)
    and the tracker file, written by megatron-core's own GPTModel (or HybridModel, pattern ``*-``
    per block, local modules) and dist_checkpointing.save; also the entries a training
    checkpoint holds besides the model (optimizer state, rng, TE extra state)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    m = ckpt.model
    build = build_hybrid_model if hybrid else build_gpt_model
    model = build(
        m, m.transformer_config(params_dtype=dtype), elastic=False, pre_process=True,
        post_process=True,
    )
    model.to(dtype)  # as Megatron-LM's Float16Module holds a bf16 model
    if hybrid:
        model.load_state_dict({hybrid_name(k): v for k, v in ckpt.state.items()}, strict=False)
        args = argparse.Namespace(
            **{**vars(args), "num_layers": 2 * m.num_layers},
            hybrid_layer_pattern=layer_pattern(m.num_layers, 2),  # two stages: "*-|*-"
        )
    else:
        load_state_strict(model, ckpt.state)
    sharded = model.sharded_state_dict()
    renames = _LOCAL_NAMES.items() if names == "local" else ()
    if hybrid and names == "te":  # the local hybrid layers store local names; TE fuses them
        renames = [(local, te) for te, local in _LOCAL_NAMES.items()]
    for name, value in sharded.items():
        for old, new in renames:
            if isinstance(value, ShardedTensor) and old in value.key:
                sharded[name] = dataclasses.replace(value, key=value.key.replace(old, new))
    embed = ckpt.state["embedding.word_embeddings.weight"]
    state = {
        "model": sharded,
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": 10,
        "optimizer": {
            "exp_avg": ShardedTensor.from_rank_offsets(
                "optimizer.state.exp_avg.embedding.word_embeddings.weight", torch.ones_like(embed)
            )
        },
        "rng_state": ShardedObject("rng_state", {"random_rng_state": [1, 2]}, (1,), (0,)),
        "te_extra": ShardedObject(  # what TE's core attention stores (fp8 metadata)
            "decoder.layers.self_attention.core_attention._extra_state", b"", (1,), (0,)
        ),
        "opt_param_scheduler": {"num_steps": 10},
    }
    os.makedirs(directory / "iter_0000010")
    dist_checkpointing.save(state, str(directory / "iter_0000010"))
    (directory / "latest_checkpointed_iteration.txt").write_text("10")


def gpt3_fixture(tmp_path):
    """GPT-3 style: LayerNorm, exact GeLU, biases, learned positions, tied, GPT-2's vocabulary
    padded to 50304 (the padded rows random), GPT2BPETokenizer files, fp32, TE names."""
    source = tiny_hf("gpt2", tmp_path / "gpt2", activation_function="gelu", vocab_size=GPT2_VOCAB)
    ckpt = load_hf(str(tmp_path / "gpt2"))
    ckpt.state = dict(ckpt.state)  # read into memory: the fixture edits it
    embed = ckpt.state["embedding.word_embeddings.weight"]
    pad = 0.02 * torch.randn(GPT2_PADDED - GPT2_VOCAB, embed.size(1))
    ckpt.state["embedding.word_embeddings.weight"] = torch.cat([embed, pad])
    ckpt.model = dataclasses.replace(ckpt.model, vocab_size=GPT2_PADDED)
    vocab = {f"t{i}": i for i in range(GPT2_VOCAB - 1)} | {"<|endoftext|>": GPT2_VOCAB - 1}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    m = ckpt.model
    args = megatron_lm_args(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, kv_channels=m.kv_channels,
        group_query_attention=False, num_query_groups=1, max_position_embeddings=64,
        position_embedding_type="learned_absolute", normalization="LayerNorm",
        norm_epsilon=1e-5, swiglu=False, openai_gelu=False, add_bias_linear=True,
        add_qkv_bias=False, untie_embeddings_and_output_weights=False,
        padded_vocab_size=GPT2_PADDED, tokenizer_type="GPT2BPETokenizer",
        vocab_file=str(tmp_path / "vocab.json"), merge_file=str(tmp_path / "merges.txt"),
    )
    write_megatron_dist(tmp_path / "meg", ckpt, args)
    with torch.no_grad():
        return source(TOKENS).logits


def llama_fixture(tmp_path, names="te", hybrid=False):
    """Llama style: RMSNorm, SwiGLU, RoPE, GQA, untied, bf16 params, HuggingFaceTokenizer."""
    source = tiny_hf("llama", tmp_path / "llama")
    with torch.no_grad():  # the reference holds exactly the bf16 values Megatron trained
        for p in source.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        ref = source(TOKENS).logits
    ckpt = load_hf(str(tmp_path / "llama"))
    ckpt.state = {k: v.to(torch.bfloat16) for k, v in ckpt.state.items()}
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)}, unk_token="w0"))
    os.makedirs(tmp_path / "tok")
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    m = ckpt.model
    args = megatron_lm_args(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, kv_channels=m.kv_channels,
        group_query_attention=True, num_query_groups=m.num_query_groups,
        max_position_embeddings=m.max_position_embeddings, position_embedding_type="rope",
        rotary_base=int(m.rotary_base), use_rope_scaling=False, normalization="RMSNorm",
        norm_epsilon=m.norm_epsilon, swiglu=True, add_bias_linear=False,
        untie_embeddings_and_output_weights=True, padded_vocab_size=m.vocab_size,
        params_dtype=torch.bfloat16, bf16=True, tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=str(tmp_path / "tok"),
    )
    write_megatron_dist(
        tmp_path / "meg", ckpt, args, names=names, dtype=torch.bfloat16, hybrid=hybrid
    )
    return ref


def test_gpt3_padded_vocab_to_hf_and_flextron(tmp_path):
    ref = gpt3_fixture(tmp_path)
    ckpt = load_checkpoint("megatron", str(tmp_path / "meg"))
    m = ckpt.model
    assert (m.vocab_size, m.activation, m.tie_embeddings) == (GPT2_PADDED, "gelu", True)
    assert ckpt.metadata["vocabulary"]["tokenizer_vocab_size"] == GPT2_VOCAB
    assert ckpt.metadata["source"]["iteration"] == 10
    assert (megatron_logits(ckpt, TOKENS)[..., :GPT2_VOCAB] - ref).abs().max() <= 1e-5
    convert(ConvertOptions("megatron", "hf", str(tmp_path / "meg"), str(tmp_path / "hf")))
    out = hf_logits(str(tmp_path / "hf"), TOKENS)
    assert out.shape[-1] == GPT2_PADDED
    assert (out[..., :GPT2_VOCAB] - ref).abs().max() <= 1e-5
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["megatron_vocabulary"]["padded_vocab_size"] == GPT2_PADDED
    assert config["megatron_vocabulary"]["tokenizer_vocab_size"] == GPT2_VOCAB
    assert (tmp_path / "hf" / "vocab.json").read_text() == (tmp_path / "vocab.json").read_text()
    convert(
        ConvertOptions(
            "megatron", "flextron", str(tmp_path / "meg"), str(tmp_path / "fx"),
            target_tensor_parallel_size=2,
        )
    )
    back = read_flextron(str(tmp_path / "fx"))
    assert all(torch.equal(back.state[k], v) for k, v in ckpt.state.items())
    assert back.metadata["vocabulary"]["tokenizer_vocab_size"] == GPT2_VOCAB


def test_llama_bf16_to_hf_and_flextron_tp2(tmp_path):
    ref = llama_fixture(tmp_path)
    ckpt = load_checkpoint("megatron", str(tmp_path / "meg"))
    assert ckpt.state["decoder.layers.0.mlp.linear_fc1.weight"].dtype == torch.bfloat16
    assert ckpt.metadata["source"]["params_dtype"] == "bfloat16"
    assert ckpt.metadata["tokenizer"]["carried"] and ckpt.metadata["tokenizer"]["vocab_size"] == 100
    convert(ConvertOptions("megatron", "hf", str(tmp_path / "meg"), str(tmp_path / "hf")))
    assert (hf_logits(str(tmp_path / "hf"), TOKENS) - ref).abs().max() <= 1e-5
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    convert(
        ConvertOptions(
            "megatron", "flextron", str(tmp_path / "meg"), str(tmp_path / "fx"),
            target_tensor_parallel_size=2,
        )
    )
    assert (tmp_path / "fx" / "tokenizer" / "tokenizer.json").is_file()
    fx = read_flextron(str(tmp_path / "fx"))
    spec = {"mlp": 48, "heads": 2}
    run_distributed(
        _tp2_body, 2, str(tmp_path / "fx"), TOKENS, ref, megatron_logits(fx, TOKENS, spec), spec
    )


def test_local_names_and_iteration_dir_read_the_same(tmp_path):
    """Norms under local names (input_layernorm.weight), the iteration folder given directly:
    the same tensors as the TE-named root."""
    llama_fixture(tmp_path / "te")
    llama_fixture(tmp_path / "local", names="local")
    from megatron_flextron.convert.formats.megatron_dist import NOT_MODEL, StoredTensors

    stored = StoredTensors(str(tmp_path / "te" / "meg" / "iter_0000010"), skip=NOT_MODEL)
    everything = stored.metadata.state_dict_metadata
    assert any(k.startswith("optimizer.") for k in everything)  # stored, but never read
    assert not any(k.startswith("optimizer.") or "_extra_state" in k for k in stored.tensors)
    te = load_checkpoint("megatron", str(tmp_path / "te" / "meg"))
    local = load_checkpoint("megatron", str(tmp_path / "local" / "meg" / "iter_0000010"))
    assert te.state.keys() == local.state.keys()
    assert all(torch.equal(te.state[k], local.state[k]) for k in te.state)


@pytest.mark.parametrize("family, model_class", [("llama", None), ("gpt3", None), ("llama", "gpt")])
def test_megatron_saver_round_trip_is_exact(tmp_path, family, model_class):
    """The megatron saver writes Megatron-LM's args into the common state: --loader megatron
    reads the same architecture and tensors back, bit for bit (bf16 stays bf16), from a
    HybridModel (the default) or a GPTModel checkpoint."""
    m = tiny_config(family, add_qkv_bias=family == "llama", rope_scaling_factor=None)
    state = random_canonical_state(m)
    if family == "llama":
        state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    ckpt = Checkpoint(model=m, state=state)
    from megatron_flextron.convert.formats.megatron import save_megatron

    os.makedirs(tmp_path / "meg")
    save_megatron(ckpt, str(tmp_path / "meg"), model_class)
    back = load_checkpoint("megatron", str(tmp_path / "meg"))
    expected = "GPTModel" if model_class == "gpt" else "HybridModel"
    assert back.metadata["source"]["model_class"] == expected
    flags = (tmp_path / "meg" / "megatron_args.txt").read_text()
    assert ("--hybrid-layer-pattern " + "*-" * m.num_layers in flags) == (model_class is None)
    if model_class is None:  # megatron itself loads it into its HybridModel, every key used
        from megatron.core import dist_checkpointing

        stock = build_hybrid_model(m, m.transformer_config(), elastic=False)
        loaded = dist_checkpointing.load(
            stock.sharded_state_dict(), str(tmp_path / "meg" / "release"), strict="raise_all"
        )
        stock.load_state_dict(loaded, strict=False)
        for name, value in state.items():
            assert torch.equal(stock.state_dict()[hybrid_name(name)], value.float()), name
    assert back.model == m
    assert back.state.keys() == state.keys()
    assert all(v.dtype == back.state[k].dtype and torch.equal(back.state[k], v)
               for k, v in state.items())


class NotAllowed:
    pass


def test_refusals_name_the_problem(tmp_path):
    from megatron.core import dist_checkpointing

    llama_fixture(tmp_path)
    folder = tmp_path / "meg" / "iter_0000010"
    # megatron-core 0.19 keeps the common state inside the shards; a common.pt beside them is
    # what older releases wrote, and is read first (by megatron too): the crafted args go there
    common = read_common(str(folder))

    def fails(message, **kw):
        with pytest.raises(CheckpointError, match=message):
            convert(ConvertOptions("megatron", "hf", str(tmp_path / "meg"), str(tmp_path / "o"),
                                   **kw))
        assert not os.path.exists(tmp_path / "o")

    for arg, value, message in [
        ("qk_l2_norm", True, "qk_l2_norm=True"),
        ("window_size", (16, 0), "window_size"),
        ("rotary_percent", 0.5, "rotary_percent=0.5"),
        ("squared_relu", True, "squared_relu"),
        ("num_experts", 4, "does not use.*'decoder.layers.mlp.linear_fc1.weight'"),
    ]:
        args = argparse.Namespace(**{**vars(common["args"]), arg: value})
        torch.save({**common, "args": args}, folder / "common.pt")
        fails(message)
    torch.save({**common, "args": argparse.Namespace(**vars(common["args"]), x=NotAllowed())},
               folder / "common.pt")
    fails("outside the allow-list.*NotAllowed")
    torch.save({k: v for k, v in common.items() if k != "args"}, folder / "common.pt")
    fails("no 'args'")
    torch.save(common, folder / "common.pt")
    # the tokenizer files are gone: say so, and take --tokenizer-model
    os.remove(tmp_path / "tok" / "tokenizer.json")
    ckpt = load_checkpoint("megatron", str(tmp_path / "meg"))
    assert not ckpt.metadata["tokenizer"]["carried"]
    assert "--tokenizer-model" in ckpt.metadata["tokenizer"]["note"]
    fails("tokenizer folder .* holds none", tokenizer_model=str(tmp_path / "tok"))
    # a tensor the architecture does not use (a q-layernorm) stops the conversion
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    m = ckpt.model
    extra = ShardedTensor.from_rank_offsets(
        "decoder.layers.self_attention.q_layernorm.weight", torch.ones(m.num_layers, 16),
        replica_id=0,
    )
    os.makedirs(tmp_path / "extra" / "release")
    (tmp_path / "extra" / "latest_checkpointed_iteration.txt").write_text("release")
    dist_checkpointing.save({"q": extra, **common}, str(tmp_path / "extra" / "release"))
    with pytest.raises(CheckpointError, match="does not use.*q_layernorm"):
        load_checkpoint("megatron", str(tmp_path / "extra"))
    with pytest.raises(CheckpointError, match="megatron_legacy|neither"):
        load_checkpoint("megatron", str(tmp_path / "tok"))


@pytest.mark.parametrize("names", ["te", "local"])
def test_hybrid_model_checkpoint_to_hf_matches_transformers(tmp_path, names):
    """A Megatron-LM HybridModel checkpoint (pattern ``*-|*-``, two stages, saved by
    megatron-core's own HybridModel) converts to HF with logits equal to transformers, and
    reads the same tensors as the GPTModel checkpoint of the same weights."""
    ref = llama_fixture(tmp_path / "h", names=names, hybrid=True)
    ckpt = load_checkpoint("megatron", str(tmp_path / "h" / "meg"))
    assert ckpt.metadata["source"]["model_class"] == "HybridModel"
    assert ckpt.model.num_layers == 2  # blocks: 4 hybrid layers
    convert(ConvertOptions("megatron", "hf", str(tmp_path / "h" / "meg"), str(tmp_path / "hf")))
    assert (hf_logits(str(tmp_path / "hf"), TOKENS) - ref).abs().max() <= 1e-5
    llama_fixture(tmp_path / "g")
    gpt = load_checkpoint("megatron", str(tmp_path / "g" / "meg"))
    assert gpt.model == ckpt.model and gpt.state.keys() == ckpt.state.keys()
    assert all(torch.equal(gpt.state[k], ckpt.state[k]) for k in gpt.state)


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("*-M-*-*-", "layer 2 is 'M' \\(Mamba\\)"),
        ("*-*E*-*-", "layer 3 is 'E' \\(mixture-of-experts MLP\\)"),
        ("*-*-*-+-", "layer 6 is '\\+' \\(multi-latent attention\\)"),
        ("*-*-*-G-", "layer 6 is 'G' \\(gated delta net\\)"),
        ("*-*-*-D-", "layer 6 is 'D' \\(DeepSeek sparse attention\\)"),
        ("*--*-*-*", "layer 2 is '-' \\(MLP\\) where a dense block's attention"),
        ("*-*-*-*-/*-", "multi-token-prediction"),
    ],
)
def test_hybrid_layer_kinds_it_cannot_represent_are_refused(tmp_path, pattern, message):
    llama_fixture(tmp_path, hybrid=True)
    folder = tmp_path / "meg" / "iter_0000010"
    common = read_common(str(folder))
    args = argparse.Namespace(**{**vars(common["args"]), "hybrid_layer_pattern": pattern})
    torch.save({**common, "args": args}, folder / "common.pt")  # read first (pre-0.19 file)
    with pytest.raises(CheckpointError, match=f"hybrid_layer_pattern=.*{message}"):
        convert(ConvertOptions("megatron", "hf", str(tmp_path / "meg"), str(tmp_path / "o")))
    assert not os.path.exists(tmp_path / "o")
