"""File IO shared by every format: atomic output folders, safetensors/torch files, tokenizers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Callable, Dict, Iterator, Optional

import torch

from megatron_flextron.checkpoint.state import CheckpointError

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


@contextlib.contextmanager
def atomic_output_dir(path: str, replace: bool = False) -> Iterator[str]:
    """Yield a temporary sibling directory; rename it to ``path`` only if the block succeeds.

    A failed write leaves nothing at ``path``. An existing non-empty ``path`` is refused, or,
    with ``replace``, replaced once the new one is complete: the old one is moved aside, the new
    one renamed in, and only then the old one deleted (put back if the rename fails).
    """
    path = os.path.abspath(path)
    if not replace and os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise CheckpointError(f"output {path} already exists and is not empty")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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
    if not src or os.path.abspath(src) == os.path.abspath(dst):
        return
    os.makedirs(dst, exist_ok=True)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def tensor_getter(directory: str) -> Callable[[str], torch.Tensor]:
    """A lazy name -> tensor reader over an HF weights folder (safetensors, sharded or not,
    or pytorch_model.bin loaded with weights_only=True). ``get.names`` lists what is stored."""
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index):
        files = {k: os.path.join(directory, v) for k, v in read_json(index)["weight_map"].items()}
    elif os.path.isfile(single):
        try:
            with safe_open(single, "pt") as f:
                files = {k: single for k in f.keys()}
        except Exception as e:  # a truncated or corrupt file
            raise CheckpointError(f"cannot read {single}: {e}") from None
    elif os.path.isfile(os.path.join(directory, "pytorch_model.bin")):
        state = torch.load(os.path.join(directory, "pytorch_model.bin"), weights_only=True)

        def lookup(name: str) -> torch.Tensor:
            return _lookup(state, name, directory)

        lookup.names = frozenset(state)
        return lookup
    else:
        raise CheckpointError(f"{directory} holds no model.safetensors or pytorch_model.bin")
    handles: Dict[str, object] = {}

    def get(name: str) -> torch.Tensor:
        if name not in files:
            raise CheckpointError(f"{directory}: missing tensor {name!r}")
        path = files[name]
        try:
            if path not in handles:
                handles[path] = safe_open(path, "pt")
            return handles[path].get_tensor(name)
        except Exception as e:  # a truncated or corrupt file
            raise CheckpointError(f"cannot read {name!r} from {path}: {e}") from None

    get.names = frozenset(files)
    return get


def _lookup(state: dict, name: str, where: str) -> torch.Tensor:
    if name not in state:
        raise CheckpointError(f"{where}: missing tensor {name!r}")
    return state[name]
