"""Read a torch_dist (torch.distributed.checkpoint) folder one tensor, or one layer, at a time.

Megatron stacks per-layer tensors under one key with a leading layer axis (``decoder.layers.X``,
shape [L, ...]) and stores each layer's shard as its own chunk; reading the key whole would hold
every layer of that kind at once. ``read_layer`` plans reads for the chunks of layer i only
(torch's own chunk-overlap helper), so a converter holds one layer's tensor.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from megatron_flextron.checkpoint.safe_metadata import read_dcp_metadata, safe_filesystem_reader
from megatron_flextron.checkpoint.state import CheckpointError, LazyState, TensorSpec

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _region_planner(key: str, offsets: Tuple[int, ...], sizes: Tuple[int, ...]):
    """A load planner that reads only ``[offsets, offsets + sizes)`` of ``key``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class RegionPlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            md = self.metadata.state_dict_metadata[key]
            return LoadPlan(create_read_items_for_chunk_list(key, md, [chunk]))

        def lookup_tensor(self, index):  # the region's buffer (its read items carry offsets)
            return self.state_dict[index.fqn]

    return RegionPlanner()


def load_shards(shards: str, state: dict, reader=None, **kwargs) -> dict:
    """torch's dist-checkpoint load with the safe metadata reader (or ``reader``, one made by
    ``safe_filesystem_reader``); every read failure of a missing, empty or truncated shard (torch
    raises CheckpointException, a BaseException) is a CheckpointError."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        load(state, storage_reader=reader or safe_filesystem_reader(shards), **kwargs)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"cannot read the shards in {shards}: {first_line(e)}") from None
    return state


def first_line(error: BaseException) -> str:
    """torch's CheckpointException lists a traceback per rank: its last line is the cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = lines[-1] if lines else type(error).__name__
    return line.split(". ")[0] if len(line) > 160 else line  # torch's miniz advice: dropped


class StoredTensors:
    """The model tensors of a torch_dist folder (keys matching ``skip`` left out), read lazily.
    The metadata is unpickled once, through the allow-list (safe_metadata)."""

    def __init__(self, folder: str, skip: Optional[re.Pattern] = None):
        from torch.distributed.checkpoint import TensorStorageMetadata

        self.folder = folder
        self.reader = safe_filesystem_reader(folder)
        self.metadata = read_dcp_metadata(folder)
        self.reader.read_metadata = lambda *a, **k: self.metadata  # read once, not per tensor
        self.tensors: Dict[str, object] = {
            key: meta
            for key, meta in self.metadata.state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata) and not (skip and skip.search(key))
        }

    def spec(self, key: str) -> TensorSpec:
        meta = self.tensors[key]
        if meta.properties.dtype not in FLOATS:
            raise CheckpointError(f"{key} is stored as {meta.properties.dtype}; expected {FLOATS}")
        return TensorSpec(tuple(meta.size), meta.properties.dtype)

    def read(self, key: str) -> torch.Tensor:
        """The whole global tensor of ``key``."""
        spec = self.spec(key)
        return self._load(key, torch.empty(spec.shape, dtype=spec.dtype))

    def read_layer(self, key: str, layer: Union[int, Tuple[int, ...]]) -> torch.Tensor:
        """Index ``layer`` of the leading (stacked layers) axis of ``key``; a tuple indexes as
        many leading axes (layer, expert: megatron stacks an MoE's experts per layer)."""
        shape, dtype = self.spec(key)
        index = (layer,) if isinstance(layer, int) else tuple(layer)
        if len(shape) < len(index) or not all(0 <= i < n for i, n in zip(index, shape)):
            raise CheckpointError(f"{key} of shape {shape} has no layer {layer}")
        rest = shape[len(index):]
        out = torch.empty((1,) * len(index) + rest, dtype=dtype)
        offsets = index + (0,) * len(rest)
        self._load(key, out, planner=_region_planner(key, offsets, (1,) * len(index) + rest))
        return out.reshape(rest)

    def lazy_state(
        self, where: Dict[str, Tuple[str, Optional[int]]], transform: Optional[Callable] = None
    ) -> LazyState:
        """A lazy state over ``where`` (name -> (stored key, layer of a stacked key, a tuple of
        leading indices, or None)),
        each read passed through ``transform(name, tensor)`` (which keeps shape and dtype)."""
        specs = {}
        for name, (key, layer) in where.items():
            shape, dtype = self.spec(key)
            depth = 0 if layer is None else 1 if isinstance(layer, int) else len(layer)
            specs[name] = TensorSpec(shape[depth:], dtype)

        def read(name: str) -> torch.Tensor:
            key, layer = where[name]
            value = self.read(key) if layer is None else self.read_layer(key, layer)
            return value if transform is None else transform(name, value)

        return LazyState(specs, read)

    def _load(self, key: str, out: torch.Tensor, **kwargs) -> torch.Tensor:
        load_shards(self.folder, {key: out}, reader=self.reader, no_dist=True, **kwargs)
        return out
