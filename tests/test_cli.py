"""The one failure path (megatron_flextron/cli.py): bad input -> one line, exit status 2."""

import errno
import os

import pytest

from megatron_flextron.cli import ArgumentParser, check_output, describe, run_main


def test_os_errors_are_said_in_words_with_their_path():
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/ckpt/iter_0000001.tmp")
    assert describe(full) == "no space left on device: /ckpt/iter_0000001.tmp"
    ro = OSError(errno.EROFS, "Read-only file system", "/mnt/out/.out.lock")
    assert describe(ro) == "read-only file system: /mnt/out/.out.lock"
    assert describe(IsADirectoryError(errno.EISDIR, "x", "a.tmp", None, "a")) == (
        "is a directory: a.tmp -> a"
    )
    assert describe(ValueError("two\n   lines")) == "two lines"


def test_run_main_prints_one_line_on_rank_0_only(capsys, monkeypatch):
    def bad():
        raise ValueError("--foo 3 must be even")

    monkeypatch.setenv("RANK", "0")
    assert run_main(bad) == 2
    assert capsys.readouterr().err == "error: --foo 3 must be even\n"
    monkeypatch.setenv("RANK", "1")
    assert run_main(bad) == 2
    assert capsys.readouterr().err == ""  # every rank refuses alike: rank 0 says it
    full = OSError(errno.ENOSPC, "No space left on device", "/local/disk")

    def disk():
        raise full

    assert run_main(disk) == 2  # a full disk can be one node's: its rank says it
    assert capsys.readouterr().err == "error: no space left on device: /local/disk\n"
    assert run_main(lambda: None) == 0 and run_main(lambda: 3) == 3
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_main(lambda: {}["x"])


def test_parser_errors_are_one_line(capsys):
    p = ArgumentParser()
    p.add_argument("--n", type=int, required=True)
    with pytest.raises(SystemExit) as exit_info:
        p.parse_args(["--n", "x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: argument --n: invalid int value: 'x'\n"


def test_outputs_that_cannot_be_written_are_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="--save .*file is a file; it must be a folder"):
        check_output(str(tmp_path / "file"), "--save", folder=True)
    with pytest.raises(ValueError, match="--output .* is a directory; it must be a file"):
        check_output(str(tmp_path), "--output", folder=False)
    with pytest.raises(ValueError, match="file is a file, not a folder"):
        check_output(str(tmp_path / "file" / "out"), "--save-dir", folder=True)
    check_output(str(tmp_path / "new" / "deeper"), "--save-dir", folder=True)  # can be made


def test_every_tool_fails_through_the_one_function():
    """No tool prints its own error line or builds a plain argparse parser: each runs its body
    through run_main (or parallel.run_tool, which uses it) and parses with cli.ArgumentParser
    (the trainer's flags: training/arguments.py)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tools = os.path.join(root, "tools")
    for name in sorted(f for f in os.listdir(tools) if f.endswith(".py") and f != "torchrun.py"):
        source = open(os.path.join(tools, name)).read()
        assert "run_main(" in source, name
        assert 'print(f"error' not in source and "return 2" not in source, name
        assert "argparse.ArgumentParser(" not in source, name
    arguments = open(os.path.join(root, "megatron_flextron", "training", "arguments.py")).read()
    assert "parser = ArgumentParser(" in arguments
