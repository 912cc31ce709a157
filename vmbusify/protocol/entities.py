"""Application entities (spec 4.1) and the tunnel's own message ids."""

from __future__ import annotations

from enum import IntEnum


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
        """The entity's name as the spec writes it, e.g. ``proxy-client``."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_label(cls, label: str) -> Entity:
        """The entity named ``label`` (``proxy-client``); raises ValueError if unknown."""
        try:
            return cls[label.upper().replace("-", "_")]
        except KeyError:
            raise ValueError(f"unknown entity {label!r}") from None


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
