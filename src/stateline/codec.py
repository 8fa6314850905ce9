"""JSON encoding of stored values: strict (only real JSON is accepted) and fast (orjson)."""

from __future__ import annotations

import math
from typing import Any

import orjson

from stateline.errors import InvalidArgument, PayloadTooLarge

__all__ = ["decode", "dumps", "encode", "encode_checked", "loads", "sized"]

_OPTS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS

dumps = orjson.dumps
loads = orjson.loads
decode = orjson.loads


def _reject(_: Any) -> Any:
    raise TypeError


def _check(value: Any, field: str, depth: int) -> None:
    # orjson would silently turn NaN into null and accept enums and UUIDs; a stored value must
    # round-trip exactly, so everything that is not plain JSON is refused here. Scalars inside
    # containers are checked inline: a call per scalar would double the cost of the walk.
    t = type(value)
    if t is dict:
        if depth > 64:
            raise InvalidArgument(field, "nested deeper than 64 levels")
        for k, v in value.items():
            if type(k) is not str:
                raise InvalidArgument(field, f"object keys must be strings, got {type(k).__name__}")
            tv = type(v)
            if tv is str or tv is int or tv is bool or v is None:
                continue
            if tv is float and math.isfinite(v):
                continue
            _check(v, field, depth + 1)
        return
    if t is list or t is tuple:
        if depth > 64:
            raise InvalidArgument(field, "nested deeper than 64 levels")
        for v in value:
            tv = type(v)
            if tv is str or tv is int or tv is bool or v is None:
                continue
            if tv is float and math.isfinite(v):
                continue
            _check(v, field, depth + 1)
        return
    if t is str or t is int or t is bool or value is None:
        return
    if t is float:
        if not math.isfinite(value):
            raise InvalidArgument(field, "NaN and infinity are not JSON")
        return
    raise InvalidArgument(field, f"{t.__name__} is not a JSON value")


def encode(value: Any, field: str = "value", max_bytes: int | None = None) -> bytes:
    """Encode a JSON value, refusing anything that would not round-trip exactly.

    Raises ``InvalidArgument`` naming ``field`` for a non-JSON value and
    ``PayloadTooLarge`` when the encoding exceeds ``max_bytes``.
    """
    _check(value, field, 0)
    return encode_checked(value, field, max_bytes)


def encode_checked(value: Any, field: str = "value", max_bytes: int | None = None) -> bytes:
    """Encode a value a layer built from parts ``encode`` already accepted (so it skips the walk
    for non-JSON values); the encoder still refuses what it cannot encode, and the size is checked."""
    try:
        data = orjson.dumps(value, default=_reject, option=_OPTS)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InvalidArgument(field, f"not encodable as JSON ({exc})") from None
    return data if max_bytes is None else sized(data, field, max_bytes)


def sized(data: bytes, field: str, max_bytes: int) -> bytes:
    """``data`` if it is at most ``max_bytes`` long, else ``PayloadTooLarge`` naming ``field``."""
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            f"{field}: {len(data)} bytes is over the limit of {max_bytes}",
            details={"field": field, "size": len(data), "limit": max_bytes},
        )
    return data
