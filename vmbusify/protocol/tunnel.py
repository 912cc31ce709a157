"""The tunnel's own messages (Entity.TUNNEL), as dataclasses with strict decoding."""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
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


@dataclass(frozen=True)
class Hello:
    """Sent first by both ends, and again by the guest when its addresses change."""

    role: str
    hostname: str
    software_version: str
    protocol_version: int = PROTOCOL_VERSION
    ips: list[str] = field(default_factory=list)

    def package(self) -> Package:
        return Package(PackageType.MESSAGE, Entity.TUNNEL, TunnelMessage.HELLO,
                       payload=dumps(asdict(self)))

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
        return cls(
            role=role,
            hostname=_require(d, "hostname", str, "HELLO")[:255],
            software_version=_require(d, "software_version", str, "HELLO")[:64],
            protocol_version=_require(d, "protocol_version", int, "HELLO"),
            ips=list(ips[:256]),
        )


@dataclass(frozen=True)
class Ping:
    """Liveness probe; the peer answers with a Pong carrying the same nonce."""

    nonce: int

    def package(self) -> Package:
        return Package(PackageType.MESSAGE, Entity.TUNNEL, TunnelMessage.PING,
                       payload=dumps({"nonce": self.nonce}))

    @classmethod
    def decode(cls, payload: Payload) -> Ping:
        return cls(_require(loads_dict(payload, "PING"), "nonce", int, "PING"))


@dataclass(frozen=True)
class Pong:
    """Answer to a Ping."""

    nonce: int

    def package(self) -> Package:
        return Package(PackageType.MESSAGE, Entity.TUNNEL, TunnelMessage.PONG,
                       payload=dumps({"nonce": self.nonce}))

    @classmethod
    def decode(cls, payload: Payload) -> Pong:
        return cls(_require(loads_dict(payload, "PONG"), "nonce", int, "PONG"))


@dataclass(frozen=True)
class WorkerLost:
    """A worker process on the sender's side went away; its entities' streams are gone."""

    entities: list[int]

    def package(self) -> Package:
        return Package(PackageType.MESSAGE, Entity.TUNNEL, TunnelMessage.WORKER_LOST,
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
        return Package(PackageType.MESSAGE, Entity.TUNNEL, TunnelMessage.BYE,
                       payload=dumps({"reason": self.reason}))

    @classmethod
    def decode(cls, payload: Payload) -> Bye:
        return cls(_require(loads_dict(payload, "BYE"), "reason", str, "BYE")[:500])
