"""The bus: how the mux and its workers talk over ZeroMQ (the only module that frames it).

Every bus message is a ZeroMQ multipart message whose first frame is a BusKind. A package
travels with its 24-byte vmbus header as one frame and its payload as another, so bulk bytes
are never re-encoded between tunnel and worker (pyzmq's metadata-frame + data-frame pattern)::

    REG    worker -> mux   [b"REG", msgpack{name, pid, entities, routes}]   (also a heartbeat)
                           routes: [[source entity, message id, RouteKind bits], ...]
    UNREG  worker -> mux   [b"UNREG"]                 the worker is stopping: forget it now
    REGOK  mux -> worker   [b"REGOK", msgpack{role, mux_id}]
    REREG  mux -> worker   [b"REREG"]                 the mux does not know this worker
    PKG    both ways       [b"PKG", vmid, header, payload]
    CTL    both ways       [b"CTL", call_id, msgpack{cmd, ...} | msgpack{ok, result|error}]
    EVT    mux -> worker   [b"EVT", msgpack{event: "up"|"down"|"peer-lost", vmid, ...}]
"""

from __future__ import annotations

from enum import Enum, IntEnum


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
    """What a worker's route accepts: the third element of a REG route (bits, may be ORed).

    A route without it accepts every type (a worker from before kinds existed).
    """

    MESSAGE = 1
    REQUEST = 2
    #: DATA and WINDOW of a stream.
    STREAM = 4


class TunnelEvent(str, Enum):
    """What EVT announces."""

    UP = "up"
    DOWN = "down"
    #: A worker on the far side died or restarted (``entities`` says which).
    PEER_LOST = "peer-lost"


#: On the guest, the one peer a worker can address.
HOST_VMID = "host"
