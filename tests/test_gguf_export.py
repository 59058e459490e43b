"""GGUF export (``--saver gguf``) run in llama.cpp (llama-cpp-python, built by
scripts/build_llama_cpp.sh): its logits equal the elastic forward of the same sub-network.

Relative error below is max |llama.cpp - elastic| / max |elastic| over every position and token.
The llama.cpp context keeps its KV cache in f32 (its default is f16) so that an f32 file is
compared at f32.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from helpers import random_canonical_state, tiny_config
from test_bad_input import ROOT, assert_refused, run_tool
from test_convert import megatron_logits

from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError
from megatron_flextron.convert import GGUF_TYPES
from megatron_flextron.convert.export import export_subnetwork
from megatron_flextron.convert.formats import gguf as gguf_format
from megatron_flextron.convert.formats.gguf import bundled_smollm2, load_gguf, save_gguf
from megatron_flextron.elastic import Subnetwork

pytestmark = pytest.mark.usefixtures("megatron_single_process")
llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")
TEXT = "The capital of France is Paris. The Eiffel Tower was built in 1889 for the World's Fair."
F32_BOUND = 1e-3
N = 30  # SmolLM2's layers
PER_LAYER = {  # every MLP width and head count of its elastic choices, two layers skipped
    "mlp": [[1536, 1152, 768, 384][i % 4] for i in range(N)],
    "heads": [[9, 6, 3][i % 3] for i in range(N)],
    "layers": [i for i in range(N) if i not in (7, 20)],
}


def llama_cpp_run(path: str, ids):
    """(logits [len(ids), vocab], llama.cpp's own tokens of TEXT, the file's architecture)."""
    llm = llama_cpp.Llama(
        model_path=path,
        logits_all=True,
        n_ctx=64,
        n_batch=64,
        n_threads=1,
        type_k=0,  # GGML_TYPE_F32
        type_v=0,
        flash_attn=False,
        verbose=False,
    )
    try:
        llm.eval(list(ids))
        logits = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
        tokens = llm.tokenize(TEXT.encode(), add_bos=False, special=False)
        arch = llm.metadata["general.architecture"]
    finally:
        llm.close()
    return logits, tokens, arch


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def tensor_types(path: str) -> dict:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def smol():
    return load_gguf(bundled_smollm2())


@pytest.fixture(scope="module")
def smol_ids(smol):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(smol.tokenizer_dir, "tokenizer.json"))
    return tok.encode(TEXT, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def elastic(smol, smol_ids):
    """The elastic forward's logits of SmolLM2 at a sub-network (each computed once)."""
    cache = {}

    def logits(spec):
        key = json.dumps(spec)
        if key not in cache:
            cache[key] = megatron_logits(smol, torch.tensor([smol_ids]), spec)[0]
        return cache[key]

    return logits


def _export(ckpt, spec, out, gguf_type=None) -> str:
    sub = export_subnetwork(ckpt, Subnetwork.parse(spec, ckpt.model)) if spec else ckpt
    os.makedirs(out)
    return save_gguf(sub, str(out), gguf_type)


def test_smollm2_full_size_through_the_cli(elastic, smol_ids, tmp_path):
    """The converter end to end (loader gguf, saver gguf, default type: the source's f32); the
    file's tokenizer splits text as the checkpoint's tokenizer does."""
    out = tmp_path / "full"
    done = run_tool(
        "convert_checkpoint.py", "--loader", "gguf", "--saver", "gguf",
        "--load-dir", bundled_smollm2(), "--save-dir", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert os.listdir(out) == ["model.gguf"]
    path = str(out / "model.gguf")
    assert set(tensor_types(path).values()) == {"F32"}
    logits, tokens, arch = llama_cpp_run(path, smol_ids)
    assert arch == "llama" and tokens == smol_ids
    err = relative_error(logits, elastic(None))
    print(f"SmolLM2 full f32: max relative error {err:.2e}")
    assert err <= F32_BOUND


@pytest.mark.parametrize(
    "name, spec, arch",
    [("homogeneous", {"mlp": 768, "heads": 6}, "llama"), ("per_layer", PER_LAYER, "deci")],
)
def test_smollm2_subnetwork_in_llama_cpp_equals_the_elastic_forward(
    smol, smol_ids, elastic, tmp_path, name, spec, arch
):
    path = _export(smol, spec, tmp_path / name, "f32")
    logits, _, got_arch = llama_cpp_run(path, smol_ids)
    assert got_arch == arch
    err = relative_error(logits, elastic(spec))
    print(f"SmolLM2 {name} f32: max relative error {err:.2e}")
    assert err <= F32_BOUND


@pytest.mark.parametrize("gguf_type, bound", [("f16", 0.01), ("bf16", 0.03), ("q8_0", 0.15)])
def test_smollm2_lower_precision_within_its_bound(
    elastic, smol, smol_ids, tmp_path, gguf_type, bound
):
    """Bounds: about 4x the errors measured (docs/conversion.md); Q8_0 rounds the weights and,
    in llama.cpp's matrix products, the activations too."""
    path = _export(smol, None, tmp_path / gguf_type, gguf_type)
    types = tensor_types(path)
    assert types["blk.0.ffn_up.weight"] == gguf_type.upper()
    assert types["blk.0.attn_norm.weight"] == "F32"
    logits, _, _ = llama_cpp_run(path, smol_ids)
    err = relative_error(logits, elastic(None))
    print(f"SmolLM2 full {gguf_type}: max relative error {err:.2e}")
    assert err <= bound


def _tokenizer(directory) -> str:
    """A byte-level BPE tokenizer with GPT-2's pre-tokenizer, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<|endoftext|>"])
    tok.train_from_iterator([TEXT] * 4, trainer)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    return str(directory)


def _tiny(family, tmp_path, **overrides) -> Checkpoint:
    model = tiny_config(family, **overrides)
    return Checkpoint(model, random_canonical_state(model), _tokenizer(tmp_path / "tok"))


IDS = [int(i) for i in torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(3))]


@pytest.mark.parametrize("spec", [None, {"mlp": 64}, {"mlp": 96, "layers": [0, 2, 3]}])
def test_gpt2_style_model_runs_as_llama_cpp_gpt2(tmp_path, spec):
    ckpt = _tiny("gpt3", tmp_path, activation="gelu_tanh")
    path = _export(ckpt, spec, tmp_path / "out", "f32")
    logits, _, arch = llama_cpp_run(path, IDS)
    assert arch == "gpt2"
    err = relative_error(logits, megatron_logits(ckpt, torch.tensor([IDS]), spec)[0])
    print(f"GPT-2 style {spec} f32: max relative error {err:.2e}")
    assert err <= F32_BOUND


def test_f32_file_reads_back_exactly_and_types_follow_the_source(tmp_path):
    """The saver's RoPE permutation is the loader's inverse; --gguf-type defaults to the
    state's dtype; norms stay f32; a Q8_0 row not in blocks of 32 falls back to f16."""
    ckpt = _tiny("llama", tmp_path)
    back = load_gguf(_export(ckpt, None, tmp_path / "f32"), with_tokenizer=False)
    assert all(torch.equal(back.state[k], v) for k, v in ckpt.state.items())
    assert tuple(gguf_format.GGUF_TYPES) == GGUF_TYPES
    state = {k: v.bfloat16() for k, v in ckpt.state.items()}
    bf16 = Checkpoint(ckpt.model, state, ckpt.tokenizer_dir)
    types = tensor_types(_export(bf16, None, tmp_path / "bf16"))
    assert types["blk.0.attn_q.weight"] == "BF16" and types["output_norm.weight"] == "F32"
    types = tensor_types(_export(ckpt, {"mlp": 48}, tmp_path / "q8", "q8_0"))
    assert types["blk.0.ffn_up.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "F16"


REFUSALS = [  # (family, model overrides, sub-network, what the message names)
    ("gpt3", {"activation": "gelu_tanh"}, {"heads": 4}, "trimmed heads (4 x 8 != 64)"),
    ("gpt3", {"activation": "gelu_tanh"}, {"mlp": [128, 64, 64, 64]}, "per-layer MLP widths"),
    ("gpt3", {}, None, "activation gelu"),
    ("gpt3", {"activation": "gelu_tanh", "position_embedding": "rope"}, None, "rope positions"),
    ("llama", {"add_qkv_bias": True}, None, "q/k/v biases"),
    ("llama", {"rope_scaling_factor": 8.0}, None, "RoPE scaling (factor 8.0)"),
    ("llama", {"normalization": "LayerNorm"}, None, "normalization LayerNorm"),
]


@pytest.mark.parametrize("family, overrides, spec, what", REFUSALS)
def test_what_llama_cpp_cannot_represent_is_refused_by_name(
    tmp_path, family, overrides, spec, what
):
    ckpt = _tiny(family, tmp_path, **overrides)
    if spec:
        ckpt = export_subnetwork(ckpt, Subnetwork.parse(spec, ckpt.model))
    with pytest.raises(CheckpointError, match="cannot represent") as e:
        gguf_format.gguf_architecture(ckpt)
    assert what in str(e.value)


def test_tokenizers_without_a_llama_cpp_equivalent_are_refused(tmp_path):
    from megatron_flextron.convert.formats.gguf_tokenizer import llama_cpp_pre, tokenizer_pre

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    assert llama_cpp_pre(byte_level) == "gpt-2"
    assert llama_cpp_pre({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == "smollm"
    with pytest.raises(CheckpointError, match="has no llama.cpp equivalent"):
        llama_cpp_pre({**byte_level, "add_prefix_space": True})
    with pytest.raises(CheckpointError, match="carries none: pass --tokenizer-model"):
        tokenizer_pre(None)
    path = os.path.join(_tokenizer(tmp_path / "tok"), "tokenizer.json")
    with open(path) as f:
        spec = json.load(f)
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    with open(path, "w") as f:
        json.dump(spec, f)
    with pytest.raises(CheckpointError, match='pre_tokenizer {"type": "Whitespace"} has no'):
        tokenizer_pre(str(tmp_path / "tok"))
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    spec["normalizer"] = {"type": "NFC"}
    with open(path, "w") as f:
        json.dump(spec, f)
    with pytest.raises(CheckpointError, match="normalizer 'NFC' has no llama.cpp equivalent"):
        tokenizer_pre(str(tmp_path / "tok"))


def test_bad_gguf_flags_exit_2_and_write_nothing(tmp_path):
    """An unknown type (argparse), a type for another saver, and (end to end, one subprocess) a
    sub-network the target architecture cannot hold: refused before anything is written."""
    import importlib.util

    from megatron_flextron.convert import ConvertOptions, convert
    from megatron_flextron.convert.formats.hf import save_hf

    tool = os.path.join(ROOT, "tools", "convert_checkpoint.py")
    spec = importlib.util.spec_from_file_location("convert_checkpoint", tool)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    src, out = tmp_path / "gpt2", str(tmp_path / "out")
    base = ["--loader", "hf", "--load-dir", str(src), "--save-dir", out]
    with pytest.raises(SystemExit) as e:
        cli.parse_args([*base, "--saver", "gguf", "--gguf-type", "q4_0"])
    assert e.value.code == 2
    ckpt = _tiny("gpt3", tmp_path, activation="gelu_tanh")
    os.makedirs(src)
    save_hf(ckpt, str(src))  # with its tokenizer
    opts = ConvertOptions("hf", "hf", str(src), out, gguf_type="f16")
    with pytest.raises(CheckpointError, match="--gguf-type applies to --saver gguf, not hf"):
        convert(opts)
    done = run_tool(
        "convert_checkpoint.py", *base, "--saver", "gguf", "--subnetwork", '{"heads": 4}'
    )
    assert_refused(done, "llama.cpp's gpt2 architecture cannot represent trimmed heads")
    assert not os.path.exists(out)
