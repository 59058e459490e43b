"""Streaming conversion: tensors are read when used and once, the source dtype is kept, the
safetensors reader/writer agree with the safetensors library, and per-layer reads of stacked
torch_dist keys equal the whole key's rows."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_convert import TOKENS, hf_logits, tiny_hf

from megatron_flextron.checkpoint import safetensors_io
from megatron_flextron.checkpoint.dcp_reader import StoredTensors
from megatron_flextron.checkpoint.flextron import iteration_dir, read_flextron
from megatron_flextron.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from megatron_flextron.checkpoint.state import CheckpointError, TensorSpec
from megatron_flextron.convert import ConvertOptions, convert, load_checkpoint
from megatron_flextron.convert.formats.hf import save_hf

pytestmark = pytest.mark.usefixtures("megatron_single_process")


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b.f32": torch.randn(7, generator=g),
        "c.f16": torch.randn(2, 2, 2, generator=g).half(),
        "d.i64": torch.arange(6).reshape(2, 3),
        "e.empty": torch.zeros(0, 4),
    }


def test_safetensors_io_agrees_with_the_library(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = _tensors()
    ours = str(tmp_path / "ours.safetensors")
    specs = [(k, TensorSpec.of(v)) for k, v in tensors.items()]
    write_safetensors(ours, specs, iter(tensors.items()), metadata={"format": "pt"})
    with safe_open(ours, "pt") as f:  # the library reads our file
        assert f.metadata() == {"format": "pt"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v) and f.get_tensor(k).dtype == v.dtype
    theirs = str(tmp_path / "theirs.safetensors")
    save_file(tensors, theirs)
    for path in (ours, theirs):  # we read the library's file and ours
        f = SafetensorsFile(path)
        assert sorted(f.names) == sorted(tensors)
        for k, v in tensors.items():
            assert f.spec(k) == TensorSpec.of(v)
            assert torch.equal(f.read(k), v) and f.read(k).dtype == v.dtype
    # a producer that breaks its promise is stopped
    with pytest.raises(CheckpointError, match="expected a.bf16"):
        write_safetensors(ours, specs, iter([("b.f32", tensors["b.f32"])]))
    with pytest.raises(CheckpointError, match="e.empty was never produced"):
        write_safetensors(ours, specs, iter(list(tensors.items())[:-1]))


def test_truncated_safetensors_is_named(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "model.safetensors")
    save_file(_tensors(), path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(path)
    with open(path, "r+b") as f:
        f.truncate(5)
    with pytest.raises(CheckpointError, match="cannot read"):
        SafetensorsFile(path)


def test_conversion_reads_each_source_tensor_once_and_only_when_written(tmp_path, monkeypatch):
    """Loading reads nothing; hf -> flextron reads every stored tensor exactly once (tensors are
    streamed into the saver's model, not gathered into a dict first)."""
    tiny_hf("llama", str(tmp_path / "hf"))
    reads = []
    original = SafetensorsFile.read
    monkeypatch.setattr(
        SafetensorsFile, "read", lambda self, n: reads.append(n) or original(self, n)
    )
    ckpt = load_checkpoint("hf", str(tmp_path / "hf"))
    assert reads == []  # lazy: shapes and dtypes come from the header
    stored = SafetensorsFile(str(tmp_path / "hf" / "model.safetensors")).names
    convert(ConvertOptions("hf", "flextron", str(tmp_path / "hf"), str(tmp_path / "fx")))
    assert sorted(reads) == sorted(stored), "each source tensor read exactly once"
    assert len(ckpt.state) == len(read_flextron(str(tmp_path / "fx")).state)


def test_bf16_stays_bf16_and_shards_load_in_transformers(tmp_path):
    """A bf16 source is written bf16 by every saver (bit-identical), and an HF export split into
    several safetensors files with an index loads in transformers to the same logits."""
    model = tiny_hf("llama", str(tmp_path / "hf32"))
    model.to(torch.bfloat16).save_pretrained(str(tmp_path / "hf"))
    source = load_checkpoint("hf", str(tmp_path / "hf"))
    assert {source.state.specs[k].dtype for k in source.state} == {torch.bfloat16}
    convert(ConvertOptions("hf", "flextron", str(tmp_path / "hf"), str(tmp_path / "fx"),
                           target_tensor_parallel_size=2))  # fmt: skip
    fx = read_flextron(str(tmp_path / "fx"))
    for name in source.state:
        assert fx.state[name].dtype == torch.bfloat16
        assert torch.equal(fx.state[name], source.state[name]), name
    convert(ConvertOptions("flextron", "megatron", str(tmp_path / "fx"), str(tmp_path / "meg")))
    meg = load_checkpoint("megatron", str(tmp_path / "meg"))
    assert all(torch.equal(meg.state[k], source.state[k]) for k in source.state)
    out = tmp_path / "sharded"
    os.makedirs(out)
    save_hf(fx, str(out), max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((out / f).is_file() for f in files)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = load_checkpoint("hf", str(out))
    assert all(torch.equal(back.state[k], source.state[k]) for k in source.state)
    torch.testing.assert_close(
        hf_logits(str(out), TOKENS), hf_logits(str(tmp_path / "hf"), TOKENS), rtol=0, atol=0
    )


def test_layer_reads_of_stacked_keys_equal_the_whole_key(tmp_path):
    """A flextron checkpoint dealt for TP=2 stores every layer's shard of a stacked key as its
    own chunk; reading layer i combines its chunks and equals row i of the whole key."""
    tiny_hf("llama", str(tmp_path / "hf"))
    convert(ConvertOptions("hf", "flextron", str(tmp_path / "hf"), str(tmp_path / "fx"),
                           target_tensor_parallel_size=2))  # fmt: skip
    stored = StoredTensors(iteration_dir(str(tmp_path / "fx")))
    stacked = [k for k in stored.tensors if k.startswith("decoder.layers.")]
    assert "decoder.layers.self_attention.linear_qkv.weight" in stacked
    for key in stacked:
        whole = stored.read(key)
        for i in range(whole.size(0)):
            assert torch.equal(stored.read_layer(key, i), whole[i]), (key, i)
    with pytest.raises(CheckpointError, match="has no layer 2"):
        stored.read_layer(stacked[0], 2)


def test_size_of_written_files_is_the_header_plus_data(tmp_path):
    """The writer pads the header to 8 bytes and writes exactly the tensors' bytes."""
    tensors = _tensors()
    path = str(tmp_path / "x.safetensors")
    specs = [(k, TensorSpec.of(v)) for k, v in tensors.items()]
    write_safetensors(path, specs, iter(tensors.items()))
    f = SafetensorsFile(path)
    assert f.data_start % 8 == 0
    assert os.path.getsize(path) == f.data_start + sum(s.nbytes for _, s in specs)
    # 30 + 28 bytes, then 16 + 48 + 0: a group closes before it would pass 64 bytes
    assert safetensors_io.shard_specs(specs, 64) == [specs[:2], specs[2:]]
    assert safetensors_io.shard_specs(specs, 10) == [[s] for s in specs]  # one per file


def test_bf16_flextron_checkpoint_loads_into_an_fp32_model(tmp_path):
    """Training and evaluation build fp32 models: a bf16 checkpoint (dealt for this TP size, so
    megatron's own sharded load) fills them with the same values."""
    from megatron_flextron.checkpoint.flextron import load_flextron_into_model
    from megatron_flextron.elastic import build_gpt_model

    hf32 = tiny_hf("llama", str(tmp_path / "hf32"))
    hf32.to(torch.bfloat16).save_pretrained(str(tmp_path / "hf"))
    convert(ConvertOptions("hf", "flextron", str(tmp_path / "hf"), str(tmp_path / "fx")))
    source = load_checkpoint("hf", str(tmp_path / "hf"))
    gpt = build_gpt_model(source.model, source.model.transformer_config(), elastic=True)
    load_flextron_into_model(gpt, str(tmp_path / "fx"))
    for name, p in gpt.named_parameters():
        assert p.dtype == torch.float32
        assert torch.equal(p.detach(), source.state[name].float()), name


def test_params_dtype_converts_when_asked(tmp_path):
    """--params-dtype: an fp32 source written as bf16 (each tensor rounded once, as .to() does);
    an unknown dtype is refused before anything is written."""
    tiny_hf("llama", str(tmp_path / "hf"))
    opts = ConvertOptions("hf", "hf", str(tmp_path / "hf"), str(tmp_path / "bf16"))
    opts.params_dtype = "bf16"
    convert(opts)
    source = load_checkpoint("hf", str(tmp_path / "hf"))
    out = load_checkpoint("hf", str(tmp_path / "bf16"))
    for name in source.state:
        assert out.state[name].dtype == torch.bfloat16
        assert torch.equal(out.state[name], source.state[name].to(torch.bfloat16)), name
    opts = ConvertOptions(
        "hf", "hf", str(tmp_path / "hf"), str(tmp_path / "bad"), params_dtype="fp8"
    )
    with pytest.raises(CheckpointError, match="unknown params dtype 'fp8'"):
        convert(opts)
    assert not os.path.exists(tmp_path / "bad")


def test_mixed_dtypes_are_written_without_rounding():
    """fp32 norms beside bf16 weights: the savers' dtype is fp32, so nothing is rounded."""
    from megatron_flextron.checkpoint.state import state_dtype

    state = {"embedding.word_embeddings.weight": torch.zeros(2, 2, dtype=torch.bfloat16),
             "decoder.final_layernorm.weight": torch.ones(2)}  # fmt: skip
    assert state_dtype(state) == torch.float32
    state["decoder.final_layernorm.weight"] = torch.ones(2, dtype=torch.bfloat16)
    assert state_dtype(state) == torch.bfloat16
