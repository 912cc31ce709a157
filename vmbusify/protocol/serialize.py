"""The one place application messages are (de)serialized: msgpack, strict on the way in."""

from __future__ import annotations

from typing import Any

import msgpack

from vmbusify.errors import LocalProtocolError, RemoteProtocolError

#: Nesting and size limits for untrusted input (msgpack's own defaults are far larger).
_MAX_LEN = 1 << 20


def dumps(obj: Any) -> bytes:
    """Encode an application message; raises LocalProtocolError for unencodable values."""
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode message: {exc}") from exc


def loads(data: bytes | memoryview) -> Any:
    """Decode an application message from a peer; raises RemoteProtocolError if invalid."""
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, max_str_len=_MAX_LEN, max_bin_len=_MAX_LEN,
            max_array_len=65536, max_map_len=65536, max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.exceptions.ExtraData,
            msgpack.exceptions.UnpackException, RecursionError) as exc:
        raise RemoteProtocolError(f"malformed application message: {exc}") from None


def loads_dict(data: bytes | memoryview, what: str) -> dict[str, Any]:
    """Decode a message that must be a map; raises RemoteProtocolError otherwise."""
    obj = loads(data)
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"{what}: expected a map, got {type(obj).__name__}")
    return obj
