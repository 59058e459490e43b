"""The megatron-core versions the shims were verified on, checked once at import.

The CPU shims and the elastic modules use private megatron-core APIs (the RNG tracker, the causal
mask, CUDA literals, module internals) that change between releases without notice: outside the
verified range the project stops with a clear message instead of failing somewhere deep inside.
``FLEXTRON_ALLOW_UNVERIFIED_MEGATRON=1`` turns the error into a warning (at your own risk).
"""

from __future__ import annotations

import os
import re
import warnings
from importlib import metadata
from typing import Optional, Tuple

# the one release CI runs the suite on (Python 3.11 and the GPU machines' 3.12)
VERIFIED = ("0.19.2", "0.19.2")
OVERRIDE = "FLEXTRON_ALLOW_UNVERIFIED_MEGATRON"


def _parse(version: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def installed_version() -> Optional[str]:
    for name in ("megatron-core", "megatron_core"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_megatron_core(version: Optional[str] = None) -> None:
    """Raise (or, with the override, warn) when megatron-core is outside the verified range."""
    version = version or installed_version()
    if version is None:
        raise RuntimeError("megatron-core is not installed: pip install -r requirements.txt")
    low, high = VERIFIED
    if _parse(low) <= _parse(version) <= _parse(high):
        return
    message = (
        f"megatron-core {version} is outside the range megatron_flextron was verified on "
        f"({low} .. {high}; its CPU shims and elastic modules use private megatron APIs): "
        f"install megatron-core=={high} (requirements-megatron.txt), or set {OVERRIDE}=1 "
        "to run anyway"
    )
    if os.environ.get(OVERRIDE) == "1":
        warnings.warn(message, stacklevel=2)
        return
    raise RuntimeError(message)
