"""The one failure path of every tool: bad input -> one line on stderr and exit status 2.

A tool's flags go through ``ArgumentParser`` (argparse whose errors take this path too) and its
body through ``run_main``; ``fail`` is the single place that prints and exits. Bad input is a
``ValueError`` (``CheckpointError`` is one) or an ``OSError``; an ``OSError`` is told in words
a user acts on: "no space left on device", a read-only file system, a directory where a file is
expected, each naming the path. Anything else is a bug and keeps its traceback.

Under torchrun every rank fails the same way, so only rank 0 prints a ``ValueError``; an
``OSError`` can be local to a rank (a full disk on one node) and is printed by the rank that met
it. ``tools/torchrun.py`` is torchrun that then exits 2 quietly instead of printing its own
ChildFailedError report (the workers have already said why).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Callable, NoReturn, Optional

BAD_INPUT = (ValueError, OSError)

_OS_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "not a directory",
    errno.ENOENT: "does not exist",
    errno.EEXIST: "already exists",
}


def describe(error: BaseException) -> str:
    """One line saying what went wrong and, for a file system error, where."""
    if isinstance(error, OSError) and error.errno in _OS_ERRORS:
        what = _OS_ERRORS[error.errno]
        where = " -> ".join(str(f) for f in (error.filename, error.filename2) if f)
        return f"{what}: {where}" if where else what
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def fail(message: str, rank_local: bool = False) -> NoReturn:
    """Print ``error: message`` (on rank 0 only unless ``rank_local``) and exit with status 2."""
    if rank_local or int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def run_main(body: Callable[[], Optional[int]]) -> int:
    """Run a tool's body: its status (0 for None), or 2 with one line for bad input."""
    try:
        return body() or 0
    except BAD_INPUT as e:
        try:
            fail(describe(e), rank_local=isinstance(e, OSError))
        except SystemExit as done:
            return int(done.code)


def check_output(path: str, flag: str, folder: bool) -> None:
    """Refuse, before any work, an output that cannot be written: a file where a folder is
    wanted (or the reverse), or a location on a read-only or non-writable file system."""
    path = os.path.abspath(path)
    if os.path.exists(path) and os.path.isdir(path) != folder:
        want = "a folder" if folder else "a file"
        have = "a directory" if os.path.isdir(path) else "a file"
        raise ValueError(f"{flag} {path} is {have}; it must be {want}")
    existing = path if os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        why = "on a read-only file system" if read_only else "not writable"
        raise ValueError(f"{flag} {path} cannot be written: {existing} is {why}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose refusals are one line (no usage block) through ``fail``."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def torchrun(argv=None) -> int:
    """``torch.distributed.run`` with bad input reported once: when the first worker to fail
    exited with status 2 (it printed its one line; the others were then stopped), exit 2
    without torchrun's failure report."""
    import logging

    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    class _HideBadInput(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            text = record.getMessage()
            return "(exitcode: 2)" not in text and "closing signal" not in text

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_HideBadInput())
    try:
        run.run(run.parse_args(argv))
    except ChildFailedError as e:
        if e.failures and e.get_first_failure()[1].exitcode == 2:
            return 2
        raise
    return 0
