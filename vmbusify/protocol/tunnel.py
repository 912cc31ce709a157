"""The tunnel's own messages (Entity.TUNNEL), as dataclasses with strict decoding."""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from vmbusify.errors import RemoteProtocolError
from vmbusify.protocol.entities import Entity, TunnelMessage
from vmbusify.protocol.package import PROTOCOL_VERSION, Package, PackageType, Payload
from vmbusify.protocol.serialize import dumps, loads_dict


def _require(d: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = d.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise RemoteProtocolError(f"{what}: field {key!r} missing or of the wrong type")
    return value


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


#: Length of a HELLO's nonce; longer ones are a protocol error, shorter ones cannot be used
#: for AUTH (a peer of 0.1.0 sends none).
NONCE_SIZE = 32
#: At most this many features are read from a HELLO, each at most FEATURE_MAX characters.
MAX_FEATURES = 32
FEATURE_MAX = 64


@dataclass(frozen=True)
class Hello:
    """Sent first by both ends, and again by the guest when its addresses change.

    ``nonce`` (fresh random bytes for each connection) and ``features`` came after 0.1.0: a
    peer of 0.1.0 leaves them out (decoded as empty) and ignores them when we send them.
    """

    role: str
    hostname: str
    software_version: str
    protocol_version: int = PROTOCOL_VERSION
    ips: list[str] = field(default_factory=list)
    nonce: bytes = b""
    features: list[str] = field(default_factory=list)

    def package(self) -> Package:
        return Package(type=PackageType.MESSAGE, entity=Entity.TUNNEL,
                       message_id=TunnelMessage.HELLO, payload=dumps(asdict(self)))

    def has(self, feature: Feature) -> bool:
        """Whether the sender listed ``feature``."""
        return feature.value in self.features

    @classmethod
    def decode(cls, payload: Payload) -> Hello:
        d = loads_dict(payload, "HELLO")
        ips = _require(d, "ips", list, "HELLO")
        for ip in ips:
            try:
                ipaddress.ip_address(ip)
            except (ValueError, TypeError):
                raise RemoteProtocolError(f"HELLO: {ip!r} is not an IP address") from None
        role = _require(d, "role", str, "HELLO")
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
            hostname=_require(d, "hostname", str, "HELLO")[:255],
            software_version=_require(d, "software_version", str, "HELLO")[:64],
            protocol_version=_require(d, "protocol_version", int, "HELLO"),
            ips=list(ips[:256]),
            nonce=nonce,
            features=[f[:FEATURE_MAX] for f in features[:MAX_FEATURES]],
        )


@dataclass(frozen=True)
class Ping:
    """Liveness probe; the peer answers with a Pong carrying the same nonce."""

    nonce: int

    def package(self) -> Package:
        return Package(type=PackageType.MESSAGE, entity=Entity.TUNNEL,
                       message_id=TunnelMessage.PING, payload=dumps({"nonce": self.nonce}))

    @classmethod
    def decode(cls, payload: Payload) -> Ping:
        return cls(_require(loads_dict(payload, "PING"), "nonce", int, "PING"))


@dataclass(frozen=True)
class Pong:
    """Answer to a Ping."""

    nonce: int

    def package(self) -> Package:
        return Package(type=PackageType.MESSAGE, entity=Entity.TUNNEL,
                       message_id=TunnelMessage.PONG, payload=dumps({"nonce": self.nonce}))

    @classmethod
    def decode(cls, payload: Payload) -> Pong:
        return cls(_require(loads_dict(payload, "PONG"), "nonce", int, "PONG"))


@dataclass(frozen=True)
class WorkerLost:
    """A worker process on the sender's side went away; its entities' streams are gone."""

    entities: list[int]

    def package(self) -> Package:
        return Package(type=PackageType.MESSAGE, entity=Entity.TUNNEL,
                       message_id=TunnelMessage.WORKER_LOST,
                       payload=dumps({"entities": list(self.entities)}))

    @classmethod
    def decode(cls, payload: Payload) -> WorkerLost:
        entities = _require(loads_dict(payload, "WORKER_LOST"), "entities", list, "WORKER_LOST")
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in entities):
            raise RemoteProtocolError("WORKER_LOST: entities must be integers")
        return cls(entities[:64])


@dataclass(frozen=True)
class Bye:
    """The sender closes the tunnel, and says why."""

    reason: str

    def package(self) -> Package:
        return Package(type=PackageType.MESSAGE, entity=Entity.TUNNEL,
                       message_id=TunnelMessage.BYE, payload=dumps({"reason": self.reason}))

    @classmethod
    def decode(cls, payload: Payload) -> Bye:
        return cls(_require(loads_dict(payload, "BYE"), "reason", str, "BYE")[:500])


#: Length of an AUTH proof (HMAC-SHA256).
PROOF_SIZE = 32


@dataclass(frozen=True)
class Auth:
    """The sender proves it knows the tunnel's shared key (vmbusify/protocol/auth.py).

    Sent once each way after the HELLOs, when both HELLOs list Feature.KEY: the host first,
    the guest only once the host's proof checked out.
    """

    proof: bytes

    def package(self) -> Package:
        return Package(type=PackageType.MESSAGE, entity=Entity.TUNNEL,
                       message_id=TunnelMessage.AUTH, payload=dumps({"proof": self.proof}))

    @classmethod
    def decode(cls, payload: Payload) -> Auth:
        proof = _require(loads_dict(payload, "AUTH"), "proof", bytes, "AUTH")
        if len(proof) != PROOF_SIZE:
            raise RemoteProtocolError(f"AUTH: proof must be {PROOF_SIZE} bytes")
        return cls(proof)
