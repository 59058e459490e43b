"""Bad input to the tools: a clear one-line error naming the problem, exit status 2, no traceback,
nothing half-written; loading never runs code from a checkpoint; training never saves NaNs.

``REFUSED_INPUTS`` lists (what is wrong, the tool, what its error says); scripts/make_error_table.py
turns it (and test_arguments.REFUSED_FLAGS) into docs/errors.md.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest
from helpers import write_training_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, megatron_single_process):
    return write_training_setup(str(tmp_path_factory.mktemp("bad_input")), docs=60)


def run_tool(tool: str, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", tool), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def assert_refused(out: subprocess.CompletedProcess, message: str) -> None:
    """Exit 2, the message on stderr, no traceback."""
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert message in out.stderr, out.stderr[-3000:]


def _shards(ckpt: str) -> str:
    return os.path.join(ckpt, "release")


def truncate(path: str, keep: float = 0.5) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def corrupt_vocab(ckpt: str) -> None:
    import json

    file = os.path.join(ckpt, "flextron_config.json")
    config = json.loads(open(file).read())
    config["model"]["vocab_size"] = 256  # the stored embedding has 320 rows
    open(file, "w").write(json.dumps(config))


def truncate_shard(ckpt: str) -> None:
    for shard in glob.glob(os.path.join(_shards(ckpt), "*.distcp")):
        truncate(shard, 0.3)


def empty_shard(ckpt: str) -> None:
    for shard in glob.glob(os.path.join(_shards(ckpt), "*.distcp")):
        open(shard, "wb").close()


# (what is wrong, how to make it from a good checkpoint, expected part of the message)
CORRUPTIONS = [
    ("vocab_size in flextron_config.json disagrees with the stored embedding", corrupt_vocab,
     "embedding.word_embeddings.weight is stored with shape (320, 64), but flextron_config.json "
     "implies (256, 64)"),
    ("a truncated .distcp shard", truncate_shard, "cannot read the shards in"),
    ("an empty .distcp shard", empty_shard, "cannot read the shards in"),
    ("a truncated .metadata", lambda c: truncate(os.path.join(_shards(c), ".metadata")),
     "truncated or corrupt?"),
    ("a truncated common.pt", lambda c: truncate(os.path.join(_shards(c), "common.pt")),
     "common.pt"),
]


@pytest.mark.parametrize("what, corrupt, message", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
@pytest.mark.parametrize("tool", ["evaluate.py", "convert_checkpoint.py"])
def test_corrupted_checkpoints_are_refused_by_every_loader(
    setup, tmp_path, what, corrupt, message, tool
):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(setup["load"], ckpt)
    corrupt(ckpt)
    if tool == "evaluate.py":
        argv = ["--load", ckpt, "--wiki-split", "test", "--seq-length", "16"]
        out = run_tool(tool, *argv, "--max-sequences", "2")
    else:
        save = str(tmp_path / "out")
        argv = ["--loader", "flextron", "--saver", "hf", "--load-dir", ckpt, "--save-dir", save]
        out = run_tool(tool, *argv)
        assert not os.path.exists(save), "a failed conversion left output"
    assert_refused(out, message)


CRAFTED = """
import os, pickle
class Evil:
    def __reduce__(self):
        return (os.mkdir, ({target!r},))
with open({file!r}, "wb") as f:
    pickle.dump(Evil(), f)
"""


def craft_metadata(ckpt: str, target: str) -> None:
    """A .metadata that creates ``target`` when unpickled (written by a separate interpreter, so
    that the test process defines no class of its own)."""
    file = os.path.join(_shards(ckpt), ".metadata")
    subprocess.run([sys.executable, "-c", CRAFTED.format(target=target, file=file)], check=True)


def test_crafted_metadata_is_refused_without_running_anything(setup, tmp_path):
    from megatron_flextron.checkpoint.safe_metadata import read_dcp_metadata
    from megatron_flextron.checkpoint.state import CheckpointError

    ckpt, target = str(tmp_path / "ckpt"), str(tmp_path / "pwned")
    shutil.copytree(setup["load"], ckpt)
    # the untouched checkpoint reads like torch's own reader reads it
    from torch.distributed.checkpoint import FileSystemReader

    want = FileSystemReader(_shards(ckpt)).read_metadata()
    got = read_dcp_metadata(_shards(ckpt))
    assert got.state_dict_metadata == want.state_dict_metadata
    assert got.storage_data == want.storage_data

    craft_metadata(ckpt, target)
    with pytest.raises(CheckpointError, match="refusing posix.mkdir|refusing os.mkdir"):
        read_dcp_metadata(_shards(ckpt))
    assert not os.path.exists(target)
    out = run_tool("evaluate.py", "--load", ckpt, "--wiki-split", "test", "--seq-length", "16")
    assert_refused(out, "mkdir: not a class torch's checkpoint metadata is made of")
    save = str(tmp_path / "out")
    out = run_tool(
        "convert_checkpoint.py", "--loader", "flextron", "--saver", "hf",
        "--load-dir", ckpt, "--save-dir", save,
    )  # fmt: skip
    assert_refused(out, "mkdir: not a class torch's checkpoint metadata is made of")
    assert not os.path.exists(target) and not os.path.exists(save)


def test_out_of_vocabulary_and_negative_token_ids_are_refused(setup, tmp_path):
    for ids, bad in (([1, 2, 320], 320), ([5, -1, 3], -1)):
        tokens = tmp_path / "tokens.jsonl"
        tokens.write_text(f"[1, 2, 3]\n{ids}\n")
        out = run_tool("evaluate.py", "--load", setup["load"], "--tokens-jsonl", str(tokens))
        assert_refused(out, f"sequence 1 holds token id {bad}, outside the model's vocabulary")


def test_non_finite_weights_evaluate_non_zero_and_stop_training(setup, tmp_path):
    """A checkpoint with a NaN weight: evaluation exits 2 naming the loss; training stops at
    iteration 1 naming it and saves nothing."""
    import torch

    from megatron_flextron.checkpoint.flextron import read_flextron, save_flextron
    from megatron_flextron.checkpoint.io import atomic_output_dir

    ckpt = read_flextron(setup["load"])
    ckpt.state["decoder.layers.1.mlp.linear_fc2.weight"][0, 0] = float("nan")
    nan_dir = str(tmp_path / "nan")
    with atomic_output_dir(nan_dir) as tmp:
        save_flextron(ckpt, tmp)
    assert torch.isnan(read_flextron(nan_dir).state["decoder.layers.1.mlp.linear_fc2.weight"]).any()

    out = run_tool("evaluate.py", "--load", nan_dir, "--wiki-split", "test", "--seq-length", "16")
    assert_refused(out, "the loss of the sub-network is nan (non-finite)")

    save = str(tmp_path / "save")
    flags = ["--load", nan_dir, "--data-path", setup["data_path"], "--split", "98,2,0"]
    flags += ["--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2"]
    flags += ["--train-iters", "3", "--lr-warmup-iters", "1", "--save", save]
    flags += ["--save-interval", "1", "--eval-interval", "0"]
    out = run_tool("pretrain_flextron.py", *flags)
    assert_refused(out, "iteration 1: lm loss of budget")
    assert "is nan; training stopped without saving" in out.stderr
    assert not os.path.exists(os.path.join(save, "latest_checkpointed_iteration.txt"))


def test_check_parameters_refuses_non_finite_weights():
    import torch

    from megatron_flextron.training.guards import NonFiniteError, check_parameters, check_step

    model = torch.nn.Linear(3, 2)
    check_parameters(model, 5)
    with torch.no_grad():
        model.weight[1, 2] = float("inf")
    with pytest.raises(NonFiniteError, match="iteration 5: 1 weights are not finite"):
        check_parameters(model, 5)
    stats = {"budgets": {"1": {"lm loss": 2.0}, "0.5": {"lm loss": 2.5, "kd loss": float("nan")}}}
    with pytest.raises(NonFiniteError, match="iteration 7: kd loss of budget 0.5 is nan"):
        check_step(stats, 1.0, 7, skipped=False)
    ok = {"budgets": {"1": {"lm loss": 2.0}}}
    with pytest.raises(NonFiniteError, match="iteration 7: gradient norm is inf"):
        check_step(ok, float("inf"), 7, skipped=False)
    check_step(ok, float("inf"), 7, skipped=True)  # fp16 loss scaling skipped the step
