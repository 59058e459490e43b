"""GGUF export of mixtures of experts (``--saver gguf``) run in llama.cpp (llama-cpp-python):
tiny random Mixtral, Qwen2-MoE and Qwen3-MoE made by transformers, converted with ``--loader hf``,
at full size and cut (fewer and narrower experts, smaller top-k); llama.cpp's logits equal the
elastic forward of the same sub-network. What llama.cpp's MoE graphs cannot express is refused.
Read back (``--loader gguf``), a file gives the source's config, tensors and logits; MoE metadata
the reader cannot map is refused by key.

Relative error: max |llama.cpp - elastic| / max |elastic| (tests/test_gguf_export.py).
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from test_gguf_export import F32_BOUND, IDS, _tokenizer, llama_cpp_run, relative_error
from test_hf_moe import close, elastic_logits, tiny_moe

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


# ---- reading MoE GGUF files back (load_gguf): the exact inverse of the writer ----------------

# the ModelConfig fields a MoE GGUF file carries (ffn_hidden_size is no MoE's: it has no dense MLP)
READ_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "vocab_size", "max_position_embeddings", "rotary_base", "tie_embeddings", "add_qkv_bias",
    "qk_layernorm", "num_moe_experts", "moe_ffn_hidden_size", "moe_router_topk",
    "moe_router_score_function", "moe_router_pre_softmax", "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate",
)  # fmt: skip


def _written(tmp_path, kind: str, gguf_type: str = "f32", **source):
    """(the source checkpoint read by ``--loader hf``, its GGUF written by save_gguf)."""
    ckpt = load_hf(_source(kind, tmp_path / "src", **source))
    os.makedirs(tmp_path / "out")
    return ckpt, gguf_format.save_gguf(ckpt, str(tmp_path / "out"), gguf_type)


def _f16_rounded(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """What an f16 file holds: matrices rounded to f16; vectors (the shared expert's gate is one
    in GGUF) and routers kept f32."""
    if tensor.dim() == 1 or name.endswith(("router.weight", "shared_experts.gate_weight")):
        return tensor
    return tensor.half().float()


READ_BACK = [  # (family, source overrides, GGUF type)
    *((kind, {}, gguf_type) for kind in sorted(ARCH) for gguf_type in ("f32", "f16")),
    ("qwen2_moe", {"qkv_bias": False}, "f32"),  # its q/k/v biases are optional: none read
]


@pytest.mark.parametrize("kind, source, gguf_type", READ_BACK)
def test_moe_gguf_reads_back_as_the_source(tmp_path, kind, source, gguf_type):
    """load_gguf(save_gguf(x)) == x: the config fields, every canonical tensor bit for bit (f16:
    exactly the f16 rounding of each matrix) and, at f32, the elastic forward's logits."""
    src, path = _written(tmp_path, kind, gguf_type, **source)
    read = gguf_format.load_gguf(path, with_tokenizer=False)
    for name in READ_FIELDS:
        assert getattr(read.model, name) == getattr(src.model, name), name
    # GGUF stores the epsilon as float32
    assert read.model.norm_epsilon == float(torch.tensor(src.model.norm_epsilon))
    assert sorted(read.state) == sorted(src.state)
    assert any(".local_experts.7." in name for name in read.state)
    for name in src.state:
        want = src.state[name] if gguf_type == "f32" else _f16_rounded(name, src.state[name])
        assert torch.equal(read.state[name], want), name
    if gguf_type == "f32":
        ids = torch.tensor([IDS])
        assert torch.equal(elastic_logits(read, ids), elastic_logits(src, ids))


def test_convert_checkpoint_reads_a_moe_gguf_into_flextron(tmp_path):
    """tools/convert_checkpoint.py --loader gguf --saver flextron, end to end (tokenizer
    included): the flextron checkpoint holds the source's tensors."""
    from test_bad_input import run_tool

    from megatron_flextron.convert import load_checkpoint

    src, path = _written(tmp_path, "qwen2_moe")
    out = str(tmp_path / "flextron")
    done = run_tool(
        "convert_checkpoint.py", "--loader", "gguf", "--saver", "flextron",
        "--load-dir", path, "--save-dir", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    back = load_checkpoint("flextron", out)
    assert back.model.moe_shared_expert_gate and back.model.moe_router_pre_softmax
    assert sorted(back.state) == sorted(src.state)
    for name in src.state:
        assert torch.equal(back.state[name].float(), src.state[name]), name


def _rewritten(path: str, fields=None, tensors=None) -> str:
    """The GGUF file at ``path`` written again with the gguf package, ``fields`` ({key: (value,
    GGUFValueType)}) set and ``tensors`` ({name: array}) added (an f32 file)."""
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    out = path.replace(".gguf", ".rewritten.gguf")
    w = gguf.GGUFWriter(out, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in (fields or {}):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub)
    for key, (value, vtype) in (fields or {}).items():
        w.add_key_value(key, value, vtype)
    for t in reader.tensors:
        w.add_tensor(t.name, t.data)
    for name, array in (tensors or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


V = gguf.GGUFValueType
MOE_METADATA = [  # (family, {field: (value, type)} set, what the refusal names; None: read)
    ("mixtral", {"llama.expert_gating_func": (2, V.UINT32)}, "llama.expert_gating_func=2"),
    ("qwen3_moe", {"qwen3moe.expert_weights_scale": (2.5, V.FLOAT32)}, "weights_scale=2.5"),
    ("qwen2_moe", {"qwen2moe.expert_weights_norm": (True, V.BOOL)}, "expert_weights_norm=True"),
    ("qwen3_moe", {"qwen3moe.leading_dense_block_count": (1, V.UINT32)}, "dense_block_count=1"),
    ("mixtral", {"llama.expert_group_count": (2, V.UINT32)}, "llama.expert_group_count=2"),
    ("mixtral", {"llama.expert_shared_feed_forward_length": (64, V.UINT32)}, "shared_feed"),
    ("qwen2_moe", {"qwen2moe.expert_shared_count": (2, V.UINT32)}, "expert_shared_count=2"),
    (
        "mixtral",
        {"llama.expert_feed_forward_length": (16, V.UINT32)},
        "expert_feed_forward_length=16",
    ),
    ("mixtral", {"llama.expert_count": (6, V.UINT32)}, "stacks 8 experts, expert_count is 6"),
    # what each architecture computes anyway, said explicitly: read
    ("qwen3_moe", {"qwen3moe.expert_gating_func": (1, V.UINT32)}, None),
    ("qwen3_moe", {"qwen3moe.expert_weights_norm": (True, V.BOOL)}, None),
    ("qwen2_moe", {"qwen2moe.expert_weights_norm": (False, V.BOOL)}, None),
]


@pytest.mark.parametrize("kind, fields, what", MOE_METADATA)
def test_moe_metadata_the_reader_cannot_map_is_refused_by_key(tmp_path, kind, fields, what):
    src, path = _written(tmp_path, kind)
    path = _rewritten(path, fields)
    if what is None:
        read = gguf_format.load_gguf(path, with_tokenizer=False)
        assert all(torch.equal(read.state[n], src.state[n]) for n in src.state)
        return
    with pytest.raises(CheckpointError, match="GGUF") as e:
        gguf_format.load_gguf(path, with_tokenizer=False)
    assert what in str(e.value), str(e.value)


def test_a_leftover_moe_tensor_is_refused_by_name(tmp_path):
    _, path = _written(tmp_path, "qwen3_moe")
    path = _rewritten(path, tensors={"blk.1.ffn_up_exps.bias": torch.zeros(8, 32).numpy()})
    with pytest.raises(CheckpointError, match=r"does not use: \['blk.1.ffn_up_exps.bias'\]"):
        gguf_format.load_gguf(path, with_tokenizer=False)


@pytest.mark.parametrize("kind", sorted(ARCH))
def test_a_cut_moe_gguf_reads_back_as_its_sub_network(tmp_path, kind):
    """A sub-network written with --subnetwork (6 of 8 experts, narrower, top-2) reads back as
    a full model whose logits are the source's elastic forward at that sub-network."""
    src = _source(kind, tmp_path / "src")
    out = tmp_path / "out"
    convert(ConvertOptions("hf", "gguf", src, str(out), subnetwork=json.dumps(CUT)))
    read = gguf_format.load_gguf(str(out / "model.gguf"), with_tokenizer=False)
    m = read.model
    assert (m.num_moe_experts, m.moe_ffn_hidden_size, m.moe_router_topk) == (6, 16, 2)
    ids = torch.tensor([IDS])
    close(
        f"{kind} cut GGUF read back",
        elastic_logits(read, ids),
        elastic_logits(load_hf(src), ids, CUT),
    )
