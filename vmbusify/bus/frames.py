"""The bus envelope: every message between the mux and its workers, as a dataclass.

Every bus message is a ZeroMQ multipart message whose first frame is a BusKind. Each kind
has a dataclass here with ``to_frames()`` (what goes on the socket) and ``parse(frames)``
(a received message, checked: a malformed one raises RemoteProtocolError, never IndexError).
Both ends use them; this module imports no ZeroMQ, so it is tested without sockets
(tests/unit/test_bus_frames.py). A package travels with its 24-byte vmbus header as one
frame and its payload as another, so bulk bytes are never re-encoded between tunnel and
worker (pyzmq's metadata-frame + data-frame pattern)::

    REG    worker -> mux   [b"REG", msgpack{name, pid, entities, routes}]   (also a heartbeat)
                           routes: [[source entity, message id, RouteKind bits], ...]
    UNREG  worker -> mux   [b"UNREG"]                 the worker is stopping: forget it now
    REGOK  mux -> worker   [b"REGOK", msgpack{role, mux_id}]
    REREG  mux -> worker   [b"REREG"]                 the mux does not know this worker
    PKG    both ways       [b"PKG", vmid, header, payload]
    PKR    both ways       [b"PKR", vmid, header, ref]  the payload is in the ring (ring.py)
    RLS    both ways       [b"RLS", ring id (4) + position (8)]   the ring is free up to it
    CTL    worker -> mux   [b"CTL", call_id, msgpack{cmd, ...}]
           mux -> worker   [b"CTL", call_id, msgpack{ok, result} | msgpack{ok, error, code}]
    EVT    mux -> worker   [b"EVT", msgpack{event: "up"|"down"|"peer-lost", vmid, ...}]

On the mux's ROUTER every message starts with the worker's identity frame: the mux parses
``frames[1:]`` and sends ``[identity, *msg.to_frames()]``. Each end parses only what may
come its way (``from_worker``, ``from_mux``).

A PKG's payload is never copied: ``parse`` keeps the frame as it came (a big one is a view
of the ZeroMQ message) and ``to_frames`` hands it on as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any, ClassVar, Self

from vmbusify.errors import ErrorCode, RemoteProtocolError, VMBusifyError, code_of, error_from
from vmbusify.protocol.package import (
    HEADER_SIZE,
    MAX_PAYLOAD_LIMIT,
    Package,
    PackageType,
    Payload,
    decode_header,
)
from vmbusify.protocol.serialize import dumps, loads_dict

#: The frames of one bus message: small ones as bytes, big received ones as views. A
#: Sequence, so that what pyzmq's recv_multipart gives (list[bytes]) is one too.
Frames = Sequence[bytes | memoryview]


class BusKind(bytes, Enum):
    """The first frame of every bus message."""

    REG = b"REG"
    UNREG = b"UNREG"
    REGOK = b"REGOK"
    REREG = b"REREG"
    PKG = b"PKG"
    #: A PKG whose payload is in the link's shared-memory ring (vmbusify.bus.ring).
    PKR = b"PKR"
    #: How far the sender's ring may be written again (vmbusify.bus.ring).
    RLS = b"RLS"
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


#: The route kind each package type must arrive on (ACKs are matched by id, not routed):
#: checked by the mux's switch and again by the worker's link.
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
#: The longest vmid, worker name or call id taken from a bus frame.
MAX_NAME = 256


def _frames(frames: Frames, kind: BusKind, count: int) -> Frames:
    """``frames``, checked to be a ``kind`` message of exactly ``count`` frames."""
    if len(frames) != count:
        raise RemoteProtocolError(f"bus {kind.name} has {len(frames)} frames, not {count}")
    return frames


def _text(frame: bytes | memoryview, what: str) -> str:
    if len(frame) > MAX_NAME:
        raise RemoteProtocolError(f"bus {what} is longer than {MAX_NAME} bytes")
    try:
        return bytes(frame).decode()
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"bus {what} is not UTF-8") from None


def _ints(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise RemoteProtocolError(f"{what} must be a list of integers")
    return value


def _str(body: dict[str, Any], key: str, what: str, default: str | None = None) -> str:
    value = body.get(key, default)
    if not isinstance(value, str):
        raise RemoteProtocolError(f"{what}: {key!r} missing or not a string")
    return value


# -- worker -> mux -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Reg:
    """A worker registers (and, repeated every 2 s, says it is alive)."""

    KIND: ClassVar[BusKind] = BusKind.REG
    name: str
    pid: int
    entities: list[int]
    #: ``[source entity, message id, RouteKind bits]`` (two elements: every type).
    routes: list[list[int]]
    #: When the worker's link was made (CLOCK_MONOTONIC ns, one clock for the machine): of
    #: two links of one name, the REGs of the older are stale whatever order they arrive in
    #: (two ZeroMQ connections keep no order between them). 0: unknown (always taken).
    since: int = 0
    #: The worker's two rings (vmbusify.bus.ring): ``{"id", "size", "tx", "rx"}`` (file
    #: names in the bus directory); None: it has none (or is of before the rings).
    ring: dict[str, Any] | None = None

    def to_frames(self) -> Frames:
        return [BusKind.REG.value, dumps(self.body())]

    def body(self) -> dict[str, Any]:
        """The REG map (what the mux's route table reads)."""
        body = {"name": self.name, "pid": self.pid, "entities": list(self.entities),
                "routes": [list(r) for r in self.routes], "since": self.since}
        if self.ring is not None:
            body["ring"] = dict(self.ring)
        return body

    @classmethod
    def parse(cls, frames: Frames) -> Reg:
        body = loads_dict(_frames(frames, BusKind.REG, 2)[1], "REG")
        pid = body.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise RemoteProtocolError("REG: 'pid' missing or not an integer")
        routes = body.get("routes")
        if not isinstance(routes, list):
            raise RemoteProtocolError("REG: 'routes' must be a list")
        since = body.get("since", 0)
        if not isinstance(since, int) or isinstance(since, bool) or since < 0:
            raise RemoteProtocolError("REG: 'since' must be a non-negative integer")
        ring = body.get("ring")
        if ring is not None:
            ring = _ring_offer(ring)
        return cls(name=_str(body, "name", "REG")[:MAX_NAME], pid=pid,
                   entities=_ints(body.get("entities"), "REG entities"),
                   routes=[_ints(r, "a REG route") for r in routes], since=since, ring=ring)


def _ring_offer(ring: Any) -> dict[str, Any]:
    """A REG's ``ring``, checked: ``id`` and ``size`` integers, ``tx`` and ``rx`` names."""
    if not isinstance(ring, dict):
        raise RemoteProtocolError("REG: 'ring' must be a map")
    out: dict[str, Any] = {}
    for key in ("id", "size"):
        value = ring.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 32:
            raise RemoteProtocolError(f"REG ring: {key!r} must be a positive 32-bit integer")
        out[key] = value
    for key in ("tx", "rx"):
        value = ring.get(key)
        if not isinstance(value, str) or len(value) > MAX_NAME:
            raise RemoteProtocolError(f"REG ring: {key!r} must be a file name")
        out[key] = value
    return out


@dataclass(frozen=True, slots=True)
class _Signal:
    """A bus message that is its kind alone (no body): UNREG, REREG."""

    KIND: ClassVar[BusKind]

    def to_frames(self) -> Frames:
        return [self.KIND.value]

    @classmethod
    def parse(cls, frames: Frames) -> Self:
        _frames(frames, cls.KIND, 1)
        return cls()


@dataclass(frozen=True, slots=True)
class Unreg(_Signal):
    """The worker is stopping: the mux forgets it at once and tells the far side."""

    KIND: ClassVar[BusKind] = BusKind.UNREG


@dataclass(frozen=True, slots=True)
class CtlRequest:
    """A built-in command to the mux (status, list, vmid, ping, connect, disconnect, report);
    ``call_id`` is the worker's, repeated in the reply."""

    KIND: ClassVar[BusKind] = BusKind.CTL
    call_id: bytes
    cmd: str
    #: The command's arguments (``ip``, ``vmid``, ``timeout``, ``worker``, ``stats``, ...).
    args: dict[str, Any] = field(default_factory=dict)

    def to_frames(self) -> Frames:
        return [BusKind.CTL.value, self.call_id, dumps(self.body())]

    def body(self) -> dict[str, Any]:
        """The command as one map (``cmd`` and its arguments)."""
        return {**self.args, "cmd": self.cmd}

    @classmethod
    def parse(cls, frames: Frames) -> CtlRequest:
        _, call_id, raw = _frames(frames, BusKind.CTL, 3)
        if len(call_id) > MAX_NAME:
            raise RemoteProtocolError(f"CTL call id is longer than {MAX_NAME} bytes")
        body = loads_dict(raw, "CTL")
        cmd = _str(body, "cmd", "CTL")
        return cls(bytes(call_id), cmd, {k: v for k, v in body.items() if k != "cmd"})


# -- mux -> worker -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RegOk:
    """The mux took a REG; a new ``mux_id`` tells the worker the mux restarted."""

    KIND: ClassVar[BusKind] = BusKind.REGOK
    role: str
    mux_id: str
    #: The id of the worker's rings the mux has mapped (it reads the worker's ``tx`` and
    #: writes its ``rx``); 0: none (a mux of before the rings says nothing).
    ring: int = 0
    #: The id of the rings the REG answered offered (0: none), mapped or not: a worker
    #: tells an answer to its offer from one to an older REG.
    offered: int = 0

    def to_frames(self) -> Frames:
        body: dict[str, Any] = {"role": self.role, "mux_id": self.mux_id}
        if self.ring:
            body["ring"] = self.ring
        if self.offered:
            body["offered"] = self.offered
        return [BusKind.REGOK.value, dumps(body)]

    @classmethod
    def parse(cls, frames: Frames) -> RegOk:
        body = loads_dict(_frames(frames, BusKind.REGOK, 2)[1], "REGOK")
        ids = []
        for key in ("ring", "offered"):
            value = body.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool) \
                    or not 0 <= value < 1 << 32:
                raise RemoteProtocolError(f"REGOK: {key!r} must be a 32-bit integer")
            ids.append(value)
        return cls(_str(body, "role", "REGOK", ""), _str(body, "mux_id", "REGOK", ""), *ids)


@dataclass(frozen=True, slots=True)
class Rereg(_Signal):
    """The mux does not know this worker (it restarted): register again."""

    KIND: ClassVar[BusKind] = BusKind.REREG


@dataclass(frozen=True, slots=True)
class CtlReply:
    """The mux's answer to a CtlRequest: a result, or an error as its ErrorCode and text."""

    KIND: ClassVar[BusKind] = BusKind.CTL
    call_id: bytes
    ok: bool
    result: Any = None
    error: str = ""
    code: ErrorCode = ErrorCode.GENERIC

    @classmethod
    def failure(cls, call_id: bytes, exc: VMBusifyError) -> CtlReply:
        """The reply for a command that raised ``exc`` (its code goes with it)."""
        return cls(call_id, False, error=str(exc), code=exc.code)

    def to_frames(self) -> Frames:
        body: dict[str, Any] = ({"ok": True, "result": self.result} if self.ok else
                                {"ok": False, "error": self.error, "code": int(self.code)})
        return [BusKind.CTL.value, self.call_id, dumps(body)]

    def exception(self) -> VMBusifyError:
        """The error a failed reply stands for (its class by the code)."""
        return error_from(self.code, self.error or "failed")

    @classmethod
    def parse(cls, frames: Frames) -> CtlReply:
        _, call_id, raw = _frames(frames, BusKind.CTL, 3)
        body = loads_dict(raw, "CTL reply")
        if body.get("ok"):
            return cls(bytes(call_id), True, body.get("result"))
        code = body.get("code")
        return cls(bytes(call_id), False, error=str(body.get("error", "failed")),
                   code=code_of(code if isinstance(code, int) else None))


@dataclass(frozen=True, slots=True)
class Evt:
    """A tunnel came up (``ips``: the addresses the VM holds), went down (``reason``), or a
    worker on the far side went away (``entities``)."""

    KIND: ClassVar[BusKind] = BusKind.EVT
    event: TunnelEvent
    vmid: str
    ips: list[str] = field(default_factory=list)
    reason: str = ""
    entities: list[int] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        """What event handlers get: the fields this event has."""
        if self.event is TunnelEvent.UP:
            return {"ips": list(self.ips)}
        if self.event is TunnelEvent.DOWN:
            return {"reason": self.reason}
        return {"entities": list(self.entities)}

    def to_frames(self) -> Frames:
        return [BusKind.EVT.value,
                dumps({"event": self.event.value, "vmid": self.vmid, **self.info()})]

    @classmethod
    def parse(cls, frames: Frames) -> Evt:
        body = loads_dict(_frames(frames, BusKind.EVT, 2)[1], "EVT")
        try:
            event = TunnelEvent(body.get("event"))
        except ValueError:
            raise RemoteProtocolError(f"EVT: unknown event {body.get('event')!r}") from None
        ips = body.get("ips", [])
        if not isinstance(ips, list) or not all(isinstance(i, str) for i in ips):
            raise RemoteProtocolError("EVT: 'ips' must be a list of strings")
        return cls(event, _str(body, "vmid", "EVT"), ips,
                   _str(body, "reason", "EVT",
                        "tunnel down" if event is TunnelEvent.DOWN else ""),
                   _ints(body.get("entities", []), "EVT entities"))


# -- both ways -----------------------------------------------------------------------------

@dataclass(slots=True)  # not frozen: one is made per package, and frozen costs ~0.3 us each
class Pkg:
    """A vmbus package to or from ``vmid``: its 24-byte header and its payload, each a frame.

    The header is checked only where it is read (``package()``, the mux's switch); the
    payload is never copied, here or on the way on.
    """

    KIND: ClassVar[BusKind] = BusKind.PKG
    vmid: str
    header: bytes
    payload: Payload

    @classmethod
    def of(cls, vmid: str, pkg: Package) -> Pkg:
        """The PKG that carries ``pkg``."""
        return cls(vmid, pkg.header(), pkg.payload)

    def to_frames(self) -> Frames:
        return [BusKind.PKG.value, self.vmid.encode(), self.header, self.payload]

    def package(self) -> Package:
        """The package, its header decoded and checked (RemoteProtocolError if invalid)."""
        return decode_header(self.header, MAX_PAYLOAD_LIMIT).package(self.payload)

    @classmethod
    def parse(cls, frames: Frames) -> Pkg:
        _, vmid, header, payload = _frames(frames, BusKind.PKG, 4)
        if len(header) != HEADER_SIZE:
            raise RemoteProtocolError(f"bus PKG header is {len(header)} bytes, not "
                                      f"{HEADER_SIZE}")
        return cls(_text(vmid, "vmid"), bytes(header), payload)


@dataclass(slots=True)
class PkgRef:
    """A PKG whose payload is in the link's ring: ``ref`` (16 bytes, vmbusify.bus.ring.REF)
    stands for it; ``length`` is the header's payload length (its lane's size)."""

    KIND: ClassVar[BusKind] = BusKind.PKR
    vmid: str
    header: bytes
    ref: bytes

    def to_frames(self) -> Frames:
        return [BusKind.PKR.value, self.vmid.encode(), self.header, self.ref]

    @property
    def length(self) -> int:
        """The payload's length (the reference's)."""
        return int.from_bytes(self.ref[12:16], "big")

    @classmethod
    def parse(cls, frames: Frames) -> PkgRef:
        _, vmid, header, ref = _frames(frames, BusKind.PKR, 4)
        if len(header) != HEADER_SIZE or len(ref) != _REF_SIZE:
            raise RemoteProtocolError(f"bus PKR with a header of {len(header)} bytes and a "
                                      f"reference of {len(ref)}")
        return cls(_text(vmid, "vmid"), bytes(header), bytes(ref))


_REF_SIZE = 16


@dataclass(frozen=True, slots=True)
class Release:
    """The sender is done with the receiver's ring ``ring`` up to position ``upto``."""

    KIND: ClassVar[BusKind] = BusKind.RLS
    ring: int
    upto: int

    def to_frames(self) -> Frames:
        return [BusKind.RLS.value, self.ring.to_bytes(4, "big") + self.upto.to_bytes(8, "big")]

    @classmethod
    def parse(cls, frames: Frames) -> Release:
        raw = _frames(frames, BusKind.RLS, 2)[1]
        if len(raw) != 12:
            raise RemoteProtocolError(f"bus RLS of {len(raw)} bytes, not 12")
        raw = bytes(raw)
        return cls(int.from_bytes(raw[:4], "big"), int.from_bytes(raw[4:], "big"))


FromWorker = Reg | Unreg | CtlRequest | Pkg | PkgRef | Release
FromMux = RegOk | Rereg | CtlReply | Evt | Pkg | PkgRef | Release
BusMessage = FromWorker | FromMux

_FROM_WORKER: dict[bytes, Any] = {
    BusKind.REG.value: Reg, BusKind.UNREG.value: Unreg, BusKind.CTL.value: CtlRequest,
    BusKind.PKG.value: Pkg, BusKind.PKR.value: PkgRef, BusKind.RLS.value: Release}
_FROM_MUX: dict[bytes, Any] = {
    BusKind.REGOK.value: RegOk, BusKind.REREG.value: Rereg, BusKind.CTL.value: CtlReply,
    BusKind.EVT.value: Evt, BusKind.PKG.value: Pkg, BusKind.PKR.value: PkgRef,
    BusKind.RLS.value: Release}


def _parse(frames: Frames, table: dict[bytes, Any], direction: str) -> Any:
    if not frames:
        raise RemoteProtocolError("empty bus message")
    kind = bytes(frames[0]) if len(frames[0]) <= 8 else b""
    cls = table.get(kind)
    if cls is None:
        raise RemoteProtocolError(f"bus message of kind {kind[:8]!r} {direction}")
    return cls.parse(frames)


def from_worker(frames: Frames) -> FromWorker:
    """A message a worker sent to the mux (without the ROUTER's identity frame)."""
    msg: FromWorker = _parse(frames, _FROM_WORKER, "from a worker")
    return msg


def from_mux(frames: Frames) -> FromMux:
    """A message the mux sent to a worker."""
    msg: FromMux = _parse(frames, _FROM_MUX, "from the mux")
    return msg


def vmid_of(frames: Frames) -> str:
    """The vmid of a PKG message, for a log line about it ("" if it has none)."""
    try:
        if len(frames) >= 2 and bytes(frames[0]) in (BusKind.PKG.value, BusKind.PKR.value):
            return bytes(frames[1][:MAX_NAME]).decode("utf-8", "replace")
    except TypeError:
        pass
    return ""
