"""Files that lie are refused: a safetensors header whose offsets overlap, go negative or leave
gaps; a config.json that is a list, holds a string for a size, misses a size, or whose heads do
not divide the hidden size; a truncated pytorch_model.bin, or one that needs a class the safe
loader blocks; Megatron args that are not a Namespace or miss num_layers; a tracker naming a
missing iteration folder; a flextron_config.json that is a list or has unknown keys; and a
weight that --params-dtype fp16 would turn into inf.

``REFUSED_CONVERSIONS`` lists (what is wrong, --loader, how to make it, what the error says);
every case runs through tools/convert_checkpoint.py (exit 2, one line, no traceback, no output)
in one interpreter, and scripts/make_error_table.py puts them into docs/errors.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- safetensors headers ---------------------------------------------------------------------
def _rewrite_header(src: str, edit) -> None:
    """Apply ``edit(header)`` to model.safetensors' JSON header (the data stays)."""
    path = os.path.join(src, "model.safetensors")
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header, data = json.loads(f.read(length)), f.read()
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def _entries(header):
    """(name, entry) by data offset."""
    items = [(k, v) for k, v in header.items() if k != "__metadata__"]
    return sorted(items, key=lambda kv: kv[1]["data_offsets"][0])


def overlapping_offsets(src):
    def edit(header):
        (_, first), (_, second) = _entries(header)[:2]
        shift = 4  # the second tensor starts 4 bytes inside the first, keeping its length
        second["data_offsets"] = [o - shift for o in second["data_offsets"]]

    _rewrite_header(src, edit)


def negative_offset(src):
    def edit(header):
        _, first = _entries(header)[0]
        begin, end = first["data_offsets"]
        first["data_offsets"] = [begin - 8, end - 8]

    _rewrite_header(src, edit)


def gap_in_offsets(src):
    def edit(header):
        _, last = _entries(header)[-1]
        last["data_offsets"] = [o + 8 for o in last["data_offsets"]]

    _rewrite_header(src, edit)
    with open(os.path.join(src, "model.safetensors"), "ab") as f:
        f.write(b"\0" * 8)  # the file still holds every byte the header names


# -- config.json -----------------------------------------------------------------------------
def _edit_config(src, edit):
    path = os.path.join(src, "config.json")
    config = json.load(open(path))
    config = edit(config)
    json.dump(config, open(path, "w"))


def config_is_a_list(src):
    _edit_config(src, lambda c: [c])


def string_for_a_size(src):
    _edit_config(src, lambda c: {**c, "hidden_size": "64"})


def no_max_positions(src):
    _edit_config(src, lambda c: {k: v for k, v in c.items() if k != "max_position_embeddings"})


def heads_do_not_divide(src):
    drop = ("head_dim",)
    _edit_config(src, lambda c: {**{k: v for k, v in c.items() if k not in drop},
                                 "num_attention_heads": 6, "num_key_value_heads": 6})  # fmt: skip


# -- pytorch_model.bin -----------------------------------------------------------------------
def _to_bin(src) -> str:
    from safetensors.torch import load_file

    state = load_file(os.path.join(src, "model.safetensors"))
    os.remove(os.path.join(src, "model.safetensors"))
    path = os.path.join(src, "pytorch_model.bin")
    torch.save(state, path)
    return path


def truncated_bin(src):
    path = _to_bin(src)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


CRAFTED = """
import os, torch
class Evil:
    def __reduce__(self):
        return (os.mkdir, ({target!r},))
state = torch.load({file!r})
state["model.norm.weight"] = Evil()
torch.save(state, {file!r})
"""


def blocked_pickle(src):
    """A pytorch_model.bin that would create ``pwned`` when fully unpickled (written by a
    separate interpreter, so that this process defines no class of its own)."""
    path = _to_bin(src)
    target = os.path.join(os.path.dirname(src), "pwned")
    subprocess.run([sys.executable, "-c", CRAFTED.format(target=target, file=path)], check=True)


# -- Megatron args and trackers --------------------------------------------------------------
def _legacy(src, args, tracker="release", folder="release"):
    """A legacy Megatron checkpoint holding only ``args`` (the loader reads them first)."""
    shutil.rmtree(src)
    os.makedirs(os.path.join(src, folder, "mp_rank_00"))
    open(os.path.join(src, "latest_checkpointed_iteration.txt"), "w").write(tracker)
    torch.save({"args": args, "model": {}}, os.path.join(src, folder, "mp_rank_00",
                                                         "model_optim_rng.pt"))  # fmt: skip


ARGS = dict(num_layers=2, hidden_size=64, num_attention_heads=4, max_position_embeddings=64,
            padded_vocab_size=128, ffn_hidden_size=96)  # fmt: skip


def args_as_dict(src):
    _legacy(src, dict(ARGS))


def args_as_int(src):
    _legacy(src, 7)


def args_without_num_layers(src):
    _legacy(src, argparse.Namespace(**{k: v for k, v in ARGS.items() if k != "num_layers"}))


def tracker_names_missing_iteration(src):
    _legacy(src, argparse.Namespace(**ARGS), tracker="5", folder="iter_0000004")


# -- flextron_config.json --------------------------------------------------------------------
def _flextron(src, config):
    shutil.rmtree(src)
    os.makedirs(os.path.join(src, "release"))
    open(os.path.join(src, "latest_checkpointed_iteration.txt"), "w").write("release")
    json.dump(config, open(os.path.join(src, "flextron_config.json"), "w"))


def _flextron_config(**model_extra):
    from megatron_flextron.checkpoint.flextron import FORMAT_VERSION
    from megatron_flextron.config import ModelConfig

    model = ModelConfig("llama", 2, 64, 96, 4, 128, 64, num_query_groups=2).to_dict()
    return {"format_version": FORMAT_VERSION, "model": {**model, **model_extra},
            "elastic": None, "dealt_tensor_parallel_size": 1, "metadata": {}}  # fmt: skip


def flextron_config_is_a_list(src):
    _flextron(src, [_flextron_config()])


def flextron_config_unknown_key(src):
    _flextron(src, _flextron_config(num_experts=8))


# -- a value --params-dtype cannot hold --------------------------------------------------------
def beyond_fp16(src):
    from safetensors.torch import load_file, save_file

    path = os.path.join(src, "model.safetensors")
    state = load_file(path)
    state["model.layers.1.mlp.down_proj.weight"][3, 5] = -1e5
    save_file(state, path, metadata={"format": "pt"})
    return ["--params-dtype", "fp16"]


# (what is wrong, --loader, how to make it from a tiny HF Llama folder (returns extra flags, if
# any), part of the message)
REFUSED_CONVERSIONS = [
    ("safetensors data_offsets that overlap", "hf", overlapping_offsets, "overlap (bytes"),
    ("a negative safetensors data offset", "hf", negative_offset,
     "(expected sizes >= 0 and [begin, end])"),
    ("safetensors data_offsets that leave a gap", "hf", gap_in_offsets,
     "leave a gap between"),
    ("config.json that is a list", "hf", config_is_a_list,
     "config.json holds a list, expected a JSON object"),
    ("config.json with a string for a size", "hf", string_for_a_size,
     "config.json: hidden_size is '64' (a str), expected an integer"),
    ("config.json without max_position_embeddings", "hf", no_max_positions,
     "config.json has no max_position_embeddings"),
    ("attention heads that do not divide the hidden size", "hf", heads_do_not_divide,
     "6 attention heads do not divide the hidden size 64"),
    ("a truncated pytorch_model.bin", "hf", truncated_bin, "(truncated or corrupt?)"),
    ("a pytorch_model.bin that needs a class the safe loader blocks", "hf", blocked_pickle,
     "outside what the safe loader (weights_only) unpickles: refused, nothing was run"),
    ("Megatron args stored as a dict", "megatron_legacy", args_as_dict,
     "megatron args are a dict, not Megatron-LM's argparse.Namespace"),
    ("Megatron args stored as an int", "megatron_legacy", args_as_int,
     "megatron args are a int, not Megatron-LM's argparse.Namespace"),
    ("Megatron args without num_layers", "megatron_legacy", args_without_num_layers,
     "megatron args has no num_layers"),
    ("a tracker naming an iteration folder that does not exist", "megatron_legacy",
     tracker_names_missing_iteration, "names iteration 5, but"),
    ("flextron_config.json that is a list", "flextron", flextron_config_is_a_list,
     "flextron_config.json holds a list, expected a JSON object"),
    ("flextron_config.json with unknown keys", "flextron", flextron_config_unknown_key,
     "flextron_config.json model: unknown keys ['num_experts']"),
    ("--params-dtype fp16 of a weight beyond the fp16 range", "hf", beyond_fp16,
     "decoder.layers.1.mlp.linear_fc2.weight holds 100000, beyond the float16 range (max 65504)"),
]  # fmt: skip

DRIVER = """
import contextlib, io, json, sys, traceback
sys.path.insert(0, {root!r})
from tools.convert_checkpoint import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException:
            traceback.print_exc()
            rc = 1
    results.append([rc, err.getvalue()])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    from test_convert import tiny_hf

    src = str(tmp_path_factory.mktemp("hf") / "llama")
    tiny_hf("llama", src)
    return src


def test_lying_files_are_refused_in_one_line(hf_llama, tmp_path):
    """Each case through the converter's own main(): exit 2, one line naming the problem, no
    traceback, nothing written (and the blocked pickle ran nothing)."""
    runs = []
    for i, (_, loader, make, _) in enumerate(REFUSED_CONVERSIONS):
        src = str(tmp_path / f"case{i}" / "src")
        shutil.copytree(hf_llama, src)
        extra = make(src) or []
        save = str(tmp_path / f"case{i}" / "out")
        runs.append(["--loader", loader, "--saver", "hf", "--load-dir", src, *extra,
                     "--save-dir", save])  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    out = subprocess.run(
        [sys.executable, "-c", DRIVER.format(root=ROOT), json.dumps(runs)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    wrong = []  # every case checked, so that a failure lists all the cases it concerns
    for (what, _, _, message), (rc, err), argv in zip(REFUSED_CONVERSIONS, results, runs):
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        refused = rc == 2 and "Traceback" not in err and len(lines) == 1 and message in lines[0]
        if not refused or os.path.exists(argv[-1]):
            wrong.append((what, rc, err[-300:]))
    assert not wrong, "\n".join(map(repr, wrong))
    assert not os.path.exists(tmp_path / "case8" / "pwned")


def test_header_checks_agree_with_the_safetensors_library(hf_llama, tmp_path):
    """The library refuses the same three headers (and reads the untouched file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from megatron_flextron.checkpoint.safetensors_io import SafetensorsFile

    good = os.path.join(hf_llama, "model.safetensors")
    ours = SafetensorsFile(good)
    theirs = load_file(good)
    assert all(torch.equal(ours.read(name), theirs[name]) for name in ours.names)
    for make in (overlapping_offsets, negative_offset, gap_in_offsets):
        src = str(tmp_path / make.__name__)
        shutil.copytree(hf_llama, src)
        make(src)
        with pytest.raises(SafetensorError):
            load_file(os.path.join(src, "model.safetensors"))
