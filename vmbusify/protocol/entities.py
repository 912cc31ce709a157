"""Application entities and the tunnel's own message ids (docs/protocol.md, "Messages of the
application entities")."""

from __future__ import annotations

from enum import Enum, IntEnum


class Entity(IntEnum):
    """Who sent a package. The wire carries the code; logs and the route table the name."""

    #: The tunnel itself: HELLO, PING, PONG, BYE.
    TUNNEL = 0
    #: Host: the command listener, which starts execs on behalf of vmbusifyexec.
    CMD_LISTENER = 1
    #: Guest: the command executor, which runs them.
    CMD_EXECUTOR = 2
    #: Both ends: the SOCKS/HTTP proxy client (faces local users).
    PROXY_CLIENT = 3
    #: Both ends: the proxy server (connects to targets).
    PROXY_SERVER = 4
    #: Both ends: the virtual subnet's IP bearer.
    IP_BEARER = 5

    @property
    def label(self) -> str:
        """The entity's name as docs/protocol.md writes it, e.g. ``proxy-client``."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_label(cls, label: str) -> Entity:
        """The entity named ``label`` (``proxy-client``); raises ValueError if unknown."""
        try:
            return cls[label.upper().replace("-", "_")]
        except KeyError:
            raise ValueError(f"unknown entity {label!r}") from None


class Side(str, Enum):
    """An end of the tunnel (the same values as config.Role)."""

    HOST = "host"
    GUEST = "guest"


_BOTH = frozenset({Side.HOST, Side.GUEST})

#: Where each entity lives. A package that arrives from the other side as one of these is
#: forged (root in a guest can write any header): the mux drops it. Codes not listed here
#: are not judged (a newer worker's entity): they reach only workers that route them.
ENTITY_SIDES: dict[int, frozenset[Side]] = {
    Entity.TUNNEL: _BOTH,
    Entity.CMD_LISTENER: frozenset({Side.HOST}),
    Entity.CMD_EXECUTOR: frozenset({Side.GUEST}),
    Entity.PROXY_CLIENT: _BOTH,
    Entity.PROXY_SERVER: _BOTH,
    Entity.IP_BEARER: _BOTH,
}


def may_send_as(side: str, entity: int) -> bool:
    """Whether the ``side`` ("host" or "guest") end may send as ``entity``."""
    sides = ENTITY_SIDES.get(entity)
    return sides is None or Side(side) in sides


def foreign_entities(side: str) -> frozenset[int]:
    """The entity codes the ``side`` end never sends as (one set lookup per package)."""
    return frozenset(e for e in ENTITY_SIDES if not may_send_as(side, e))


def entity_label(code: int) -> str:
    """A printable name for an entity code, known or not."""
    try:
        return Entity(code).label
    except ValueError:
        return f"entity-{code}"


class TunnelMessage(IntEnum):
    """Message ids of Entity.TUNNEL."""

    #: First package each way: versions, hostname, addresses (sent again when they change).
    HELLO = 1
    PING = 2
    PONG = 3
    #: The sender is closing the tunnel; payload says why (e.g. another host is connected).
    BYE = 4
    #: A worker on the sender's side died or restarted: streams with its entities are gone.
    WORKER_LOST = 5
    #: The sender's proof that it knows the tunnel's shared key (after both HELLOs).
    AUTH = 6
    #: Guest -> host, only to a host whose HELLO lists ``stats``: the guest's own counters
    #: (guests have no network to be scraped on; docs/metrics.md).
    STATS = 7
