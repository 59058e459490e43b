"""Fields read from a checkpoint's config (JSON, Megatron's args) checked before they are used.

A config that lies (a list for an object, "64" for 64, a size missing, a key nobody reads) would
otherwise surface as a TypeError or KeyError deep inside model building, or not at all; here it
is refused as a ``CheckpointError`` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Dict, Iterable, Optional

from megatron_flextron.checkpoint.state import CheckpointError

_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    list: "a list",
    dict: "an object",
}


def _kind(value) -> str:
    return f"{value!r} (a {type(value).__name__})"


def check_object(where: str, data, what: str = "a JSON object") -> dict:
    """``data`` itself must be a mapping (a JSON file holding a list or a number is refused)."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} holds a {type(data).__name__}, expected {what}")
    return data


def check_value(where: str, name: str, value, kind) -> None:
    """``value`` has the type ``kind`` (int, float, bool or str; an int counts as a float,
    a bool never as a number)."""
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise CheckpointError(f"{where}: {name} is {_kind(value)}, expected {_NAMES[kind]}")


def check_fields(
    where: str,
    data: dict,
    required: Dict[str, type],
    optional: Optional[Dict[str, type]] = None,
    known: Optional[Iterable[str]] = None,
) -> None:
    """Every required field present with its type, optional ones typed when set (None allowed);
    with ``known``, any other key is refused (a key the reader would silently ignore)."""
    for name, kind in required.items():
        if name not in data:
            raise CheckpointError(f"{where} has no {name}")
        check_value(where, name, data[name], kind)
    for name, kind in (optional or {}).items():
        if data.get(name) is not None:
            check_value(where, name, data[name], kind)
    if known is not None:
        unknown = sorted(set(data) - set(known) - set(required) - set(optional or {}))
        if unknown:
            raise CheckpointError(f"{where}: unknown keys {unknown}")


def dataclass_fields(cls) -> tuple:
    """(required, optional) {field: type} of a dataclass whose fields are int, float, bool or
    str (Optional or a Literal of strings), for ``check_fields``."""
    hints = typing.get_type_hints(cls)
    required, optional = {}, {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is typing.Union and len(args) == 1:
            hint = args[0]
        if typing.get_origin(hint) is typing.Literal:
            hint = str
        has_default = f.default is not dataclasses.MISSING
        (optional if has_default else required)[f.name] = hint
    return required, optional


def head_dim(where: str, hidden: int, heads: int, explicit: Optional[int]) -> int:
    """The per-head size: ``explicit`` when the config gives it, else hidden / heads, which
    must then divide (a remainder would silently drop hidden units)."""
    if explicit:
        return explicit
    if heads <= 0 or hidden % heads:
        raise CheckpointError(
            f"{where}: {heads} attention heads do not divide the hidden size {hidden} "
            "(and no head size is given)"
        )
    return hidden // heads
