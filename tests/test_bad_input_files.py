"""Bad input on the file system: a full disk, a read-only folder, a directory where a file
goes, a killed writer, a bad flag under torchrun: one clear line naming the problem, exit 2,
nothing left behind (the rest of the bad-input cases: test_bad_input.py).

``REFUSED_FILES`` lists (what is wrong, the tool, what its error says); scripts/make_error_table.py
puts it in docs/errors.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import write_training_setup
from test_bad_input import ROOT, _dead_pid, assert_refused, clean_env, run_tool


@pytest.fixture(scope="module")
def setup(tmp_path_factory, megatron_single_process):
    return write_training_setup(str(tmp_path_factory.mktemp("bad_files")), docs=60)


# (refused input, tool, part of its message) of the file-system cases below
REFUSED_FILES = {
    "a full disk under --save (training)": ("pretrain_flextron.py", "no space left on device"),
    "a full disk under --save-dir (conversion)": (
        "convert_checkpoint.py",
        "no space left on device",
    ),
    "--save-dir on a read-only file system": (
        "convert_checkpoint.py",
        "cannot be written",
    ),
    "--output that is a directory": ("evaluate.py", "is a directory; it must be a file"),
}


def _unshare_works() -> bool:
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "true"]
    return shutil.which("unshare") is not None and subprocess.run(cmd).returncode == 0


def run_on_small_filesystem(folder: str, size: str, tool: str, *argv: str, read_only=False):
    """Run a tool with a fresh tmpfs of ``size`` mounted at ``folder``, in a private mount
    namespace (nothing outside the command sees it); returns (run, what was left in it)."""
    # not skipped where it cannot run: the check would silently stop checking
    assert _unshare_works(), "needs unshare (user + mount namespaces) to mount a small tmpfs"
    os.makedirs(folder, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    listing = folder + ".left"  # outside the tmpfs
    script = (
        f'mount -t tmpfs -o {options} tmpfs "$1" || exit 99; shift; "$@"; rc=$?; '
        f'find "{folder}" -mindepth 1 > "{listing}"; exit $rc'
    )
    env = clean_env()
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script, "sh", folder]
    cmd += [sys.executable, os.path.join(ROOT, "tools", tool), *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode != 99, out.stderr
    with open(listing) as f:
        return out, f.read().split()


def test_full_disk_during_training_is_named_and_leaves_no_temporary(setup, tmp_path):
    """The first checkpoint does not fit: "no space left on device" naming the folder, exit 2,
    no ``iter_N.tmp`` (today: torch's "unexpected pos 704 vs 598", a traceback and the
    temporary left behind)."""
    small = str(tmp_path / "small")
    flags = ["--load", setup["load"], "--data-path", setup["data_path"], "--split", "98,2,0"]
    flags += ["--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2"]
    flags += ["--train-iters", "2", "--lr-warmup-iters", "1", "--save", f"{small}/save"]
    flags += ["--save-interval", "1", "--eval-interval", "0"]
    out, left = run_on_small_filesystem(small, "600k", "pretrain_flextron.py", *flags)
    assert_refused(out, REFUSED_FILES["a full disk under --save (training)"][1] + ": " + small)
    assert left == [f"{small}/save"], left  # the (empty) folder only, no iter_0000001.tmp


def test_full_disk_during_conversion_is_named_and_leaves_nothing(setup, tmp_path):
    small = str(tmp_path / "small")
    for saver in ("flextron", "hf"):
        argv = ["--loader", "flextron", "--saver", saver, "--load-dir", setup["load"]]
        argv += ["--save-dir", f"{small}/out"]
        out, left = run_on_small_filesystem(small, "300k", "convert_checkpoint.py", *argv)
        message = REFUSED_FILES["a full disk under --save-dir (conversion)"][1]
        assert_refused(out, f"{message}: {small}/out")
        assert left == [], left  # no temporary, no lock


def test_read_only_and_directory_outputs_are_named_before_any_work(setup, tmp_path):
    small = str(tmp_path / "ro")
    argv = ["--loader", "flextron", "--saver", "hf", "--load-dir", setup["load"]]
    out, _ = run_on_small_filesystem(
        small, "1m", "convert_checkpoint.py", *argv, "--save-dir", f"{small}/out", read_only=True
    )
    message = REFUSED_FILES["--save-dir on a read-only file system"][1]
    assert_refused(out, f"--save-dir {small}/out {message}: {small} is on a read-only file system")
    folder = tmp_path / "results"
    folder.mkdir()
    out = run_tool("evaluate.py", "--load", setup["load"], "--wiki-split", "test",
                   "--output", str(folder))  # fmt: skip
    assert_refused(out, f"--output {folder} " + REFUSED_FILES["--output that is a directory"][1])
    assert "ppl" not in out.stdout  # refused before evaluating


def test_torchrun_shows_one_line_for_bad_input(tmp_path):
    """Two ranks refuse --bf16 + --use-distributed-optimizer + weight decay (today: a traceback
    on every rank, then torchrun's ChildFailedError report): one line, exit 2."""
    data = tmp_path / "wiki"
    for ext in (".bin", ".idx"):
        open(f"{data}{ext}", "w").close()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "flextron_config.json").write_text("{}")
    env = clean_env()
    env["PYTHONWARNINGS"] = "ignore"
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "torchrun.py"), "--standalone",
         "--nproc-per-node", "2", os.path.join(ROOT, "tools", "pretrain_flextron.py"),
         "--data-path", str(data), "--load", str(tmp_path / "ckpt"), "--micro-batch-size", "1",
         "--bf16", "--use-distributed-optimizer", "--weight-decay", "0.1"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr
    assert lines == [
        "error: --weight-decay 0.1 with --bf16 and --use-distributed-optimizer is not supported "
        "(the elastic weight decay needs fp32 master weights that are views of the parameters); "
        "use --weight-decay 0 or drop --use-distributed-optimizer"
    ], out.stderr


KILLED_WRITER = """
import json, os, signal, sys
sys.path[:0] = [{root!r}, {tests!r}]
if __name__ == "__main__":  # megatron's writer may spawn helpers that import __main__
    import psutil
    from helpers import elastic_choices, random_canonical_state, tiny_config
    from megatron_flextron.checkpoint.flextron import save_flextron
    from megatron_flextron.checkpoint.state import Checkpoint
    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(1, 1)
    model = tiny_config("llama", vocab_size=64)
    os.makedirs({out!r})
    state = random_canonical_state(model)
    ckpt = Checkpoint(model=model, state=state, tokenizer_dir=None, elastic=elastic_choices(model))
    save_flextron(ckpt, {out!r})
    print(json.dumps([p.pid for p in psutil.Process().children(recursive=True)]), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_no_helper_process_outlives_a_killed_writer(tmp_path):
    """A tool killed with SIGKILL right after saving a checkpoint leaves no process behind
    (megatron's writer used to start a multiprocessing Manager, ~360 MB, that stayed)."""
    import time

    import psutil

    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER.format(
        root=ROOT, tests=os.path.join(ROOT, "tests"), out=str(tmp_path / "ckpt")))  # fmt: skip
    with open(tmp_path / "pids", "w") as pids:  # a file: a pipe would wait for the helpers
        subprocess.run([sys.executable, str(script)], stdout=pids, timeout=600, env=clean_env())
    children = json.loads((tmp_path / "pids").read_text())
    time.sleep(2)  # time for helpers that watch their parent to exit
    alive = [pid for pid in children if psutil.pid_exists(pid)]
    for pid in alive:  # do not leave them running for the rest of the suite
        psutil.Process(pid).kill()
    assert alive == [], "helper processes outlived the killed writer"
    assert os.path.isfile(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt")


def test_outputs_keep_the_umask_and_staged_files_are_removed(tmp_path, monkeypatch):
    """A converted folder has the mode the user's umask gives (mkdtemp's is 0700); a staged
    tokenizer folder left by a killed process is removed by the next staging."""
    import socket
    import stat

    from megatron_flextron.checkpoint.io import atomic_output_dir, staged_dir

    old = os.umask(0o027)
    try:
        with atomic_output_dir(str(tmp_path / "out")) as tmp:
            open(os.path.join(tmp, "file"), "w").close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o750

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    host = socket.gethostname()
    stale = tmp_path / f"flextron-tokenizer-{_dead_pid()}@{host}-abc123"
    live = tmp_path / f"flextron-tokenizer-{os.getpid()}@{host}-def456"
    for d in (stale, live):
        d.mkdir()
    staged = staged_dir("tokenizer")
    assert os.path.dirname(staged) == str(tmp_path)
    assert os.path.basename(staged).startswith(f"flextron-tokenizer-{os.getpid()}@{host}-")
    assert not stale.exists() and live.exists()
