"""JSON for the exec client's start: the standard library's own C codec (``_json``) without
the ``json`` package around it.

``import json`` compiles five regular expressions and loads ``re`` (about 1.5 ms of CPU over
``re`` itself, and ``re`` is ~2 ms more): ``vmbusifyexec`` starts once per command and its
start is its latency (docs/performance.md, "`vmbusifyexec true` against ssh"). The exec
client writes one small request and reads one STATUS message; both go through here. The
scanner is ``json.loads``'s own (``_json.make_scanner``, with json's defaults); the writer
covers the types a request holds. Anything else should use ``json``.
"""

from __future__ import annotations

from _json import encode_basestring_ascii, make_scanner

_WHITESPACE = " \t\n\r"
_INF = float("inf")
_CONSTANTS = {"-Infinity": -_INF, "Infinity": _INF, "NaN": float("nan")}


class _Context:
    """What ``_json.make_scanner`` reads from its decoder: json.JSONDecoder()'s defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


_scan = make_scanner(_Context())  # type: ignore[arg-type]  # it reads those attributes


def loads(data: bytes | str) -> object:
    """``json.loads(data)``: ValueError (json.JSONDecodeError) on anything that is not one
    JSON document."""
    text = data.decode() if isinstance(data, bytes) else data  # UnicodeDecodeError: ValueError
    end = len(text)
    start = 0
    while start < end and text[start] in _WHITESPACE:
        start += 1
    try:
        value, at = _scan(text, start)
    except StopIteration as exc:
        raise ValueError(f"not JSON at character {exc.value}") from None
    while at < end and text[at] in _WHITESPACE:
        at += 1
    if at != end:
        raise ValueError(f"extra data after the JSON document at character {at}")
    return value


def dumps(value: object) -> str:
    """``json.dumps(value)`` for str, int, float (finite), bool, None, list, tuple and dict
    with str keys (ASCII output, json's separators); TypeError or ValueError otherwise."""
    if isinstance(value, str):
        return encode_basestring_ascii(value)  # type: ignore[no-any-return]
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if not -_INF < value < _INF:  # NaN and the infinities
            raise ValueError(f"{value!r} is not JSON")
        return float.__repr__(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(dumps(item) for item in value) + "]"
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be str, not {type(key).__name__}")
            items.append(f"{encode_basestring_ascii(key)}: {dumps(item)}")
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
