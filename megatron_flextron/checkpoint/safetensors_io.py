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
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: the header is a {type(header).__name__}, not an object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: Dict[str, dict] = header
        self._check_layout(os.path.getsize(path) - self.data_start)

    def _check_layout(self, data_bytes: int) -> None:
        """What the safetensors library checks before reading: every entry a known dtype, a
        shape of sizes >= 0 and offsets [begin, end] whose length is the tensor's size; sorted
        by offset, the tensors tile the data exactly (no overlap, no gap, nothing after)."""
        spans = []
        for name, entry in self.entries.items():
            if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
                dtype = entry.get("dtype") if isinstance(entry, dict) else entry
                raise CheckpointError(f"{self.path}: {name} has unsupported dtype {dtype}")
            shape, offsets = entry.get("shape"), entry.get("data_offsets")
            if not _ints(shape) or not _ints(offsets) or len(offsets) != 2:
                raise CheckpointError(
                    f"{self.path}: {name} has shape {shape!r} and data_offsets {offsets!r} "
                    "(expected sizes >= 0 and [begin, end])"
                )
            begin, end = offsets
            nbytes = TensorSpec(tuple(shape), DTYPES[entry["dtype"]]).nbytes
            if end - begin != nbytes:
                raise CheckpointError(
                    f"{self.path}: {name} has data_offsets [{begin}, {end}] for a tensor of "
                    f"{nbytes} bytes"
                )
            spans.append((begin, end, name))
        position, previous = 0, None
        for begin, end, name in sorted(spans):
            if begin != position:
                what = "overlap" if begin < position else "leave a gap between"
                first = f"{previous} and {name}" if previous else f"the data start and {name}"
                raise CheckpointError(
                    f"{self.path}: the data_offsets of {first} {what} (bytes {position} and "
                    f"{begin})"
                )
            position, previous = end, name
        if position > data_bytes:
            raise CheckpointError(
                f"cannot read {self.path}: truncated ({self.data_start + data_bytes} bytes, its "
                f"header needs {self.data_start + position})"
            )
        if position < data_bytes:
            raise CheckpointError(
                f"{self.path}: {data_bytes - position} bytes after the last tensor that no "
                "header entry covers"
            )

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


def _ints(values) -> bool:
    """A list of integers >= 0 (JSON's true/false are not sizes)."""
    return isinstance(values, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    )


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
