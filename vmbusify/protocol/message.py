"""The one shape of every application and tunnel message: ``Message``, and its strict readers.

Every message an entity sends (docs/protocol.md, "Messages of the application entities") is a
frozen dataclass that subclasses ``Message``::

    @dataclass(frozen=True, slots=True)
    class Keepalive(Message, entity=Entity.IP_BEARER, message_id=SubnetMessage.KEEPALIVE,
                    name="KEEPALIVE"):
        stream: int

- ``ENTITY`` and ``MESSAGE_ID`` (class attributes, given as above) say who sends it and as
  what: the package header's entity and message id. A reply (the payload of the ACK of a
  request) names the entity that answers and the request's message id (an ACK repeats it).
- ``to_body()`` gives the msgpack-ready map (the field names and types on the wire): by
  default every field, in declaration order;
- ``from_body(body)`` checks a received map strictly (a peer is hostile: wrong types, missing
  keys, extra nesting) and raises RemoteProtocolError with a one-line reason, never
  KeyError or TypeError. By default each field of type int, str, bool or bytes is read with
  ``required`` (no default) or ``optional`` (its default), and cut to ``limit(n)`` items if
  its metadata says so; a message with other fields, or other rules, defines its own;
- ``payload()`` / ``from_payload()`` add the msgpack step, and ``package()`` the header (for
  the tunnel's own messages, which the mux sends itself).

``WorkerLink.sync_send(vmid, msg, reply=ReplyType)`` and ``async_send(vmid, msg)`` take these;
a handler reads ``Inbound.body`` with ``ThatMessage.from_body`` and returns ``to_body()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self, TypeVar

from vmbusify.errors import RemoteProtocolError
from vmbusify.protocol.package import Package, PackageType, Payload
from vmbusify.protocol.serialize import dumps, loads

T = TypeVar("T")
#: What ``optional`` returns for a key that is missing or null when no default is given.
_NONE: Any = None
#: Field types the default ``from_body`` reads (annotations are strings here).
_KINDS: dict[str, type] = {"int": int, "str": str, "bool": bool, "bytes": bytes}
_LIMIT = "vmbusify.limit"


def limit(n: int) -> dict[str, int]:
    """Field metadata: a received value (text, bytes) is cut to ``n`` items."""
    return {_LIMIT: n}


class Message:
    """Base of every message dataclass (see the module's docstring)."""

    __slots__ = ()  # so that a ``slots=True`` message has no instance dict

    #: The sending entity (vmbusify.protocol.entities.Entity).
    ENTITY: ClassVar[int]
    #: The message id (the entity's message enum).
    MESSAGE_ID: ClassVar[int]
    #: The message's name in errors and logs, e.g. ``PROXY-OPEN``.
    NAME: ClassVar[str]

    def __init_subclass__(cls, *, entity: int | None = None, message_id: int | None = None,
                          name: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if entity is not None:
            cls.ENTITY = entity
        if message_id is not None:
            cls.MESSAGE_ID = message_id
        if name:
            cls.NAME = name

    def to_body(self) -> dict[str, Any]:
        """The msgpack-ready map this message is on the wire: every field, in order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_body(cls, body: Any) -> Self:
        """The message a peer sent; RemoteProtocolError with a one-line reason if malformed."""
        d = body_map(body, cls.NAME)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            kind = _KINDS.get(f.type) if isinstance(f.type, str) else f.type
            if kind is None:  # a bug of ours, seen by the first test that decodes it
                raise TypeError(f"{cls.__name__}.{f.name}: a field of type {f.type} needs "
                                "the message's own from_body")
            if f.default is not dataclasses.MISSING:
                value = optional(d, f.name, kind, cls.NAME, f.default)
            else:
                value = required(d, f.name, kind, cls.NAME)
            n = f.metadata.get(_LIMIT)
            values[f.name] = value[:n] if n is not None else value
        return cls(**values)

    def payload(self) -> bytes:
        """The encoded package payload (msgpack of ``to_body()``)."""
        return dumps(self.to_body())

    @classmethod
    def from_payload(cls, payload: Payload) -> Self:
        """Decode and check a package payload; RemoteProtocolError if malformed."""
        return cls.from_body(loads(payload))

    def package(self, kind: PackageType = PackageType.MESSAGE) -> Package:
        """A package carrying this message (the tunnel's own messages; workers use the link)."""
        return Package(type=kind, entity=int(self.ENTITY), message_id=int(self.MESSAGE_ID),
                       payload=self.payload())


def body_map(body: Any, what: str) -> dict[str, Any]:
    """``body`` if it is a map; RemoteProtocolError naming ``what`` otherwise."""
    if not isinstance(body, dict):
        raise RemoteProtocolError(f"{what}: expected a map, got {type(body).__name__}")
    return body


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return "a number"
    names = {str: "a string", bool: "true or false", int: "an integer", dict: "a map",
             list: "a list", bytes: "bytes"}
    return names.get(kind, kind.__name__)


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    """isinstance, except that a bool is not an int (msgpack keeps them apart; so do we)."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def required(d: dict[str, Any], key: str, kind: type[T], what: str) -> T:
    """``d[key]``, which must be present and of ``kind``; RemoteProtocolError otherwise."""
    value = d.get(key)
    if not _is(value, kind):
        raise RemoteProtocolError(f"{what}: field {key!r} missing or of the wrong type "
                                  f"(must be {_kind_name(kind)})")
    return value  # type: ignore[return-value]  # checked just above


def optional(d: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str,
             default: Any = _NONE) -> Any:
    """``d[key]`` checked against ``kind``; ``default`` when missing or null."""
    value = d.get(key)
    if value is None:
        return default
    if not _is(value, kind):
        raise RemoteProtocolError(f"{what}: {key!r} must be {_kind_name(kind)}")
    return value
