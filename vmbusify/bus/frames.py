"""The bus: how the mux and its workers talk over ZeroMQ (the only module that frames it).

Every bus message is a ZeroMQ multipart message whose first frame is a BusKind. A package
travels with its 24-byte vmbus header as one frame and its payload as another, so bulk bytes
are never re-encoded between tunnel and worker (pyzmq's metadata-frame + data-frame pattern)::

    REG    worker -> mux   [b"REG", msgpack{name, pid, entities, routes}]   (also a heartbeat)
                           routes: [[source entity, message id, RouteKind], ...]
    UNREG  worker -> mux   [b"UNREG"]                 the worker is stopping: forget it now
    REGOK  mux -> worker   [b"REGOK", msgpack{role, mux_id}]
    REREG  mux -> worker   [b"REREG"]                 the mux does not know this worker
    PKG    both ways       [b"PKG", vmid, header, payload]
    CTL    both ways       [b"CTL", call_id, msgpack{cmd, ...} | msgpack{ok, result|error}]
    EVT    mux -> worker   [b"EVT", msgpack{event: "up"|"down"|"peer-lost", vmid, ...}]
"""

from __future__ import annotations

from enum import Enum, IntEnum

from vmbusify.protocol.package import PackageType


class BusKind(bytes, Enum):
    """The first frame of every bus message."""

    REG = b"REG"
    UNREG = b"UNREG"
    REGOK = b"REGOK"
    REREG = b"REREG"
    PKG = b"PKG"
    CTL = b"CTL"
    EVT = b"EVT"


class RouteKind(IntEnum):
    """What a worker's route accepts: the third element of each REG route.

    A package whose type does not fit its route's kind is dropped and counted (a REQUEST is
    answered at once with an ERROR ACK): one-way where a request is due must not run a
    handler inline in the receive loop. A route without a kind (older workers) takes any.
    """

    #: One-way messages (async_send); the handler runs inline, in order of arrival.
    MESSAGE = 1
    #: Requests (sync_send); the handler runs in a task of its own, its result is the ACK.
    REQUEST = 2
    #: DATA and WINDOW packages of streams (handler None: they go to ``link.streams``).
    STREAM = 4


#: The route kind each package type must arrive on (ACKs are matched by id, not routed).
KIND_OF_TYPE: dict[PackageType, RouteKind] = {
    PackageType.MESSAGE: RouteKind.MESSAGE,
    PackageType.REQUEST: RouteKind.REQUEST,
    PackageType.DATA: RouteKind.STREAM,
    PackageType.WINDOW: RouteKind.STREAM,
}


class TunnelEvent(str, Enum):
    """What EVT announces."""

    UP = "up"
    DOWN = "down"
    #: A worker on the far side died or restarted (``entities`` says which).
    PEER_LOST = "peer-lost"


#: On the guest, the one peer a worker can address.
HOST_VMID = "host"
