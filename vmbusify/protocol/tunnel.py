"""The tunnel's own messages (Entity.TUNNEL): ``vmbusify.protocol.message.Message``
dataclasses with strict decoding; the mux sends them with ``package()``."""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from vmbusify.errors import RemoteProtocolError
from vmbusify.protocol.entities import Entity, TunnelMessage
from vmbusify.protocol.message import Message, body_map, limit, required
from vmbusify.protocol.package import PROTOCOL_VERSION


class Feature(str, Enum):
    """What an end can do, listed in its HELLO's ``features``; unknown ones are ignored."""

    #: The sender understands AUTH messages.
    AUTH = "auth"
    #: The sender holds a shared key for this tunnel: both ends must prove it (AUTH) before
    #: anything else is accepted.
    KEY = "key"
    #: The sender's ERROR ACKs carry msgpack ``{code, reason}`` (an ErrorCode, see
    #: vmbusify/errors.py) and it reads them so; without it on both ends, the reason alone
    #: as UTF-8 text (0.1.0).
    ERROR_CODES = "error-codes"
    #: Host: it reads STATS. Guest: it sends them (every STATS_INTERVAL) to a host listing it.
    STATS = "stats"


#: Length of a HELLO's nonce; longer ones are a protocol error, shorter ones cannot be used
#: for AUTH (a peer of 0.1.0 sends none).
NONCE_SIZE = 32
#: At most this many features are read from a HELLO, each at most FEATURE_MAX characters.
MAX_FEATURES = 32
FEATURE_MAX = 64


@dataclass(frozen=True)
class Hello(Message, entity=Entity.TUNNEL, message_id=TunnelMessage.HELLO, name="HELLO"):
    """Sent first by both ends, and again by the guest when its addresses change.

    ``nonce`` (fresh random bytes for each connection) and ``features`` came after 0.1.0: a
    peer of 0.1.0 leaves them out (decoded as empty) and ignores them when we send them.
    The fields' order is the order on the wire (``to_body``): new ones go at the end.
    """

    role: str
    hostname: str
    software_version: str
    protocol_version: int = PROTOCOL_VERSION
    ips: list[str] = field(default_factory=list)
    nonce: bytes = b""
    features: list[str] = field(default_factory=list)

    def has(self, feature: Feature) -> bool:
        """Whether the sender listed ``feature``."""
        return feature.value in self.features

    @classmethod
    def from_body(cls, body: Any) -> Hello:
        """Check a peer's HELLO; RemoteProtocolError if malformed."""
        d = body_map(body, cls.NAME)
        ips = required(d, "ips", list, "HELLO")
        for ip in ips:
            try:
                ipaddress.ip_address(ip)
            except (ValueError, TypeError):
                raise RemoteProtocolError(f"HELLO: {ip!r} is not an IP address") from None
        role = required(d, "role", str, "HELLO")
        if role not in ("host", "guest"):
            raise RemoteProtocolError(f"HELLO: unknown role {role!r}")
        nonce = d.get("nonce", b"")
        if not isinstance(nonce, bytes) or len(nonce) > NONCE_SIZE:
            raise RemoteProtocolError(f"HELLO: nonce must be at most {NONCE_SIZE} bytes")
        features = d.get("features", [])
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise RemoteProtocolError("HELLO: features must be a list of strings")
        return cls(
            role=role,
            hostname=required(d, "hostname", str, "HELLO")[:255],
            software_version=required(d, "software_version", str, "HELLO")[:64],
            protocol_version=required(d, "protocol_version", int, "HELLO"),
            ips=list(ips[:256]),
            nonce=nonce,
            features=[f[:FEATURE_MAX] for f in features[:MAX_FEATURES]],
        )


@dataclass(frozen=True)
class Ping(Message, entity=Entity.TUNNEL, message_id=TunnelMessage.PING, name="PING"):
    """Liveness probe; the peer answers with a Pong carrying the same nonce."""

    nonce: int


@dataclass(frozen=True)
class Pong(Message, entity=Entity.TUNNEL, message_id=TunnelMessage.PONG, name="PONG"):
    """Answer to a Ping."""

    nonce: int


@dataclass(frozen=True)
class WorkerLost(Message, entity=Entity.TUNNEL, message_id=TunnelMessage.WORKER_LOST,
                 name="WORKER_LOST"):
    """A worker process on the sender's side went away; its entities' streams are gone."""

    entities: list[int]

    @classmethod
    def from_body(cls, body: Any) -> WorkerLost:
        """Check a WORKER_LOST; RemoteProtocolError if malformed."""
        entities = required(body_map(body, cls.NAME), "entities", list, cls.NAME)
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in entities):
            raise RemoteProtocolError("WORKER_LOST: entities must be integers")
        return cls(entities[:64])


@dataclass(frozen=True)
class Bye(Message, entity=Entity.TUNNEL, message_id=TunnelMessage.BYE, name="BYE"):
    """The sender closes the tunnel, and says why."""

    reason: str = field(metadata=limit(500))


#: Length of an AUTH proof (HMAC-SHA256).
PROOF_SIZE = 32


@dataclass(frozen=True)
class Auth(Message, entity=Entity.TUNNEL, message_id=TunnelMessage.AUTH, name="AUTH"):
    """The sender proves it knows the tunnel's shared key (vmbusify/protocol/auth.py).

    Sent once each way after the HELLOs, when both HELLOs list Feature.KEY: the host first,
    the guest only once the host's proof checked out.
    """

    proof: bytes

    @classmethod
    def from_body(cls, body: Any) -> Auth:
        """Check an AUTH; RemoteProtocolError if malformed."""
        auth = super().from_body(body)
        if len(auth.proof) != PROOF_SIZE:
            raise RemoteProtocolError(f"AUTH: proof must be {PROOF_SIZE} bytes")
        return auth


#: A STATS carries at most this many counters, each name at most STAT_NAME_MAX characters
#: of ``[a-z0-9_.:-]`` (others become ``_``); anything else in it is left out.
MAX_STATS = 256
STAT_NAME_MAX = 100
#: Seconds between a guest's STATS.
STATS_INTERVAL = 10.0
_NOT_STAT_NAME = re.compile(r"[^a-z0-9_.:-]")


def stat_name(name: str) -> str:
    """A peer's counter name as the host keeps it: lower case, at most STAT_NAME_MAX
    characters of ``[a-z0-9_.:-]`` (any other becomes ``_``)."""
    return _NOT_STAT_NAME.sub("_", name[:STAT_NAME_MAX].lower())


@dataclass(frozen=True)
class Stats(Message, entity=Entity.TUNNEL, message_id=TunnelMessage.STATS, name="STATS"):
    """The guest's own counters, ``{name: number}`` (names like ``proxy.open``,
    ``mux.bytes_in``), relayed to the host's /metrics. A guest is hostile: ``from_body``
    keeps at most MAX_STATS finite numbers under cleaned names and drops the rest."""

    counters: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_body(cls, body: Any) -> Stats:
        """Check a peer's STATS; RemoteProtocolError if it is not a map of counters."""
        counters = required(body_map(body, cls.NAME), "counters", dict, cls.NAME)
        kept: dict[str, float] = {}
        for name, value in counters.items():
            if len(kept) >= MAX_STATS:
                break
            if (not isinstance(name, str) or isinstance(value, bool)
                    or not isinstance(value, (int, float)) or not math.isfinite(value)):
                continue
            clean = stat_name(name)
            if clean:
                kept[clean] = float(value)
        return cls(kept)


def flatten_stats(tree: Any, prefix: str = "", out: dict[str, float] | None = None
                  ) -> dict[str, float]:
    """The numbers in a status tree as ``{"a.b.c": n}`` (booleans as 0/1, text left out),
    at most MAX_STATS of them: what a guest puts in its STATS."""
    out = {} if out is None else out
    if isinstance(tree, dict):
        for key, value in tree.items():
            if len(out) >= MAX_STATS:
                break
            flatten_stats(value, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(tree, (int, float)) and prefix and math.isfinite(tree):  # bool is an int
        out[stat_name(prefix)] = float(tree)
    return out
