"""Compact JSON encoding of the ebRIM model dataclasses, for the registry's `content` column.

`encode(obj)` and `decode(data)` are exact inverses for every object of
`gateway.ebrim.model` (ExtrinsicObject, RegistryPackage, Association and everything nested in
them): `decode(encode(x)) == x`. Each dataclass is written as a JSON object with its class
name under "@" and only the fields that differ from their defaults, so a stored DocumentEntry
stays small; tuples come back as tuples.
"""

from __future__ import annotations

import functools
import json
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

from gateway.ebrim import model

_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        model.LocalizedString,
        model.Slot,
        model.Classification,
        model.ExternalIdentifier,
        model.VersionInfo,
        model.ExtrinsicObject,
        model.RegistryPackage,
        model.Association,
        model.ObjectRef,
    )
}


@functools.cache
def _fields_and_defaults(cls: type) -> tuple[tuple[str, Any], ...]:
    """(field name, default or MISSING) for each field of a model class, computed once."""
    out = []
    for f in fields(cls):
        if f.default is not MISSING:
            out.append((f.name, f.default))
        elif f.default_factory is not MISSING:
            out.append((f.name, f.default_factory()))
        else:
            out.append((f.name, MISSING))
    return tuple(out)


def _to_json(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        if cls.__name__ not in _TYPES:
            raise TypeError(f"cannot encode {cls.__name__}")
        out: dict[str, Any] = {"@": cls.__name__}
        for name, default in _fields_and_defaults(cls):
            v = getattr(value, name)
            if default is not MISSING and v == default:
                continue
            out[name] = _to_json(v)
        return out
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    raise TypeError(f"cannot encode {type(value).__name__}")


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        cls = _TYPES.get(value.get("@", ""))
        if cls is None:
            raise ValueError(f"unknown stored type {value.get('@')!r}")
        kwargs = {k: _from_json(v) for k, v in value.items() if k != "@"}
        return cls(**kwargs)
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value


def encode(obj: Any) -> str:
    """The object as compact JSON text."""
    return json.dumps(_to_json(obj), separators=(",", ":"), ensure_ascii=False)


def decode(data: str | bytes) -> Any:
    """The object `encode` wrote."""
    return _from_json(json.loads(data))
