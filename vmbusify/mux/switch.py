"""The mux's routing decisions, sans-I/O: inputs in, actions out.

The switch is the mux without sockets, asyncio or ZeroMQ. It is told what happened (a
package came from VM X's tunnel, a worker sent a package for VM X, a worker registered or
went away, a tunnel came up or went down) and answers with the actions to take, which
MuxApp (vmbusify/mux/app.py) only executes:

- ``ToWorker``: a package to one worker process over the bus;
- ``ToTunnel``: a package to one VM's tunnel (or, on a guest, the host's);
- ``AnswerError``: an ERROR ACK for a request that cannot be served, to the worker that
  asked or to the peer over the tunnel;
- ``Drop``: a package not delivered, and why (the mux counts a peer's drops per VM and logs
  them rate-limited);
- ``Hold``: a worker's package for a VM whose tunnel is down (the host may connect on demand);
- ``WorkerJoined`` / ``WorkerGone``: for the log (announcements to the peers follow as
  ``ToTunnel`` actions).

Rules for a package from a tunnel (the peer is untrusted: root in a guest writes any header):

1. An entity the sending side cannot have is dropped (a guest never sends as
   ``cmd-listener``, a host never as ``cmd-executor``: protocol/entities.py's ENTITY_SIDES).
2. An ACK goes to the worker whose request it answers, with that worker's own request id;
   an ACK that answers nothing the mux forwarded is dropped.
3. Anything else goes by (source entity, message id) to the workers that registered it, in
   registration order, and only to those whose route accepts the package's type
   (``RouteKind``: MESSAGE, REQUEST, STREAM for DATA and WINDOW; a route without a kind takes
   all). A REQUEST goes to the first worker that takes requests, which answers it; every other
   worker of the pair that takes messages gets it as a one-way MESSAGE.
4. No worker for the pair, or none for that type: dropped; a REQUEST is answered at once with
   an ERROR ACK saying why ("no worker on NAME handles ENTITY message N", "wrong package type
   for ENTITY message N"), so the sender does not wait out its timeout.

Error ACKs carry an ErrorCode (vmbusify/errors.py) and a reason: msgpack ``{code, reason}``
on the bus, and over a tunnel whose peer listed the HELLO feature ``error-codes``. A peer of
0.1.0 sends and expects the reason alone, as UTF-8 text: for such a tunnel the switch turns
the workers' coded ERROR ACKs into plain text on the way out, and the peer's plain ones into
the coded form (code GENERIC) on the way in, so workers only ever see the coded form.

Every check is a set or dict lookup and a bit test: the data path stays one hop.
"""

from __future__ import annotations

import itertools
from collections.abc import Container
from dataclasses import dataclass
from enum import Enum
from typing import Any

from vmbusify.bus.frames import KIND_OF_TYPE, RouteKind
from vmbusify.errors import ErrorCode
from vmbusify.mux.router import RouteTable, WorkerInfo, kind_label
from vmbusify.protocol.entities import Side, entity_label, foreign_entities
from vmbusify.protocol.package import (
    MAX_PAYLOAD_LIMIT,
    ErrorReply,
    Package,
    PackageFlag,
    PackageType,
    Payload,
    decode_header,
    encode_header,
)
from vmbusify.protocol.tunnel import WorkerLost


class DropReason(str, Enum):
    """Why a package was not delivered (the key of the per-VM drop counters)."""

    #: From a peer: its type is not one the route takes (a one-way MESSAGE where a REQUEST is
    #: due, DATA for a request handler, ...).
    WRONG_TYPE = "wrong-type"
    #: From a peer: sent as an entity that only the other side has.
    FOREIGN_ENTITY = "foreign-entity"
    #: From a peer: no worker registered its (source entity, message id).
    NO_ROUTE = "no-route"
    #: From a peer: an ACK whose id answers no request the mux forwarded.
    STRAY_ACK = "stray-ack"
    #: From a worker: a package (not a request) for a VM that is not configured.
    UNKNOWN_VM = "unknown-vm"

    @property
    def from_peer(self) -> bool:
        """Whether the peer sent the dropped package (counted per VM) or a local worker did."""
        return self is not DropReason.UNKNOWN_VM


# -- actions -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ToWorker:
    """Send a package to one worker: ``[PKG, vmid, header, payload]``."""

    identity: bytes
    vmid: str
    header: bytes
    payload: Payload
    #: On the delivery that must answer a REQUEST: if this worker turns out to be gone, the
    #: package is routed again (Switch.undeliverable) and the next handler answers.
    retry: Package | None = None


@dataclass(frozen=True, slots=True)
class ToTunnel:
    """Queue a package on the tunnel to ``vmid``."""

    vmid: str
    header: bytes
    payload: Payload
    type: PackageType
    entity: int
    stream: int


@dataclass(frozen=True, slots=True)
class AnswerError:
    """Answer request ``call_id`` with an ERROR ACK carrying ``code`` and ``reason``."""

    vmid: str
    call_id: int
    message_id: int
    reason: str
    #: The worker that asked; None: the peer at the far end of ``vmid``'s tunnel.
    identity: bytes | None = None
    stream: int = 0
    code: ErrorCode = ErrorCode.GENERIC
    #: The reason alone, as text: the peer is of 0.1.0 (its HELLO lists no error-codes).
    plain: bool = False

    def package(self) -> Package:
        """The ACK itself (entity 0: the mux answers, not a worker)."""
        return ErrorReply(self.code, self.reason).ack(
            entity=0, id=self.call_id, message_id=self.message_id, stream=self.stream,
            plain=self.plain)


@dataclass(frozen=True, slots=True)
class Drop:
    """A package not delivered: its header's fields, formatted (``detail``) only when logged,
    so a flood of bad packages costs a counter each, not a string."""

    vmid: str
    reason: DropReason
    type: PackageType
    entity: int
    message_id: int
    #: STRAY_ACK: the ACK's id. WRONG_TYPE: the RouteKind bits the route takes.
    #: FOREIGN_ENTITY: 1 if the sender is a guest, 0 a host.
    arg: int = 0
    stream: int = 0

    @property
    def detail(self) -> str:
        """One line for the log."""
        what = f"{self.type.name} for {entity_label(self.entity)} message {self.message_id}"
        if self.stream:
            what += f" (stream {self.stream})"
        reason = self.reason
        if reason is DropReason.WRONG_TYPE:
            return f"{what}, whose route takes {kind_label(self.arg)}"
        if reason is DropReason.FOREIGN_ENTITY:
            side = Side.GUEST if self.arg else Side.HOST
            return f"{what}: {entity_label(self.entity)} is not an entity of a {side.value}"
        if reason is DropReason.STRAY_ACK:
            return f"{what}: its id {self.arg} answers no request"
        if reason is DropReason.NO_ROUTE:
            return f"{what}: no worker handles it"
        return f"{what} from a worker: unknown VM {self.vmid!r}"


@dataclass(frozen=True, slots=True)
class Hold:
    """A worker's package for a configured VM whose tunnel is down. The mux holds it while it
    connects on demand when ``may_wait`` (a REQUEST or MESSAGE) and its side allows, and
    fails it otherwise."""

    vmid: str
    identity: bytes
    header: bytes
    payload: Payload
    may_wait: bool


@dataclass(frozen=True, slots=True)
class WorkerJoined:
    """A new worker (or a new process of one) registered."""

    info: WorkerInfo


@dataclass(frozen=True, slots=True)
class WorkerGone:
    """A worker was forgotten (it stopped, died, went silent or was restarted)."""

    info: WorkerInfo
    why: str
    #: It said goodbye itself: worth an INFO line, not a warning.
    orderly: bool = False


Action = ToWorker | ToTunnel | AnswerError | Drop | Hold | WorkerJoined | WorkerGone

_MESSAGE_BIT = int(RouteKind.MESSAGE)
_REQUEST_BIT = int(RouteKind.REQUEST)
_MAY_WAIT = (PackageType.REQUEST, PackageType.MESSAGE)


class _Link:
    """What the switch keeps about one live tunnel: the ids it gives forwarded requests, and
    whether the peer speaks coded error ACKs."""

    __slots__ = ("_ids", "coded")

    def __init__(self, coded: bool) -> None:
        self._ids = itertools.count(1)
        #: Both HELLOs list ``error-codes``: ERROR ACKs cross as msgpack {code, reason}.
        self.coded = coded

    def next_id(self) -> int:
        """A fresh request id on this tunnel (1 .. 2**32-1; 0 is never used)."""
        return next(self._ids) & 0xFFFFFFFF or next(self._ids) & 0xFFFFFFFF


class Switch:
    """Routing for one mux: ``side`` is this end ("host" or "guest"), ``name`` its name in
    error texts, ``known_vms`` the vmids it may reach (a live view: the mux's peers)."""

    def __init__(self, side: str, name: str, known_vms: Container[str]) -> None:
        self.side = Side(side)
        self.peer_side = Side.GUEST if self.side is Side.HOST else Side.HOST
        self.name = name
        self.routes = RouteTable()
        self._known = known_vms
        self._up: dict[str, _Link] = {}
        #: Entity codes the peer never sends as.
        self._foreign = foreign_entities(self.peer_side.value)

    # -- tunnels ---------------------------------------------------------------------------
    def tunnel_up(self, vmid: str, *, coded_errors: bool = False) -> list[Action]:
        """A tunnel to ``vmid`` completed its handshake; ``coded_errors``: both HELLOs list
        the feature ``error-codes`` (else the peer is of 0.1.0: plain-text reasons)."""
        self._up[vmid] = _Link(coded_errors)
        return []

    def tunnel_down(self, vmid: str, reason: str) -> list[Action]:
        """The tunnel to ``vmid`` ended: every request still waiting for its ACK fails."""
        self._up.pop(vmid, None)
        lost = f"not connected: tunnel to {vmid} lost ({reason})"
        return [AnswerError(vmid, call.worker_call_id, 0, lost, call.identity,
                            code=ErrorCode.NOT_CONNECTED)
                for call in self.routes.pending_for_vm(vmid)]

    def is_up(self, vmid: str) -> bool:
        return vmid in self._up

    # -- tunnel -> workers -----------------------------------------------------------------
    def from_tunnel(self, vmid: str, pkg: Package) -> list[Action]:
        """A package from ``vmid``'s tunnel (not one of the tunnel's own messages)."""
        if pkg.entity in self._foreign:
            return self._refuse(vmid, pkg, DropReason.FOREIGN_ENTITY,
                                int(self.peer_side is Side.GUEST))
        ptype = pkg.type
        if ptype is PackageType.ACK:
            pending = self.routes.pop_pending(vmid, pkg.id)
            if pending is None:
                return [Drop(vmid, DropReason.STRAY_ACK, ptype, pkg.entity, pkg.message_id,
                             pkg.id, pkg.stream)]
            payload = pkg.payload
            if pkg.flags & PackageFlag.ERROR:
                link = self._up.get(vmid)
                if link is None or not link.coded:
                    # A peer of 0.1.0: its reason is plain text; workers read the coded form.
                    payload = ErrorReply.from_plain(payload).encode()
            header = encode_header(type=ptype, flags=pkg.flags, entity=pkg.entity,
                                   id=pending.worker_call_id, message_id=pkg.message_id,
                                   stream=pkg.stream, length=len(payload))
            return [ToWorker(pending.identity, vmid, header, payload)]
        routes = self.routes.destinations(pkg.entity, pkg.message_id)
        if not routes:
            return self._refuse(vmid, pkg, DropReason.NO_ROUTE)
        if ptype is PackageType.REQUEST:
            return self._request(vmid, pkg, routes)
        bit = KIND_OF_TYPE[ptype]
        header = pkg.header()
        out: list[Action] = [ToWorker(w.identity, vmid, header, pkg.payload)
                             for w, kind in routes if kind & bit]
        return out or self._wrong_type(vmid, pkg, routes)

    def _request(self, vmid: str, pkg: Package, routes: list[tuple[WorkerInfo, int]]
                 ) -> list[Action]:
        answering: WorkerInfo | None = None
        copies: list[WorkerInfo] = []
        for w, kind in routes:
            if answering is None and kind & _REQUEST_BIT:
                answering = w
            elif kind & _MESSAGE_BIT:
                copies.append(w)
        if answering is None:
            return self._wrong_type(vmid, pkg, routes)
        out: list[Action] = [ToWorker(answering.identity, vmid, pkg.header(), pkg.payload,
                                      retry=pkg)]
        if copies:
            # Only the first handler answers (one ACK per request); the others are handed
            # the same message as a one-way notification.
            header = encode_header(type=PackageType.MESSAGE, flags=pkg.flags,
                                   entity=pkg.entity, id=pkg.id, message_id=pkg.message_id,
                                   stream=pkg.stream, length=len(pkg.payload))
            out += [ToWorker(w.identity, vmid, header, pkg.payload) for w in copies]
        return out

    def _wrong_type(self, vmid: str, pkg: Package, routes: list[tuple[WorkerInfo, int]]
                    ) -> list[Action]:
        takes = 0
        for _w, kind in routes:
            takes |= kind
        return self._refuse(vmid, pkg, DropReason.WRONG_TYPE, takes)

    def _refuse(self, vmid: str, pkg: Package, reason: DropReason, arg: int = 0
                ) -> list[Action]:
        """Drop a peer's package; a REQUEST is answered at once with an ERROR ACK saying why,
        so its sender does not wait out its timeout."""
        drop = Drop(vmid, reason, pkg.type, pkg.entity, pkg.message_id, arg, pkg.stream)
        if pkg.type is not PackageType.REQUEST:
            return [drop]
        label = entity_label(pkg.entity)
        code = ErrorCode.PROTOCOL
        if reason is DropReason.NO_ROUTE:
            answer = f"no worker on {self.name} handles {label} message {pkg.message_id}"
            code = ErrorCode.NO_HANDLER
        elif reason is DropReason.WRONG_TYPE:
            answer = f"wrong package type for {label} message {pkg.message_id}"
        else:
            answer = f"{label} is not an entity of a {self.peer_side.value}"
        link = self._up.get(vmid)
        return [drop, AnswerError(vmid, pkg.id, pkg.message_id, answer, None, pkg.stream,
                                  code, plain=link is None or not link.coded)]

    def undeliverable(self, action: ToWorker) -> list[Action]:
        """The worker of ``action`` could not be reached: forget it, and route a request it
        was to answer again (the next handler answers, or the sender hears why not)."""
        out: list[Action] = []
        info = self.routes.by_identity(action.identity)
        if info is not None:
            out += self.worker_lost(info, "unreachable")
        if action.retry is not None:
            out += self.from_tunnel(action.vmid, action.retry)
        return out

    # -- workers -> tunnel -----------------------------------------------------------------
    def from_worker(self, identity: bytes, vmid: str, header: bytes,
                    payload: Payload) -> list[Action]:
        """A package a worker sends to ``vmid`` (raises ProtocolError on a bad header)."""
        h = decode_header(header, MAX_PAYLOAD_LIMIT)
        link = self._up.get(vmid)
        if link is None:
            if vmid in self._known:
                return [Hold(vmid, identity, header, payload, h.type in _MAY_WAIT)]
            reason = f"unknown VM {vmid!r}"
            if h.type is PackageType.REQUEST:
                return [AnswerError(vmid, h.id, h.message_id, reason, identity,
                                    code=ErrorCode.UNKNOWN_VM)]
            return [Drop(vmid, DropReason.UNKNOWN_VM, h.type, h.entity, h.message_id, 0,
                         h.stream)]
        if h.type is PackageType.REQUEST:
            # The tunnel's own id, so ACKs to requests of different workers cannot collide.
            tid = link.next_id()
            self.routes.add_pending(vmid, tid, identity, h.id)
            header = encode_header(type=h.type, flags=h.flags, entity=h.entity, id=tid,
                                   message_id=h.message_id, stream=h.stream, length=h.length)
        elif h.flags & PackageFlag.ERROR and h.type is PackageType.ACK and not link.coded:
            # A peer of 0.1.0 reads the reason alone, as text.
            payload = ErrorReply.read(payload).plain()
            header = encode_header(type=h.type, flags=h.flags, entity=h.entity, id=h.id,
                                   message_id=h.message_id, stream=h.stream,
                                   length=len(payload))
        return [ToTunnel(vmid, header, payload, h.type, h.entity, h.stream)]

    # -- worker registry -------------------------------------------------------------------
    def register(self, identity: bytes, body: dict[str, Any]) -> list[Action]:
        """A worker's REG (also its heartbeat); raises RemoteProtocolError if malformed."""
        info, previous = self.routes.register(identity, body)
        if previous is info:
            return []
        out: list[Action] = []
        if previous is not None:
            out += self._announce(previous, "restarted")
        out.append(WorkerJoined(info))
        return out

    def worker_lost(self, info: WorkerInfo, why: str, orderly: bool = False) -> list[Action]:
        """Forget a worker that died or stopped, and tell every peer its streams are gone."""
        self.routes.unregister(info.name)
        return self._announce(info, why, orderly)

    def _announce(self, info: WorkerInfo, why: str, orderly: bool = False) -> list[Action]:
        out: list[Action] = [WorkerGone(info, why, orderly)]
        if info.entities:
            lost = WorkerLost(list(info.entities)).package()
            header = lost.header()
            out += [ToTunnel(vmid, header, lost.payload, lost.type, lost.entity, lost.stream)
                    for vmid in self._up]
        return out

    def silent(self, max_age: float, now: float | None = None) -> list[Action]:
        """Forget every worker whose heartbeat stopped ``max_age`` seconds ago."""
        out: list[Action] = []
        for info in self.routes.silent(max_age, now):
            out += self.worker_lost(info, f"silent for {max_age:g}s")
        return out
