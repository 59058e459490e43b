"""Megatron's common (non-sharded) checkpoint state, read without running code from it.

A torch_dist checkpoint keeps its non-tensor state (Megatron-LM's ``args``, ``iteration``, ...)
in ``common.pt`` (megatron-core < 0.19) or as one ``common_state`` object inside the shards
(0.19). megatron-core 0.19 reads the latter through torch's ``DefaultLoadPlanner.load_bytes``,
which unpickles it with ``weights_only=False``: a crafted checkpoint would run any function it
names. ``read_common_state`` reads the raw bytes and unpickles them with ``weights_only=True``
and an allow-list (argparse.Namespace, megatron / torch enums, what torch's weights-only loader
takes); every read path of the project calls it before megatron reads the same bytes again, so a
checkpoint it accepts names nothing else.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import io
import os
from typing import Optional

import torch

from megatron_flextron.checkpoint.safe_metadata import read_dcp_metadata, safe_filesystem_reader
from megatron_flextron.checkpoint.state import CheckpointError

LEGACY_FILE = "common.pt"
_ENUM_MODULES = ("megatron.", "torch.")  # allow-listed enum classes may come only from these


def read_common_state(folder: str) -> dict:
    """The common state of the torch_dist checkpoint in ``folder`` (a CheckpointError naming the
    file when it is missing, unreadable or names a global outside the allow-list)."""
    legacy = os.path.join(folder, LEGACY_FILE)
    if os.path.isfile(legacy):  # read first, as megatron does
        return _allow_listed_load(legacy, legacy)
    stored = _common_state_bytes(folder)
    if stored is None:
        raise CheckpointError(f"{folder} has neither {LEGACY_FILE} nor a common_state object")
    return _allow_listed_load(stored, f"the shards in {folder} (their common_state)")


def allowed_global(name: str):
    """The class a pickled global names, if it is allow-listed: argparse.Namespace or an enum
    defined in megatron or torch (Megatron stores e.g. AttnBackend in its args)."""
    if name == "argparse.Namespace":
        return argparse.Namespace
    module, _, qualname = name.rpartition(".")
    if not module.startswith(_ENUM_MODULES):
        return None
    try:
        obj = getattr(importlib.import_module(module), qualname)
    except Exception:
        return None
    return obj if isinstance(obj, type) and issubclass(obj, enum.Enum) else None


def _common_state_bytes(folder: str) -> Optional[io.BytesIO]:
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint import load as dcp_load

    class _RawBytes(DefaultLoadPlanner):
        """Keeps a stored object's bytes instead of unpickling them (weights_only=False)."""

        raw: dict = {}

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            self.raw[read_item.dest_index.fqn] = io.BytesIO(value.read())

    key = ShardedObject("common_state", None, (1,), (0,)).unique_key
    if key not in read_dcp_metadata(folder).state_dict_metadata:
        return None
    planner = _RawBytes(flatten_state_dict=False)
    try:
        dcp_load(
            {key: io.BytesIO()},
            storage_reader=safe_filesystem_reader(folder),
            planner=planner,
            no_dist=True,
        )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read the common state in {folder}: {first}") from None
    if key not in planner.raw:
        raise CheckpointError(f"{folder}: the common_state object could not be read")
    return planner.raw[key]


def _allow_listed_load(source, label: str) -> dict:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception as e:
        raise CheckpointError(f"cannot read {label} (truncated or corrupt?): {e}") from None
    allowed = {name: allowed_global(name) for name in names}
    refused = sorted(name for name, obj in allowed.items() if obj is None)
    if refused:
        raise CheckpointError(
            f"{label} stores objects outside the allow-list {refused}; they are not unpickled "
            "(weights_only): re-save the checkpoint's args without them"
        )
    if isinstance(source, io.BytesIO):
        source.seek(0)
    try:
        with torch.serialization.safe_globals(list(allowed.values())):
            common = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {label} with weights_only=True: {e}") from None
    if isinstance(common, list) and len(common) == 1:  # 0.19 stores [state] (one shard)
        common = common[0]
    if not isinstance(common, dict):
        raise CheckpointError(f"{label} holds a {type(common).__name__}, not a state dict")
    return common
