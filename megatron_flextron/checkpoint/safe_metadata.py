"""Read a torch distributed checkpoint's ``.metadata`` without running code from it.

torch's ``FileSystemReader.read_metadata`` (and megatron's loaders over it) unpickle ``.metadata``
with the plain ``pickle`` module, so a crafted file runs any function it names (``os.system``) on
load. ``read_dcp_metadata`` unpickles it with an allow-list of the classes torch's ``Metadata``
is made of (measured on torch 2.13 checkpoints: model-only and with optimizer state), and every
dist-checkpoint read path of the project calls it first: a file it accepts names only those
classes, so torch's own reader, reading the same bytes afterwards, runs nothing else either.
``common.pt`` is read by megatron with ``torch.load``, which is ``weights_only`` by default.
"""

from __future__ import annotations

import os
import pickle

import torch

from megatron_flextron.checkpoint.state import CheckpointError

METADATA_FILE = ".metadata"

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan",
        "WriteItem",
        "WriteItemType",
        "TensorWriteData",
    },
    "torch.serialization": {"_get_layout"},  # a layout by name from a fixed table
    "torch": {"Size"},  # and the dtypes (below)
    "collections": {"OrderedDict"},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(
            f"refusing {module}.{name}: not a class torch's checkpoint metadata is made of "
            "(the file may run code when unpickled)"
        )


def read_dcp_metadata(path: str):
    """The ``Metadata`` of the torch distributed checkpoint in folder ``path`` (or of the
    ``.metadata`` file ``path``); a CheckpointError for a missing, truncated or unsafe file."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    file = path if os.path.isfile(path) else os.path.join(path, METADATA_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"missing file {file}: not a complete distributed checkpoint")
    try:
        with open(file, "rb") as f:
            metadata = _RestrictedUnpickler(f).load()
    except CheckpointError as e:
        raise CheckpointError(f"{file}: {e}") from None
    except Exception as e:  # truncated or not a pickle
        raise CheckpointError(f"cannot read {file} (truncated or corrupt?): {e!r}") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{file} holds a {type(metadata).__name__}, not checkpoint metadata")
    if getattr(metadata, "storage_meta", None) is None:  # as torch's reader does
        metadata.storage_meta = StorageMeta()
    return metadata


def safe_filesystem_reader(path: str):
    """torch's ``FileSystemReader`` over ``path``, its metadata read by ``read_dcp_metadata``."""
    from torch.distributed.checkpoint import FileSystemReader

    class _Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:  # per-rank metadata files: not written here
                raise CheckpointError(f"{path}: per-rank metadata is not supported")
            metadata = read_dcp_metadata(path)
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _Reader(path)
