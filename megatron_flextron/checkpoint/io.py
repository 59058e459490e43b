"""File IO shared by every format: atomic output folders, safetensors/torch files, tokenizers."""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
from typing import Callable, Dict, Iterator, Optional

import torch

from megatron_flextron.checkpoint.state import CheckpointError, TensorSpec

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


def _owner() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def _is_dead(owner: str) -> bool:
    """``pid@host`` names a process of this host that no longer runs (another host's process
    cannot be checked, so it counts as alive)."""
    pid, _, host = owner.partition("@")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


@contextlib.contextmanager
def _output_lock(path: str) -> Iterator[None]:
    """``.NAME.lock`` next to ``path``, created exclusively and holding ``pid@host``: a second
    writer of the same output is refused instead of racing; a dead owner's lock is taken over."""
    lock = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = open(lock).read().strip()
            except FileNotFoundError:  # released meanwhile
                continue
            if not _is_dead(owner):
                raise CheckpointError(
                    f"another process ({owner}) is writing {path} (lock {lock}; delete it if "
                    "that process is gone)"
                ) from None
            print(f"removing the stale lock {lock} of {owner} (no longer running)", file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(_owner())
        break
    else:
        raise CheckpointError(f"cannot take the lock {lock}")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def staged_dir(kind: str) -> str:
    """A new folder in the temp directory for files staged during this process (e.g. a
    tokenizer converted from a GGUF), removed at exit; its name records the process
    (``flextron-KIND-PID@HOST-*``), so one left by a killed process is removed by the next."""
    _remove_stale_temporaries(os.path.join(tempfile.gettempdir(), f"flextron-{kind}"), "-")
    out = tempfile.mkdtemp(prefix=f"flextron-{kind}-{_owner()}-")
    atexit.register(shutil.rmtree, out, True)
    return out


def _remove_stale_temporaries(path: str, mark: str = ".tmp-") -> None:
    """Delete ``.NAME.tmp-PID@HOST-*`` folders of ``path`` (``NAME-PID@HOST-*`` with mark
    "-") whose writer no longer runs (left by a killed run), saying so; a live writer's,
    another host's and an unnamed owner's stay."""
    parent, base = os.path.dirname(path), os.path.basename(path)
    prefix = f".{base}{mark}" if mark == ".tmp-" else f"{base}{mark}"
    for name in sorted(os.listdir(parent)):
        if not name.startswith(prefix) or name.endswith(".old"):
            continue
        owner = name[len(prefix):].rpartition("-")[0]
        if _is_dead(owner):
            print(
                f"removing {os.path.join(parent, name)}: a temporary of {path} left by "
                f"process {owner}, which no longer runs",
                file=sys.stderr,
            )
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(path: str, replace: bool = False) -> Iterator[str]:
    """Yield a temporary sibling directory; rename it to ``path`` only if the block succeeds.

    A failed write leaves nothing at ``path`` (a full disk is said as ``OSError(ENOSPC)``
    naming ``path``). An existing non-empty ``path`` is refused, or,
    with ``replace``, replaced once the new one is complete: the old one is moved aside, the new
    one renamed in, and only then the old one deleted (put back if the rename fails). One writer
    per output at a time (a lock file); the temporary's name records its writer (pid@host), so
    the next run removes those of writers that were killed.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    with _output_lock(path):
        if not replace and os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise CheckpointError(f"output {path} already exists and is not empty")
        _remove_stale_temporaries(path)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-{_owner()}-", dir=parent)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would become the output's mode
        try:
            yield tmp
            old = None
            if os.path.isdir(path):
                if not replace:
                    os.rmdir(path)  # empty (checked above)
                else:
                    old = f"{tmp}.old"
                    os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                if old is not None:
                    os.replace(old, path)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException as e:
            full = disk_full(e, tmp)  # before the temporary's space is freed
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from None
            raise


def dist_save(state: dict, directory: str) -> None:
    """``megatron.core.dist_checkpointing.save`` (synchronous), with a full disk said as such.

    No helper process is started (compat/checkpoint_writer.py). A write that fails because the
    disk is full (torch then reports e.g. "unexpected pos 704 vs 598") raises
    ``OSError(ENOSPC)`` naming ``directory``."""
    from megatron.core import dist_checkpointing

    from megatron_flextron.compat.checkpoint_writer import use_in_process_results_queue

    use_in_process_results_queue()
    try:
        dist_checkpointing.save(state, directory)
    except BaseException as e:  # torch's CheckpointException is a BaseException
        if disk_full(e, directory):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), directory) from None
        raise


def disk_full(error: BaseException, path: str) -> bool:
    """``error`` (or one it wraps, torch's per-rank checkpoint failures included) is a full
    disk, or the file system of ``path`` has less than 1 MiB left (torch's zip writer then says
    only "unexpected pos ..."); a ``ValueError`` already says what is wrong."""
    if isinstance(error, (ValueError, KeyboardInterrupt, SystemExit)):
        return False
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for v in failures.values():  # an exception, or (exception, traceback)
                todo += [x for x in (v if isinstance(v, tuple) else (v,))]
    try:
        free = os.statvfs(path)
    except OSError:
        return False
    return free.f_bavail * free.f_frsize < 2**20


def write_text_atomic(path: str, text: str) -> None:
    """Write ``path`` whole or not at all (a failed write removes its temporary)."""
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"missing file {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def write_json(path: str, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def copy_tokenizer(src: Optional[str], dst: str) -> None:
    """Copy the tokenizer files, each checked readable first: a truncated file would otherwise
    be copied into every output and fail only when someone tokenizes with it."""
    if not src or os.path.abspath(src) == os.path.abspath(dst):
        return
    files = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    for name in files:
        check_tokenizer_file(os.path.join(src, name))
    os.makedirs(dst, exist_ok=True)
    for name in files:
        shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def check_tokenizer_file(path: str) -> None:
    """JSON files parse (tokenizer.json also loads), a sentencepiece model loads, text decodes."""
    name = os.path.basename(path)
    try:
        if name == "tokenizer.json":
            from tokenizers import Tokenizer

            Tokenizer.from_file(path)
        elif name.endswith(".json"):
            with open(path) as f:
                json.load(f)
        elif name == "tokenizer.model":
            import sentencepiece

            sentencepiece.SentencePieceProcessor(model_file=path)
        else:
            with open(path, encoding="utf-8") as f:
                f.read()
    except ImportError:
        return
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"tokenizer file {path} is unreadable (truncated?): {first}"
        ) from None


class TensorSource:
    """Named tensors of a source checkpoint, read one at a time: ``names``, ``spec(name)``
    (without reading) and ``source(name)`` (the tensor)."""

    def __init__(
        self, where: str, specs: Dict[str, TensorSpec], read: Callable[[str], torch.Tensor]
    ):
        self.where, self.specs, self._read = where, specs, read
        self.names = frozenset(specs)

    def spec(self, name: str) -> TensorSpec:
        if name not in self.specs:
            raise CheckpointError(f"{self.where}: missing tensor {name!r}")
        return self.specs[name]

    def __call__(self, name: str) -> torch.Tensor:
        self.spec(name)
        return self._read(name)


def load_weights_only(path: str) -> dict:
    """A torch-saved dict of tensors, read with ``weights_only`` (no code runs): a file that
    would need another class is refused naming it, a damaged one as unreadable, each in one
    line rather than torch's multi-paragraph UnpicklingError."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            blocked = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            blocked = []
        raise CheckpointError(
            f"{path} stores {', '.join(blocked) or 'objects'} outside what the safe loader "
            "(weights_only) unpickles: refused, nothing was run"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read {path} (truncated or corrupt?): {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no dict of named tensors")
    return state


def tensor_getter(directory: str) -> TensorSource:
    """A lazy reader over an HF weights folder: safetensors, sharded or not (read with file IO,
    see safetensors_io), or pytorch_model.bin (loaded whole, weights_only=True)."""
    from megatron_flextron.checkpoint.safetensors_io import SafetensorsFile

    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index):
        names = read_json(index).get("weight_map")
        if not isinstance(names, dict):
            raise CheckpointError(f"{index} has no weight_map")
        paths = sorted(set(names.values()))
    elif os.path.isfile(single):
        names, paths = None, ["model.safetensors"]
    elif os.path.isfile(os.path.join(directory, "pytorch_model.bin")):
        state = load_weights_only(os.path.join(directory, "pytorch_model.bin"))
        specs = {k: TensorSpec.of(v) for k, v in state.items()}
        return TensorSource(directory, specs, state.__getitem__)
    else:
        raise CheckpointError(f"{directory} holds no model.safetensors or pytorch_model.bin")
    files = {p: SafetensorsFile(os.path.join(directory, p)) for p in paths}
    owner = {name: f for f in files.values() for name in f.names}
    if names is not None:
        for name, path in names.items():
            if owner.get(name) is not files[path]:
                raise CheckpointError(f"{index}: {name} is not in {path}")
    specs = {name: f.spec(name) for name, f in owner.items()}
    return TensorSource(directory, specs, lambda name: owner[name].read(name))
