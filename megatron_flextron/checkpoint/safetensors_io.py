"""safetensors read and written one tensor at a time, with plain file IO.

The safetensors library maps a file into memory: every page a conversion touches then counts in
the process's resident memory until the handle closes, so reading a whole checkpoint through it
costs its size again. The format is simple (8-byte header length, JSON header of dtype, shape and
byte offsets, raw little-endian data), so this module reads a tensor with one ``readinto`` and
writes a file from a stream of tensors whose specs are known up front: a converter holds one
tensor, never the model. Files written here load with ``safetensors.safe_open`` / transformers.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from megatron_flextron.checkpoint.state import CheckpointError, TensorSpec

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER = 100 * 2**20


class SafetensorsFile:
    """The header of one .safetensors file, and its tensors read on demand."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise ValueError("shorter than its 8-byte header length")
                (length,) = struct.unpack("<Q", raw)
                if length > MAX_HEADER:
                    raise ValueError(f"header length {length} is not plausible")
                header = json.loads(f.read(length))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
        self.data_start = 8 + length
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: Dict[str, dict] = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        size = os.path.getsize(path)
        if self.data_start + end > size:
            raise CheckpointError(
                f"cannot read {path}: truncated ({size} bytes, its header needs "
                f"{self.data_start + end})"
            )
        for name, entry in header.items():
            if entry.get("dtype") not in DTYPES:
                raise CheckpointError(f"{path}: {name} has unsupported dtype {entry.get('dtype')}")

    @property
    def names(self) -> List[str]:
        return list(self.entries)

    def spec(self, name: str) -> TensorSpec:
        entry = self.entries[name]
        return TensorSpec(tuple(entry["shape"]), DTYPES[entry["dtype"]])

    def read(self, name: str) -> torch.Tensor:
        spec = self.spec(name)
        begin, end = self.entries[name]["data_offsets"]
        out = torch.empty(spec.shape, dtype=spec.dtype)
        if end > begin:
            view = out.view(-1).view(torch.uint8).numpy()
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin)
                if f.readinto(view) != end - begin:
                    raise CheckpointError(f"cannot read {name!r} from {self.path}: truncated")
        return out


def _header(specs: List[Tuple[str, TensorSpec]], metadata: Optional[dict]) -> bytes:
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, spec in specs:
        nbytes = spec.nbytes
        header[name] = {
            "dtype": NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # data starts 8-byte aligned


def write_safetensors(
    path: str,
    specs: List[Tuple[str, TensorSpec]],
    tensors: Iterable[Tuple[str, torch.Tensor]],
    metadata: Optional[dict] = None,
) -> None:
    """Write ``tensors`` (name, tensor), which must come in the order and with the specs of
    ``specs``; each is written and dropped before the next is made."""
    header = _header(specs, metadata)
    expected = iter(specs)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for name, tensor in tensors:
            want_name, want = next(expected, (None, None))
            if name != want_name or TensorSpec.of(tensor) != want:
                raise CheckpointError(
                    f"writing {path}: got {name} {TensorSpec.of(tensor)}, "
                    f"expected {want_name} {want}"
                )
            if tensor.numel():
                f.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        left = next(expected, None)
        if left is not None:
            raise CheckpointError(f"writing {path}: {left[0]} was never produced")


def shard_specs(
    specs: List[Tuple[str, TensorSpec]], max_shard_bytes: int
) -> List[List[Tuple[str, TensorSpec]]]:
    """Consecutive groups of at most ``max_shard_bytes`` (a bigger tensor gets its own file)."""
    shards: List[List[Tuple[str, TensorSpec]]] = [[]]
    size = 0
    for name, spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, spec))
        size += spec.nbytes
    return shards
