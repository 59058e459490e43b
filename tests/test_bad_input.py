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
import torch
from helpers import write_training_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, megatron_single_process):
    return write_training_setup(str(tmp_path_factory.mktemp("bad_input")), docs=60)


# (refused input, tool, part of its message) of the tests below that are not parametrized by
# CORRUPTIONS or PREPROCESS; the tests assert these messages
REFUSED = {
    "crafted .metadata (unpickling would run os.mkdir)": (
        "evaluate.py, convert_checkpoint.py",
        "mkdir: not a class torch's checkpoint metadata is made of",
    ),
    "--tokens-jsonl id >= the vocabulary size": (
        "evaluate.py",
        "sequence 1 holds token id 320, outside the model's vocabulary",
    ),
    "--tokens-jsonl negative id": (
        "evaluate.py",
        "sequence 1 holds token id -1, outside the model's vocabulary",
    ),
    "a checkpoint with a NaN weight (evaluation)": (
        "evaluate.py",
        "the loss of the sub-network is nan (non-finite)",
    ),
    "a checkpoint with a NaN weight (generation, serving)": (
        "generate.py, run_text_generation_server.py",
        "1 of its tensors hold NaN or inf (first: decoder.layers.1.mlp.linear_fc2.weight)",
    ),
    "a checkpoint with a NaN weight (training)": (
        "pretrain_flextron.py",
        "iteration 1: lm loss of budget",
    ),
    "resuming into a --save of another architecture than --load": (
        "pretrain_flextron.py",
        "--save SAVE holds a training checkpoint of another architecture than --load LOAD "
        "(activation gelu vs swiglu",
    ),
    "--seq-length beyond max_position_embeddings (learned positions)": (
        "pretrain_flextron.py, evaluate.py",
        "--seq-length 128 is beyond the model's max_position_embeddings 64: its learned position "
        "table has 64 rows",
    ),
    "a truncated tokenizer.json": (
        "convert_checkpoint.py",
        "tokenizer.json is unreadable (truncated?)",
    ),
    "a missing --load-dir": ("convert_checkpoint.py", "does not exist"),
    "a missing --load": ("evaluate.py", "does not exist"),
    "a second writer of the same output folder": (
        "convert_checkpoint.py (any atomic output)",
        "another process (PID@HOST) is writing",
    ),
}


def clean_env() -> dict:
    """This environment without the single-process fixture's rendezvous (a child would reuse
    its port)."""
    return {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}


def run_tool(tool: str, *argv: str) -> subprocess.CompletedProcess:
    env = clean_env()
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
def truncate_metadata(ckpt: str) -> None:
    truncate(os.path.join(_shards(ckpt), ".metadata"))


def truncate_common(ckpt: str) -> None:
    # megatron-core 0.19 keeps the common state inside the shards; a common.pt beside them
    # (what older releases wrote) is read first, by megatron too
    path = os.path.join(_shards(ckpt), "common.pt")
    torch.save({"iteration": 1}, path)
    truncate(path)


CORRUPTIONS = [
    (
        "vocab_size in flextron_config.json disagrees with the stored embedding",
        corrupt_vocab,
        "embedding.word_embeddings.weight is stored with shape (320, 64), but "
        "flextron_config.json implies (256, 64)",
    ),
    ("a truncated .distcp shard", truncate_shard, "cannot read the shards in"),
    ("an empty .distcp shard", empty_shard, "cannot read the shards in"),
    ("a truncated .metadata", truncate_metadata, "(truncated or corrupt?)"),
    ("a truncated (pre-0.19) common.pt", truncate_common, "common.pt"),
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
    out = run_tool("evaluate.py", "--load", ckpt, "--wiki-split", "test", "--max-sequences", "2")
    assert_refused(out, REFUSED["crafted .metadata (unpickling would run os.mkdir)"][1])
    save = str(tmp_path / "out")
    out = run_tool(
        "convert_checkpoint.py", "--loader", "flextron", "--saver", "hf",
        "--load-dir", ckpt, "--save-dir", save,
    )  # fmt: skip
    assert_refused(out, REFUSED["crafted .metadata (unpickling would run os.mkdir)"][1])
    assert not os.path.exists(target) and not os.path.exists(save)


def test_out_of_vocabulary_and_negative_token_ids_are_refused(setup, tmp_path):
    for ids, case in (([1, 2, 320], "id >= the vocabulary size"), ([5, -1, 3], "negative id")):
        tokens = tmp_path / "tokens.jsonl"
        tokens.write_text(f"[1, 2, 3]\n{ids}\n")
        out = run_tool("evaluate.py", "--load", setup["load"], "--tokens-jsonl", str(tokens))
        assert_refused(out, REFUSED[f"--tokens-jsonl {case}"][1])


def test_non_finite_weights_evaluate_non_zero_and_stop_training(setup, tmp_path):
    """A checkpoint with a NaN weight: evaluation exits 2 naming the loss, generation and the
    server naming the tensor; training stops at iteration 1 naming it and saves nothing."""
    import torch

    from megatron_flextron.checkpoint.flextron import read_flextron, save_flextron
    from megatron_flextron.checkpoint.io import atomic_output_dir

    ckpt = read_flextron(setup["load"])
    ckpt.state = dict(ckpt.state)  # read into memory to edit it
    ckpt.state["decoder.layers.1.mlp.linear_fc2.weight"][0, 0] = float("nan")
    nan_dir = str(tmp_path / "nan")
    with atomic_output_dir(nan_dir) as tmp:
        save_flextron(ckpt, tmp)
    assert torch.isnan(read_flextron(nan_dir).state["decoder.layers.1.mlp.linear_fc2.weight"]).any()

    evaluate = ["--wiki-split", "test", "--seq-length", "16", "--max-sequences", "4"]
    out = run_tool("evaluate.py", "--load", nan_dir, *evaluate)
    assert_refused(out, REFUSED["a checkpoint with a NaN weight (evaluation)"][1])

    # generation and serving refuse it at load time, as evaluation refuses its loss
    refusal = REFUSED["a checkpoint with a NaN weight (generation, serving)"][1]
    out = run_tool("generate.py", "--load", nan_dir, "--prompt", "The", "--max-new-tokens", "2")
    assert_refused(out, refusal)
    out = run_tool("run_text_generation_server.py", "--load", nan_dir, "--port", "0")
    assert_refused(out, refusal)

    save = str(tmp_path / "save")
    flags = ["--load", nan_dir, "--data-path", setup["data_path"], "--split", "98,2,0"]
    flags += ["--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2"]
    flags += ["--train-iters", "3", "--lr-warmup-iters", "1", "--save", save]
    flags += ["--save-interval", "1", "--eval-interval", "0"]
    out = run_tool("pretrain_flextron.py", *flags)
    assert_refused(out, REFUSED["a checkpoint with a NaN weight (training)"][1])
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


# (what is wrong, the --input file's content, part of the message)
PREPROCESS = [
    ('{"text": 123} in a .jsonl', '{"text": "fine"}\n{"text": 123}\n', ":2: 'text' holds a int"),
    ("an empty input file", "", "the input is empty"),
    ("an input of blank lines", "\n\n", "the input is empty"),
]


@pytest.mark.parametrize("what, content, message", PREPROCESS, ids=[p[0] for p in PREPROCESS])
def test_preprocess_refuses_non_text_and_empty_input(setup, tmp_path, what, content, message):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(content)
    prefix = str(tmp_path / "out" / "data")
    tok = os.path.join(setup["load"], "tokenizer")
    out = run_tool(
        "preprocess_data.py", "--input", str(docs), "--output-prefix", prefix,
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok,
    )  # fmt: skip
    assert_refused(out, message)
    assert not glob.glob(prefix + "*"), "a refused input left a dataset"


def _dead_pid() -> int:
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                         capture_output=True, text=True)  # fmt: skip
    return int(out.stdout)


def test_stale_temporaries_are_removed_live_ones_kept(tmp_path, capsys):
    """A killed writer's ``.NAME.tmp-PID@HOST-*`` is removed by the next write of the same
    output (and said on stderr); a live writer's, another host's and another output's stay."""
    import socket

    from megatron_flextron.checkpoint.io import atomic_output_dir

    host = socket.gethostname()
    dead = tmp_path / f".out.tmp-{_dead_pid()}@{host}-abc123"
    live = tmp_path / f".out.tmp-{os.getpid()}@{host}-def456"
    remote = tmp_path / f".out.tmp-{_dead_pid()}@not-{host}-ghi789"
    other = tmp_path / f".other.tmp-{_dead_pid()}@{host}-jkl012"
    for d in (dead, live, remote, other):
        (d / "shard").mkdir(parents=True)
    with atomic_output_dir(str(tmp_path / "out")) as tmp:
        open(os.path.join(tmp, "file"), "w").close()
    assert (tmp_path / "out" / "file").exists()
    assert not dead.exists() and live.exists() and remote.exists() and other.exists()
    err = capsys.readouterr().err
    assert f"removing {dead}: a temporary of {tmp_path / 'out'} left by process" in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == sorted(
        [live.name, remote.name]
    )  # no lock file left either


def test_two_writers_of_one_output_do_not_race(tmp_path, capsys):
    import socket

    from megatron_flextron.checkpoint.io import atomic_output_dir
    from megatron_flextron.checkpoint.state import CheckpointError

    out = str(tmp_path / "out")
    with atomic_output_dir(out):
        with pytest.raises(CheckpointError) as refused:
            with atomic_output_dir(out):
                pass
    message = REFUSED["a second writer of the same output folder"][1]
    assert message.replace("PID@HOST", f"{os.getpid()}@{socket.gethostname()}") in str(
        refused.value
    )
    shutil.rmtree(out)  # the first one's (empty) output
    # a lock left by a killed writer is taken over
    (tmp_path / ".out.lock").write_text(f"{_dead_pid()}@{socket.gethostname()}")
    with atomic_output_dir(out) as tmp:
        open(os.path.join(tmp, "file"), "w").close()
    assert "removing the stale lock" in capsys.readouterr().err
    assert os.listdir(out) == ["file"] and not (tmp_path / ".out.lock").exists()


def test_truncated_tokenizer_is_refused_at_copy_time(setup, tmp_path):
    tok = tmp_path / "tok"
    shutil.copytree(os.path.join(setup["load"], "tokenizer"), tok)
    truncate(str(tok / "tokenizer.json"))
    hf = tmp_path / "hf"
    from megatron_flextron.checkpoint.flextron import read_flextron
    from megatron_flextron.checkpoint.io import copy_tokenizer
    from megatron_flextron.checkpoint.state import CheckpointError

    with pytest.raises(CheckpointError, match="tokenizer.json is unreadable \\(truncated\\?\\)"):
        copy_tokenizer(str(tok), str(tmp_path / "copy"))
    assert not (tmp_path / "copy").exists()
    # through the converter: a flextron checkpoint whose tokenizer was truncated
    ckpt = tmp_path / "ckpt"
    shutil.copytree(setup["load"], ckpt)
    truncate(str(ckpt / "tokenizer" / "tokenizer.json"))
    assert read_flextron(str(ckpt)).tokenizer_dir
    out = run_tool(
        "convert_checkpoint.py", "--loader", "flextron", "--saver", "flextron",
        "--load-dir", str(ckpt), "--save-dir", str(hf),
    )  # fmt: skip
    assert_refused(out, REFUSED["a truncated tokenizer.json"][1])
    assert not hf.exists()


def test_missing_load_dir_says_it_does_not_exist(tmp_path):
    missing = str(tmp_path / "nowhere")
    out = run_tool(
        "convert_checkpoint.py", "--loader", "flextron", "--saver", "hf",
        "--load-dir", missing, "--save-dir", str(tmp_path / "out"),
    )  # fmt: skip
    assert_refused(out, f"--load-dir {missing} {REFUSED['a missing --load-dir'][1]}")
    out = run_tool("evaluate.py", "--load", missing, "--wiki-split", "test")
    assert_refused(out, f"checkpoint {missing} {REFUSED['a missing --load'][1]}")


# (tool, flags, part of argparse's message): sizes and counts of the tools are integers >= 1
TOOL_FLAGS = [
    ("convert_checkpoint.py", ["--target-tensor-parallel-size", "0"], "0 must be >= 1"),
    ("convert_checkpoint.py", ["--target-pipeline-parallel-size", "-2"], "-2 must be >= 1"),
    ("convert_checkpoint.py", ["--calibration-samples", "x"], "'x' is not an integer"),
    ("evaluate.py", ["--seq-length", "0"], "argument --seq-length: 0 must be >= 1"),
    ("evaluate.py", ["--micro-batch-size", "0"], "argument --micro-batch-size: 0 must be >= 1"),
    ("evaluate.py", ["--tensor-model-parallel-size", "0"], "0 must be >= 1"),
    ("run_text_generation_server.py", ["--port", "99999"],
     "argument --port: 99999 is not a port number in [0, 65535]"),
    ("run_text_generation_server.py", ["--port", "-1"],
     "argument --port: -1 is not a port number in [0, 65535]"),
]


@pytest.mark.parametrize("tool, flags, message", TOOL_FLAGS)
def test_tool_sizes_are_positive_integers(tool, flags, message, capsys):
    import importlib

    base = {
        "convert_checkpoint.py": ["--loader", "hf", "--saver", "flextron"],
        "evaluate.py": ["--load", "x", "--wiki-split", "test"],
        "run_text_generation_server.py": ["--load", "x"],
    }[tool]
    base += ["--load-dir", "x", "--save-dir", "y"] if tool == "convert_checkpoint.py" else []
    parse_args = importlib.import_module(f"tools.{tool[:-3]}").parse_args
    with pytest.raises(SystemExit) as exit_info:
        parse_args(base + flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_error_table_in_the_docs_is_current():
    """docs/errors.md is what scripts/make_error_table.py makes from the cases above."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from make_error_table import table

    with open(os.path.join(ROOT, "docs", "errors.md")) as f:
        assert f.read() == table(), "run: python scripts/make_error_table.py"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("vocab_size", 256, "embedding.word_embeddings.weight is stored with shape (320, 64)"),
        ("ffn_hidden_size", 96, "mlp.linear_fc1.weight is stored with shape (256, 64)"),
        ("hidden_size", 32, "embedding.word_embeddings.weight is stored with shape (320, 64)"),
        ("num_layers", 3, "unexpected ['decoder.layers.3."),
        ("num_layers", 5, "missing ['decoder.layers.4."),
        ("tie_embeddings", True, "unexpected ['output_layer.weight']"),
    ],
)
def test_every_config_shape_is_checked_against_the_stored_tensors(setup, key, value, message):
    """From the shard metadata only (no tensor is read)."""
    from megatron_flextron.checkpoint.flextron import check_stored_shapes, read_config
    from megatron_flextron.checkpoint.state import CheckpointError
    from megatron_flextron.config import ModelConfig

    config = read_config(setup["load"])["model"]
    check_stored_shapes(setup["load"], ModelConfig.from_dict(config))
    with pytest.raises(CheckpointError) as refused:
        check_stored_shapes(setup["load"], ModelConfig.from_dict({**config, key: value}))
    assert message in str(refused.value)


@pytest.fixture(scope="module")
def learned(setup, tmp_path_factory):
    """The setup's model with learned absolute positions (GPT-3 style, 64 of them)."""
    from helpers import elastic_choices, random_canonical_state, tiny_config

    from megatron_flextron.checkpoint.flextron import save_flextron
    from megatron_flextron.checkpoint.state import Checkpoint

    model = tiny_config("gpt3", vocab_size=320)
    tokenizer = os.path.join(os.path.dirname(setup["load"]), "tokenizer")
    ckpt = Checkpoint(model, random_canonical_state(model), tokenizer, elastic_choices(model))
    path = str(tmp_path_factory.mktemp("learned") / "ckpt")
    os.makedirs(path)
    save_flextron(ckpt, path)
    return path


def _files(path: str) -> list:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, n in os.walk(path) for f in n)


def _train_flags(setup, load: str, save: str, seq_length: int = 16) -> list:
    flags = ["--load", load, "--data-path", setup["data_path"], "--split", "98,2,0"]
    flags += ["--seq-length", str(seq_length), "--micro-batch-size", "2"]
    flags += ["--global-batch-size", "2", "--train-iters", "2", "--lr-warmup-iters", "1"]
    return flags + ["--save", save, "--save-interval", "1", "--eval-interval", "0"]


def test_resuming_into_a_save_of_another_architecture_is_refused(setup, learned, tmp_path):
    """--save holds a (GPT-3) checkpoint, --load a Llama one: resuming would train the --save
    model and ignore --load; refused naming both, nothing written."""
    save = str(tmp_path / "save")
    shutil.copytree(learned, save)
    before = _files(save)
    out = run_tool("pretrain_flextron.py", *_train_flags(setup, setup["load"], save))
    message = REFUSED["resuming into a --save of another architecture than --load"][1]
    assert_refused(out, message.replace("SAVE", save).replace("LOAD", setup["load"]))
    assert _files(save) == before and not glob.glob(str(tmp_path / ".save*"))


def test_seq_length_beyond_the_positions_is_refused_or_warned(setup, learned, tmp_path):
    """Learned positions have no row past max_position_embeddings (64): training and evaluation
    refuse --seq-length 128 (it was an IndexError); RoPE extrapolates: evaluation warns, runs."""
    message = REFUSED["--seq-length beyond max_position_embeddings (learned positions)"][1]
    save = str(tmp_path / "save")
    out = run_tool("pretrain_flextron.py", *_train_flags(setup, learned, save, seq_length=128))
    assert_refused(out, message)
    assert not os.path.exists(save)
    evaluate = ["--wiki-split", "test", "--seq-length", "128", "--max-sequences", "2"]
    assert_refused(run_tool("evaluate.py", "--load", learned, *evaluate), message)
    out = run_tool("evaluate.py", "--load", setup["load"], *evaluate)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        "warning: --seq-length 128 is beyond the model's max_position_embeddings 64: RoPE runs "
        "past the positions it was trained on"
    ) in out.stderr
