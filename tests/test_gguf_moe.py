"""GGUF export of mixtures of experts (``--saver gguf``) run in llama.cpp (llama-cpp-python):
tiny random Mixtral, Qwen2-MoE and Qwen3-MoE made by transformers, converted with ``--loader hf``,
at full size and cut (fewer and narrower experts, smaller top-k); llama.cpp's logits equal the
elastic forward of the same sub-network. What llama.cpp's MoE graphs cannot express is refused.

Relative error: max |llama.cpp - elastic| / max |elastic| (tests/test_gguf_export.py).
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from test_gguf_export import F32_BOUND, IDS, _tokenizer, llama_cpp_run, relative_error
from test_hf_moe import elastic_logits, tiny_moe

from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError
from megatron_flextron.convert import ConvertOptions, convert
from megatron_flextron.convert.export import export_subnetwork
from megatron_flextron.convert.formats import gguf as gguf_format
from megatron_flextron.convert.formats.hf import load_hf
from megatron_flextron.elastic import Subnetwork

pytestmark = pytest.mark.usefixtures("megatron_single_process")
llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
# how each family routes: top-3 of 8 (a top-2 cut still has weights to renormalize or not)
ROUTING = {
    "mixtral": {},  # renormalized top-k
    "qwen2_moe": {"norm_topk_prob": False},
    "qwen3_moe": {"norm_topk_prob": True},
}
CUT = {"experts": 6, "moe_ffn": 16, "topk": 2}
CUT_HEADS = {**CUT, "heads": 2}  # one query head per KV group (qwen2moe's attention is square)


def _source(kind, directory, **overrides) -> str:
    """A tiny transformers MoE with a tokenizer beside it (what ``--loader hf`` reads)."""
    tiny_moe(kind, directory, num_experts_per_tok=3, **{**ROUTING[kind], **overrides})
    _tokenizer(directory)
    return str(directory)


def _gguf_names(arch: str, layers: int) -> set:
    """Every tensor name the gguf package defines for the architecture (weights and biases)."""
    kind = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = [gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[kind]]
    return {
        f"{n.format(bid=i)}.{part}"
        for n in names
        for i in range(layers)
        for part in ("weight", "bias")
    }


def _check_file(path: str, arch: str, spec, shared: bool) -> None:
    """The MoE metadata and stacked tensor shapes llama.cpp reads, named as the gguf package
    names them for the architecture."""
    reader = gguf.GGUFReader(path)
    experts, width, topk = (8, 32, 3) if spec is None else (6, 16, 2)

    def field(key):
        return reader.fields[f"{arch}.{key}"].contents()

    assert (field("expert_count"), field("expert_used_count")) == (experts, topk)
    assert field("expert_feed_forward_length") == width
    if shared:  # the shared expert narrows with the experts
        assert field("expert_shared_feed_forward_length") == 64 * width // 32
    tensors = {t.name: tuple(int(s) for s in reversed(t.shape)) for t in reader.tensors}
    assert set(tensors) <= _gguf_names(arch, 2)
    assert tensors["blk.1.ffn_gate_exps.weight"] == (experts, width, 64)
    assert tensors["blk.1.ffn_down_exps.weight"] == (experts, 64, width)
    assert tensors["blk.1.ffn_gate_inp.weight"] == (experts, 64)


def _error_in_llama_cpp(src: str, path: str, spec):
    """(relative error of llama.cpp's logits of the file against the elastic forward of ``src``
    at ``spec``, the architecture llama.cpp read)."""
    logits, _, arch = llama_cpp_run(path, IDS)
    ckpt = load_hf(src)
    ref = elastic_logits(ckpt, torch.tensor([IDS]), spec)[0]
    if spec is not None:  # a different function from the full model's
        assert (elastic_logits(ckpt, torch.tensor([IDS]))[0] - ref).abs().max() > 1e-2
    return relative_error(logits, ref), arch


CASES = [  # (family, source overrides, sub-network); qwen2moe's attention output is square, so
    # its trimmed heads are refused (below)
    *((kind, {}, spec) for kind in sorted(ARCH) for spec in (None, CUT)),
    ("mixtral", {}, CUT_HEADS),
    ("qwen3_moe", {}, CUT_HEADS),
    ("qwen2_moe", {"qkv_bias": False}, None),  # llama.cpp's q/k/v biases are optional
]


@pytest.mark.parametrize("kind, source, spec", CASES)
def test_moe_gguf_in_llama_cpp_equals_the_elastic_forward(tmp_path, kind, source, spec):
    src = _source(kind, tmp_path / "src", **source)
    out = tmp_path / "out"
    subnetwork = spec and json.dumps(spec)
    convert(ConvertOptions("hf", "gguf", src, str(out), subnetwork=subnetwork, gguf_type="f32"))
    path = str(out / "model.gguf")
    _check_file(path, ARCH[kind], spec, kind == "qwen2_moe")
    err, arch = _error_in_llama_cpp(src, path, spec)
    assert arch == ARCH[kind]
    print(f"{kind} {source} {spec} -> GGUF {arch} f32 in llama.cpp: max relative error {err:.2e}")
    assert err <= F32_BOUND


NEEDED = [  # (family, source overrides, model overrides, sub-network): refused below, because
    ("qwen3_moe", {"norm_topk_prob": False}, {}, None),  # its graph renormalizes: the logits differ
    ("qwen2_moe", {"norm_topk_prob": True}, {}, None),  # its graph does not: the logits differ
    ("qwen2_moe", {}, {"tie_embeddings": True}, None),  # it fails to load (no output.weight)
    ("qwen2_moe", {}, {}, {"heads": 2}),  # it fails to load (square attention output)
]


@pytest.mark.parametrize("kind, source, model, spec", NEEDED)
def test_each_refusal_is_needed(tmp_path, monkeypatch, kind, source, model, spec):
    """Written anyway (the refusal bypassed), llama.cpp's logits miss the bound or it refuses
    to load the file."""
    src = _source(kind, tmp_path / "src", **source)
    ckpt = load_hf(src)
    if model:
        state = {k: v for k, v in ckpt.state.items() if k != "output_layer.weight"}
        ckpt = Checkpoint(dataclasses.replace(ckpt.model, **model), state, ckpt.tokenizer_dir)
    if spec:
        ckpt = export_subnetwork(ckpt, Subnetwork.parse(spec, ckpt.model))
    monkeypatch.setattr(gguf_format, "moe_target", lambda ckpt: (ARCH[kind], []))
    os.makedirs(tmp_path / "out")
    path = gguf_format.save_gguf(ckpt, str(tmp_path / "out"), "f32")
    if model or spec:
        with pytest.raises(ValueError, match="Failed to load model"):
            llama_cpp_run(path, IDS)
        return
    err, _ = _error_in_llama_cpp(src, path, spec)
    print(f"{kind} {source} forced into {ARCH[kind]}: max relative error {err:.2e}")
    assert err > F32_BOUND


def _refused(ckpt: Checkpoint, what: str, spec=None, **model) -> None:
    if model:
        ckpt = Checkpoint(dataclasses.replace(ckpt.model, **model), ckpt.state, ckpt.tokenizer_dir)
    if spec:
        ckpt = export_subnetwork(ckpt, Subnetwork.parse(spec, ckpt.model))
    with pytest.raises(CheckpointError, match="cannot represent") as e:
        gguf_format.gguf_architecture(ckpt)
    assert what in str(e.value), str(e.value)


REFUSALS = [  # (family, source overrides, model overrides, sub-network, what the message names)
    ("qwen3_moe", {"norm_topk_prob": False}, {}, None, "top-k weights not renormalized"),
    ("qwen2_moe", {"norm_topk_prob": True}, {}, None, "renormalized top-k weights"),
    ("qwen2_moe", {}, {"tie_embeddings": True}, None, "tied embeddings"),
    ("qwen2_moe", {}, {}, {"heads": 2}, "trimmed heads (2 x 16 != 64)"),
    ("qwen2_moe", {}, {"moe_shared_expert_gate": False}, None, "shared expert without its"),
    ("mixtral", {}, {"moe_router_score_function": "sigmoid"}, None, "score function 'sigmoid'"),
    ("mixtral", {}, {"moe_router_enable_expert_bias": True}, None, "routing expert bias"),
    ("mixtral", {}, {"moe_router_topk_scaling_factor": 2.5}, None, "scaling_factor=2.5"),
    ("mixtral", {}, {"add_qkv_bias": True}, None, "q/k/v biases"),
    ("qwen3_moe", {}, {}, {"heads": [4, 2]}, "per-layer MLP widths or head counts in a mixture"),
    ("mixtral", {}, {"family": "gpt3"}, None, "gpt2 architecture cannot represent a mixture"),
]


@pytest.mark.parametrize("kind, source, model, spec, what", REFUSALS)
def test_routing_llama_cpp_cannot_express_is_refused_by_name(
    tmp_path, kind, source, model, spec, what
):
    _refused(load_hf(_source(kind, tmp_path / "src", **source)), what, spec, **model)


def test_refused_before_anything_is_written(tmp_path):
    src = _source("qwen3_moe", tmp_path / "src", norm_topk_prob=False)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="qwen3moe architecture cannot represent top-k"):
        convert(ConvertOptions("hf", "gguf", src, str(out)))
    assert not os.path.exists(out)


@pytest.mark.parametrize("gguf_type, bound", [("f16", 3e-3), ("q8_0", 0.15)])
@pytest.mark.parametrize("kind", sorted(ARCH))
def test_lower_precision_keeps_the_router_f32_and_stays_within_its_bound(
    tmp_path, kind, gguf_type, bound
):
    """Bounds: about 4x the errors measured (docs/serving.md). The router stays f32, as llama.cpp's
    own converter writes it: a rounded router logit could pick another expert."""
    src = _source(kind, tmp_path / "src")
    out = tmp_path / "out"
    convert(ConvertOptions("hf", "gguf", src, str(out), gguf_type=gguf_type))
    path = str(out / "model.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"
    assert (
        types["blk.0.ffn_up_exps.weight"]
        == types["blk.0.ffn_down_exps.weight"]
        == gguf_type.upper()
    )
    err, _ = _error_in_llama_cpp(src, path, None)
    print(
        f"{kind} full -> GGUF {ARCH[kind]} {gguf_type} in llama.cpp: max relative error {err:.2e}"
    )
    assert err <= bound
