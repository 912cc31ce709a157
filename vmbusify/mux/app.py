"""The tunnel-mux process: tunnels on one side, worker processes (over ZeroMQ) on the other.

The mux never looks inside application payloads. It moves each package between a tunnel
and the workers that registered its (source entity, message id), rewrites request ids so
ACKs find the worker that asked, tells workers when tunnels come and go, and answers the
built-in control commands (status, connect, ...). It never relays between two VMs.

Every routing decision is the sans-I/O Switch's (vmbusify/mux/switch.py): MuxApp feeds it
what happened and executes the actions it returns.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
import uuid
from typing import Any

from vmbusify import __version__
from vmbusify.bus.frames import (
    BusMessage,
    CtlReply,
    CtlRequest,
    Evt,
    Frames,
    Pkg,
    PkgRef,
    Reg,
    RegOk,
    Release,
    Rereg,
    RouteKind,
    TunnelEvent,
    Unreg,
    from_worker,
)
from vmbusify.bus.lanes import (
    CONTROL_SUFFIX,
    Lane,
    LaneReceiver,
    LaneSender,
    Stamp,
)
from vmbusify.bus.link import REGISTER_INTERVAL
from vmbusify.bus.ring import Ring, RingLink
from vmbusify.bus.sockets import BusSocket, bus_directory, ensure_private_dir
from vmbusify.config import Config, Role
from vmbusify.errors import (
    BusError,
    ControlError,
    ErrorCode,
    ProtocolError,
    TunnelError,
    UnknownVMError,
    VMBusifyError,
)
from vmbusify.logs import RateLimitedLog, printable
from vmbusify.mux.addresses import AddressBook
from vmbusify.mux.peer import MAX_WAITING, Peer, PeerState
from vmbusify.mux.router import WorkerInfo, kind_label
from vmbusify.mux.switch import (
    Action,
    AnswerError,
    Drop,
    Hold,
    Switch,
    ToTunnel,
    ToWorker,
    WorkerGone,
    WorkerJoined,
)
from vmbusify.mux.tunnel import BacklogPool, Tunnel
from vmbusify.protocol.entities import entity_label
from vmbusify.protocol.package import (
    MAX_PAYLOAD_LIMIT,
    Header,
    Package,
    PackageFlag,
    PackageType,
    Payload,
    decode_header,
)
from vmbusify.protocol.tunnel import Feature, Hello, WorkerLost

log = logging.getLogger("vmbusify.mux")

#: A worker that missed this many seconds of heartbeats (REG) is taken for dead.
WORKER_SILENT_AFTER = 3 * REGISTER_INTERVAL
#: Seconds the rings of a worker forgotten without its goodbye stay mapped: one that was
#: only silent comes back with them (its REG offers the same ones, whose files are gone).
ORPHAN_RINGS_KEEP = 5 * WORKER_SILENT_AFTER


class _Detail:
    """A drop's detail, formatted when the log line is."""

    __slots__ = ("drop",)

    def __init__(self, drop: Drop) -> None:
        self.drop = drop

    def __str__(self) -> str:
        return self.drop.detail


class WorkerLanes:
    """The mux's end of one worker's two bus lanes (vmbusify.bus.lanes): the identity of its
    control DEALER, the numbering of what the mux sends it, the order of what it sent."""

    __slots__ = ("control", "heard", "identity", "receiver", "rings", "sender")

    def __init__(self, identity: bytes) -> None:
        self.identity = identity
        self.control = identity + CONTROL_SUFFIX
        self.sender = LaneSender()
        self.receiver: LaneReceiver[Frames] = LaneReceiver()
        #: The lanes the worker was heard on: their connections are up (ZeroMQ knows a
        #: DEALER's identity only once it connected, and a ROUTER send to an identity it
        #: does not know fails), so the mux sends only on these.
        self.heard: set[Lane] = set()
        #: The worker's shared-memory rings (vmbusify.bus.ring), mapped: this end writes
        #: the worker's ``rx`` and reads its ``tx``. None: it offered none.
        self.rings: RingLink | None = None

    def forget(self) -> None:
        """The worker is gone: its rings take no more references."""
        if self.rings is not None:
            self.rings.close()
            self.rings = None


class MuxApp:
    """The state shared by the host and guest sides of the mux."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.role = config.role
        self.name = config.name or socket.gethostname()
        self.mux_id = uuid.uuid4().hex
        self.started = time.time()
        self.peers: dict[str, Peer] = {}
        #: Who holds which address a VM claims (every lookup by IP goes through it).
        self.addresses = AddressBook.from_config(config)
        self._address_log = RateLimitedLog(log, config.limits.log_lines_per_minute)
        self.switch = Switch(self.role.value, self.name, self.peers)
        self.routes = self.switch.routes
        #: Drops a peer causes, logged at most log_lines_per_minute per VM and reason.
        self._drop_log = RateLimitedLog(log, config.limits.log_lines_per_minute)
        #: Control commands being answered (the loop holds only weak references to tasks).
        self._answers: set[asyncio.Task[None]] = set()
        #: What waits in every tunnel's send queue together.
        self.backlog = BacklogPool(config.limits.tunnel_backlog_total)
        self.side: Any = None  # HostSide or GuestSide, set by run_mux
        #: Other names of VMs (a libvirt domain's UUID) -> vmid (docs/discovery.md).
        self.aliases: dict[str, str] = {}
        #: Per worker name: the pid it last registered with, and how many times it came
        #: back with another (a restart; docs/metrics.md).
        self.worker_pids: dict[str, int] = {}
        self.worker_restarts: dict[str, int] = {}
        self._bus: BusSocket | None = None
        #: Workers that speak in two lanes, by their bulk identity (the switch's).
        self.lanes: dict[bytes, WorkerLanes] = {}
        #: Per tunnel, the ring buffer a payload is being received into (``_stage``).
        self._staged: dict[Tunnel, tuple[RingLink, memoryview]] = {}
        #: Rings of workers forgotten without a goodbye, and since when (ORPHAN_RINGS_KEEP).
        self._orphans: dict[bytes, tuple[RingLink, float]] = {}

    # -- bus -------------------------------------------------------------------------------
    def bind(self) -> None:
        """Bind the bus and start serving workers (call with the loop running)."""
        ensure_private_dir(self.config.run_dir)
        self._bus = BusSocket.router(self.config.bus_endpoint, self._on_bus)
        log.info("bus listening at %s", self.config.bus_endpoint)

    def close(self) -> None:
        if self._bus is not None:
            self._bus.close()  # and its ZeroMQ context
            self._bus = None

    def _send(self, identity: bytes, msg: BusMessage) -> None:
        """Send ``msg`` to a worker on its lane (a worker without lanes: as it is); raises
        BusError."""
        assert self._bus is not None
        lanes = self.lanes.get(identity)
        if lanes is None:
            self._bus.send_to(identity, msg)
            return
        rings = lanes.rings
        if (rings is not None and type(msg) is Pkg and Lane.BULK in lanes.heard
                and rings.takes(msg)):
            # A staged payload that goes elsewhere is sent inline (from_tunnel gives its
            # room back); one staged for another tunnel moves out of the ring's way.
            staged = rings.staged
            if staged is not None and staged is not msg.payload:
                self._demote(rings)
            msg = rings.referenced(msg)
        lane, frames = lanes.sender.frames(msg, lanes.heard)
        self._bus.send([lanes.control if lane is Lane.CONTROL else identity, *frames])

    def to_worker(self, identity: bytes, msg: BusMessage) -> bool:
        """Send to one worker without ever blocking; a vanished worker is unregistered."""
        try:
            self._send(identity, msg)
            return True
        except BusError as err:
            exc = err
        self._unreachable(identity, exc)
        info = self.routes.by_identity(identity)
        if info is not None:
            self.execute(self.switch.worker_lost(info, "unreachable"))
        return False

    def _unreachable(self, identity: bytes, exc: Exception) -> None:
        info = self.routes.by_identity(identity)
        name = info.name if info else identity.decode(errors="replace")
        log.warning("worker=%s unreachable (%s); unregistering it", name, exc)

    def broadcast(self, evt: Evt) -> None:
        """Tell every worker that a tunnel came up or went down, or a peer's worker went."""
        for w in self.routes.workers():
            self.to_worker(w.identity, evt)

    def _on_bus(self, frames: Frames) -> None:
        """One message from a worker (a big payload arrives as a view of the ZeroMQ frame
        and goes on to the tunnel as it is). A stamped one (vmbusify.bus.lanes) is taken
        in the order its worker's two lanes give; an unstamped one as it comes."""
        try:
            if len(frames) < 2:
                raise ProtocolError("bus message without an identity and a kind")
            identity = bytes(frames[0])
            if not Stamp.is_stamp(frames[1]):
                self._take(identity, frames[1:])
                return
            stamp = Stamp.parse(frames[1])
            if stamp.lane is Lane.CONTROL:
                if not identity.endswith(CONTROL_SUFFIX):
                    raise ProtocolError("a control stamp from a bulk identity")
                identity = identity[:-len(CONTROL_SUFFIX)]
        except ProtocolError as exc:
            log.warning("malformed bus message dropped: %s", exc)
            return
        lanes = self.lanes.get(identity)
        if lanes is None:
            lanes = self.lanes[identity] = WorkerLanes(identity)
            orphan = self._orphans.pop(identity, None)
            if orphan is not None:  # a worker that was forgotten, back with its rings
                lanes.rings = orphan[0]
        lanes.heard.add(stamp.lane)
        lanes.receiver.push(stamp, frames[2:], time.monotonic())
        self._drain(identity, lanes)

    def _drain(self, identity: bytes, lanes: WorkerLanes) -> None:
        """Handle what a worker's lanes let through, in their order."""
        while (msg := lanes.receiver.pop()) is not None:
            self._take(identity, msg)

    def _take(self, identity: bytes, frames: Frames) -> None:
        try:
            self._from_bus(identity, from_worker(frames))
        except ProtocolError as exc:
            log.warning("malformed bus message dropped: %s", exc)

    def _from_bus(self, identity: bytes, msg: BusMessage) -> None:
        if type(msg) is PkgRef:
            lanes = self.lanes.get(identity)
            if lanes is None or lanes.rings is None:
                raise ProtocolError("a PKR from a worker whose ring is not mapped")
            msg = Pkg(msg.vmid, msg.header, lanes.rings.resolve(msg.ref))
        if type(msg) is Pkg:
            if self.routes.by_identity(identity) is None:
                self.to_worker(identity, Rereg())
            self.from_worker(identity, msg.vmid, msg.header, msg.payload)
        elif type(msg) is Release:
            lanes = self.lanes.get(identity)
            if lanes is not None and lanes.rings is not None:
                lanes.rings.released(msg.ring, msg.upto)
        elif type(msg) is Reg:
            self.execute(self.switch.register(identity, msg.body()))
            ring = self._map_rings(identity, msg)
            self.to_worker(identity, RegOk(self.role.value, self.mux_id, ring,
                                           msg.ring["id"] if msg.ring else 0))
        elif type(msg) is CtlRequest:
            self._spawn_control(identity, msg)
        elif type(msg) is Unreg:
            stopping = self.routes.by_identity(identity)
            if stopping is not None:
                self.execute(self.switch.worker_lost(stopping, "stopped", orderly=True))

    def _map_rings(self, identity: bytes, reg: Reg) -> int:
        """Map the rings a laned worker's REG offers (once per ring id); the id mapped, for
        its REGOK (0: none, and payloads go inline both ways)."""
        offer, lanes = reg.ring, self.lanes.get(identity)
        if offer is None or lanes is None:
            return 0
        ring_id = offer["id"]
        if lanes.rings is not None and lanes.rings.id == ring_id:
            return ring_id
        lanes.forget()
        directory = bus_directory(self.config.bus_endpoint)
        prefix = f"ring.{reg.pid}."
        try:
            if directory is None:
                raise BusError("the bus is not a Unix socket: no directory for rings")
            if not (offer["tx"].startswith(prefix) and offer["rx"].startswith(prefix)):
                raise BusError("ring files not named for the worker's pid")
            theirs = Ring.open(directory, offer["tx"], offer["size"], ring_id)
            ours = Ring.open(directory, offer["rx"], offer["size"], ring_id)
        except BusError as exc:
            log.warning("worker=%s: its shared-memory ring not taken (payloads go inline): "
                        "%s", printable(reg.name), exc)
            return 0
        for ring in (theirs, ours):
            ring.unlink(directory)
        loop = asyncio.get_running_loop()
        rings = RingLink(ring_id, ours, theirs,
                         lambda rid, upto: self._send(identity, Release(rid, upto)),
                         loop.call_soon, loop.call_later)
        rings.tx_on = True
        lanes.rings = rings
        return ring_id

    def _spawn_control(self, identity: bytes, req: CtlRequest) -> None:
        async def answer() -> None:
            try:
                reply = CtlReply(req.call_id, True, await self.control(req.body()))
            except VMBusifyError as exc:
                reply = CtlReply.failure(req.call_id, exc)
            except Exception as exc:  # never let a control bug kill the mux
                log.exception("control command failed")
                reply = CtlReply(req.call_id, False, error=f"internal error: {exc}")
            self.to_worker(identity, reply)

        task = asyncio.ensure_future(answer())
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    # -- executing the switch's actions ----------------------------------------------------
    def execute(self, actions: list[Action]) -> None:
        """Carry out what the switch decided, in order."""
        for act in actions:
            if type(act) is ToWorker:
                if not self._deliver(act):
                    # Gone: forget it. A request it was to answer is routed again, and those
                    # actions replace the rest of this list (its copies, not yet sent).
                    self.execute(self.switch.undeliverable(act))
                    if act.retry is not None:
                        return
            elif type(act) is ToTunnel:
                peer = self.peers.get(act.vmid)
                if peer is not None and peer.tunnel is not None:
                    peer.tunnel.send_raw(act.header, act.payload, act.type, act.entity,
                                         act.stream)
            elif type(act) is Drop:
                self._dropped(act)
            elif type(act) is AnswerError:
                self._answer_error(act)
            elif type(act) is Hold:
                self._hold(act)
            elif type(act) is WorkerJoined:
                info = act.info
                last = self.worker_pids.get(info.name)
                if last is not None and last != info.pid:
                    self.worker_restarts[info.name] = self.worker_restarts.get(info.name, 0) + 1
                self.worker_pids[info.name] = info.pid
                log.info("worker=%s pid=%d registered: entities %s, routes %s", info.name,
                         info.pid, [entity_label(e) for e in info.entities],
                         [f"{entity_label(s)}:{m}/{kind_label(k)}" for s, m, k in info.routes])
            elif type(act) is WorkerGone:
                gone = self.lanes.pop(act.info.identity, None)
                if gone is not None:
                    self._let_go(gone, keep=not act.orderly)
                log.log(logging.INFO if act.orderly else logging.WARNING,
                        "worker=%s pid=%d %s; telling the peers its streams are gone",
                        act.info.name, act.info.pid, act.why)

    def _deliver(self, act: ToWorker) -> bool:
        """One package to one worker; False (and logged) if the worker is gone."""
        try:
            self._send(act.identity, Pkg(act.vmid, act.header, act.payload))
            return True
        except BusError as exc:
            self._unreachable(act.identity, exc)
            return False

    def _dropped(self, act: Drop) -> None:
        """Count a peer's dropped package (per VM and reason) and log it, rate-limited."""
        reason = act.reason
        if not reason.from_peer:
            log.debug("vm=%s: package from a worker dropped: %s", act.vmid, act.detail)
            return
        peer = self.peers.get(act.vmid)
        if peer is not None:
            peer.dropped[reason.value] = peer.dropped.get(reason.value, 0) + 1
        # The detail is formatted only if the line is written (most of a flood's are not).
        self._drop_log.warning((act.vmid, reason), "vm=%s: package dropped (%s): %s",
                               act.vmid, reason.value, _Detail(act))

    def _answer_error(self, act: AnswerError) -> None:
        if act.identity is None:
            peer = self.peers.get(act.vmid)
            if peer is not None and peer.tunnel is not None:
                peer.tunnel.send_package(act.package())
            return
        self.to_worker(act.identity, Pkg.of(act.vmid, act.package()))

    def _hold(self, act: Hold) -> None:
        """A worker's package for a VM that is not connected: wait for a connect on demand
        where that is allowed, else fail it now."""
        peer = self.peers[act.vmid]
        if act.may_wait and self.side.can_wait(peer) and len(peer.waiting) < MAX_WAITING:
            peer.waiting.append((act.header, act.payload, act.identity))
            self.side.connect_on_demand(peer)
            return
        h = decode_header(act.header, MAX_PAYLOAD_LIMIT)
        self._fail(act.identity, act.vmid, h.type, h.id, h.message_id,
                   f"not connected: {act.vmid} is {peer.state.value}"
                   + (f" ({peer.last_error})" if peer.last_error else ""),
                   ErrorCode.NOT_CONNECTED)

    # -- worker -> tunnel ------------------------------------------------------------------
    def from_worker(self, identity: bytes, vmid: str, header: bytes,
                    payload: Payload) -> None:
        """Forward a worker's package to the tunnel of ``vmid``."""
        self.execute(self.switch.from_worker(identity, vmid, header, payload))

    def _fail(self, identity: bytes, vmid: str, ptype: PackageType, call_id: int,
              message_id: int, reason: str, code: ErrorCode) -> None:
        """Answer a worker's REQUEST with an error ACK; other kinds are dropped with a log."""
        if ptype is not PackageType.REQUEST:
            log.debug("vm=%s: %s package dropped: %s", vmid, ptype.name, reason)
            return
        self._answer_error(AnswerError(vmid, call_id, message_id, reason, identity,
                                       code=code))

    # -- tunnel -> workers -----------------------------------------------------------------
    def from_tunnel(self, peer: Peer, tunnel: Tunnel, pkg: Package) -> None:
        """Route a package from a tunnel to the workers that asked for it."""
        self.execute(self.switch.from_tunnel(peer.vmid, pkg))
        staged = self._staged.pop(tunnel, None)
        if staged is not None and staged[1] is pkg.payload:
            staged[0].unstage(staged[1])  # not placed (routed elsewhere, dropped): room back
        elif staged is not None:
            self._staged[tunnel] = staged

    def _stage(self, tunnel: Tunnel, header: Header) -> memoryview | None:
        """Where a large payload from ``tunnel`` is received: the ring of the one worker a
        DATA package of ``header`` goes to (its bytes then go on uncopied), or None."""
        if header.type is not PackageType.DATA or header.flags & PackageFlag.RESET:
            return None  # not a bulk-lane package (_send)
        routes = self.routes.destinations(header.entity, header.message_id)
        if len(routes) != 1 or not routes[0][1] & RouteKind.STREAM:
            return None
        lanes = self.lanes.get(routes[0][0].identity)
        if lanes is None or lanes.rings is None:
            return None
        if lanes.rings.staged is not None:
            self._demote(lanes.rings)
        view = lanes.rings.stage(header.length)
        if view is not None:
            self._staged[tunnel] = (lanes.rings, view)
        return view

    def _let_go(self, lanes: WorkerLanes, keep: bool) -> None:
        """A worker's lanes are forgotten: its rings too, or (``keep``: it left without a
        goodbye, and may only have been silent) kept for ORPHAN_RINGS_KEEP seconds."""
        if keep and lanes.rings is not None:
            self._orphans[lanes.identity] = (lanes.rings, time.monotonic())
            lanes.rings = None
        lanes.forget()

    def _demote(self, rings: RingLink) -> None:
        """Another payload is due in ``rings`` while one is still being received into it
        (a tunnel's peer that sends slowly, or stopped mid-payload: on the host, a guest):
        that one goes on in a ZeroMQ frame and gives its room back, so that no peer holds a
        worker's ring for the others. One received whole but not yet handed on stays (it is
        handed on at the loop's next turn); what is due meanwhile goes inline."""
        for tunnel, (owner, view) in list(self._staged.items()):
            if owner is rings and tunnel.move_payload(view):
                del self._staged[tunnel]
                rings.unstage(view)
                return

    def _unstage(self, tunnel: Tunnel) -> None:
        """The tunnel ended: a payload it was receiving into a ring gives its room back."""
        staged = self._staged.pop(tunnel, None)
        if staged is not None:
            staged[0].unstage(staged[1])

    # -- tunnel life -----------------------------------------------------------------------
    def local_hello(self) -> Hello:
        return Hello(role=self.role.value, hostname=self.name, software_version=__version__,
                     ips=self.side.local_ips() if self.side else [])

    def attach(self, peer: Peer, tunnel: Tunnel) -> None:
        """A tunnel to ``peer`` completed its handshake."""
        self._arm(peer, tunnel)
        peer.tunnel = tunnel
        peer.connects += 1
        others = self._claim(peer, tunnel.peer_hello.ips if tunnel.peer_hello else [])
        tunnel.on_hello = lambda t, hello: self._on_hello(peer, hello)
        tunnel.on_worker_lost = lambda t, lost: self._on_worker_lost(peer, lost)
        peer.set_state(PeerState.CONNECTED)
        peer.last_error = ""
        hello = tunnel.peer_hello
        log.info("vm=%s connected via %s (peer %s, version %s, ips %s)", peer.vmid,
                 peer.address, hello.hostname if hello else "?",
                 hello.software_version if hello else "?", ", ".join(peer.ips) or "none")
        self.broadcast(Evt(TunnelEvent.UP, peer.vmid, ips=list(peer.ips)))
        self._announce_holdings(others)
        waiting, peer.waiting = peer.waiting, []
        for header, payload, identity in waiting:
            self.from_worker(identity, peer.vmid, header, payload)

    def _arm(self, peer: Peer, tunnel: Tunnel) -> None:
        """Give a new tunnel its limits and the switch its VM (before any package flows)."""
        tunnel.stage = lambda header: self._stage(tunnel, header)
        limits = self.config.limits
        tunnel.read_budget = max(1, limits.read_budget)
        tunnel.backlog_limit = limits.tunnel_backlog
        if not tunnel.closed.is_set():
            self.backlog.join(tunnel)
        hello = tunnel.peer_hello
        coded = hello is not None and hello.has(Feature.ERROR_CODES)
        self.execute(self.switch.tunnel_up(peer.vmid, coded_errors=coded))

    def _on_hello(self, peer: Peer, hello: Hello) -> None:
        others = self._claim(peer, hello.ips)
        self.broadcast(Evt(TunnelEvent.UP, peer.vmid, ips=list(peer.ips)))
        self._announce_holdings(others)

    def _claim(self, peer: Peer, ips: list[str]) -> set[str]:
        """Record the addresses ``peer`` claims (its whole list, from a HELLO); the other
        vmids whose held addresses changed because of it are returned."""
        changed = self.addresses.claim(peer.vmid, ips)
        self._sync_addresses(changed | {peer.vmid})
        if peer.ips_refused:
            refused = ", ".join(f"{r['ip']} ({r['reason']})" for r in peer.ips_refused)
            self._address_log.warning((peer.vmid, "address"), "vm=%s: claimed addresses not "
                                      "held: %s", peer.vmid, printable(refused, 600))
        return changed - {peer.vmid}

    def _sync_addresses(self, vmids: set[str]) -> None:
        """Copy the book's view of ``vmids`` into their peers (status, list, UP events)."""
        for vmid in vmids:
            p = self.peers.get(vmid)
            if p is not None:
                st = self.addresses.status(vmid)
                p.ips, p.ips_refused = st["ips"], st["ips_refused"]

    def _announce_holdings(self, vmids: set[str]) -> None:
        """Tell the workers again about connected VMs whose held addresses changed (a
        conflict another VM caused, or resolved): UP carries only held addresses."""
        for vmid in sorted(vmids):
            p = self.peers.get(vmid)
            if p is not None and p.tunnel is not None:
                # Rate-limited: another (hostile) VM's HELLOs can toggle this.
                self._address_log.log(logging.INFO, (vmid, "held"), "vm=%s: addresses held "
                                      "now %s", vmid, ", ".join(p.ips) or "none")
                self.broadcast(Evt(TunnelEvent.UP, vmid, ips=list(p.ips)))

    def detach(self, peer: Peer, tunnel: Tunnel, reason: str) -> None:
        """The tunnel to ``peer`` ended."""
        self._unstage(tunnel)
        if peer.tunnel is not tunnel:
            return
        peer.add_tunnel_counters(tunnel)
        peer.tunnel = None
        peer.set_state(PeerState.DISCONNECTED, reason)
        changed = self.addresses.release(peer.vmid)  # its claims go with it
        self._sync_addresses(changed | {peer.vmid})
        log.warning("vm=%s disconnected: %s", peer.vmid, reason)
        self.execute(self.switch.tunnel_down(peer.vmid, reason))
        self.broadcast(Evt(TunnelEvent.DOWN, peer.vmid, reason=reason))
        self._announce_holdings(changed - {peer.vmid})

    def fail_waiting(self, peer: Peer, reason: str) -> None:
        """Connecting on demand failed: answer every held request."""
        waiting, peer.waiting = peer.waiting, []
        for header, _payload, identity in waiting:
            h = decode_header(header, MAX_PAYLOAD_LIMIT)
            self._fail(identity, peer.vmid, h.type, h.id, h.message_id,
                       f"not connected: {peer.vmid}: {reason}", ErrorCode.NOT_CONNECTED)

    # -- built-in commands -----------------------------------------------------------------
    def peer(self, vmid: str) -> Peer:
        """The peer with this vmid (or, on the host, an address it holds)."""
        p = self.peers.get(vmid) or self.peers.get(self.aliases.get(vmid.lower(), ""))
        if p is not None:
            return p
        try:
            ipaddress.ip_address(vmid.split("%", 1)[0])
        except ValueError:
            raise UnknownVMError(f"unknown VM {vmid!r}: neither a configured vmid nor an "
                                 "address a VM holds") from None
        owner = self.vmid_by_ip(vmid)  # UnknownVMError naming a conflict or refusal
        p = self.peers.get(owner)
        if p is None:
            raise UnknownVMError(f"unknown VM {owner!r} (holding {vmid})")
        return p

    def vmid_by_ip(self, ip: str) -> str:
        """The vmid holding ``ip`` (docs/proxy.md, "Who holds an address"): claimed in
        its HELLO, allowed by the configuration, claimed by no other VM. UnknownVMError
        (naming the conflict or refusal) otherwise: never a guess."""
        return self.addresses.owner(ip)

    def status(self) -> dict[str, Any]:
        return {
            "role": self.role.value,
            "name": self.name,
            "version": __version__,
            "pid": os.getpid(),
            "mux_id": self.mux_id,
            "started": self.started,
            "vms": [p.status() for p in self.peers.values()],
            "workers": [self._describe(w) for w in self.routes.workers()],
            "worker_restarts": dict(self.worker_restarts),
        }

    def _describe(self, worker: WorkerInfo) -> dict[str, Any]:
        """A worker in the status: what it registered, and its rings as this mux sees them
        (``ring``: payloads sent to it through its ring and inline for want of room, bytes
        it sent through its ring, its RLS messages for the ring this mux writes; absent:
        it has none)."""
        out = worker.describe()
        lanes = self.lanes.get(worker.identity)
        rings = lanes.rings if lanes is not None else None
        if rings is not None:
            out["ring"] = {"size": rings.tx.size, "placed": rings.placed,
                           "inline": rings.inline, "received": rings.take.consumed,
                           "trims": rings.trims, "releases": rings.releases}
        return out

    async def control(self, req: dict[str, Any]) -> Any:
        """Answer one built-in command from vmbusifyctl (through the command listener)."""
        cmd = req.get("cmd")
        if cmd == "status":
            return self.status()
        if cmd == "list":
            return [{"vmid": p.vmid, "state": p.state.value, "ips": p.ips}
                    for p in self.peers.values()]
        if cmd == "report":
            worker = self.routes.by_name(str(req.get("worker", "")))
            stats = req.get("stats")
            if worker is None or not isinstance(stats, dict):
                raise VMBusifyError("report from an unregistered worker, or without stats")
            worker.stats = stats
            return None
        if cmd == "vmid":
            ip = str(req.get("ip", ""))
            if ip.lower() in self.aliases:
                return self.aliases[ip.lower()]
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ControlError(f"not an IP address: {ip!r}") from None
            return self.vmid_by_ip(ip)
        if cmd == "ping":
            p = self.peer(str(req.get("vmid", "")))
            if p.tunnel is None:
                raise TunnelError(f"{p.vmid} is {p.state.value}"
                                  + (f": {p.last_error}" if p.last_error else ""))
            rtt = await p.tunnel.ping(float(req.get("timeout", 5.0)))
            return {"vmid": p.vmid, "rtt_ms": round(rtt, 3)}
        if cmd == "reload":
            if self.role is not Role.HOST:
                raise ControlError("reload is a host command: a guest serves one host")
            return await self.side.reload()
        if cmd in ("connect", "disconnect"):
            if self.role is not Role.HOST:
                raise TunnelError(f"{cmd} is a host command; the guest waits for its host")
            p = self.peer(str(req.get("vmid", "")))
            if cmd == "connect":
                await self.side.connect(p, float(req.get("timeout", 10.0)))
            else:
                await self.side.disconnect(p)
            return p.status()
        raise VMBusifyError(f"unknown command {cmd!r}")

    def worker_lost(self, info: WorkerInfo, why: str, orderly: bool = False) -> None:
        """Forget a worker that died or stopped, and tell the far side its streams are gone."""
        self.execute(self.switch.worker_lost(info, why, orderly))

    def _on_worker_lost(self, peer: Peer, lost: WorkerLost) -> None:
        log.info("vm=%s: a worker of the peer (%s) went away", peer.vmid,
                 ", ".join(entity_label(e) for e in lost.entities))
        self.broadcast(Evt(TunnelEvent.PEER_LOST, peer.vmid, entities=list(lost.entities)))

    def _tend_lanes(self) -> None:
        """Forget the lanes of identities that are no worker (gone, never registered), and
        let go of a message that waits for one that is not coming (a worker that was
        there before this mux numbers from where it was)."""
        now = time.monotonic()
        for identity, lanes in list(self.lanes.items()):
            if self.routes.by_identity(identity) is None and not len(lanes.receiver):
                del self.lanes[identity]
                self._let_go(lanes, keep=True)
            elif lanes.receiver.expire(now):
                log.warning("worker identity %s: bus messages taken without the message of "
                            "the other lane they waited for", printable(identity.decode(
                                errors="replace")))
                self._drain(identity, lanes)

    def _expire_orphans(self, now: float) -> None:
        """Unmap the rings of forgotten workers that did not come back."""
        for identity, (rings, since) in list(self._orphans.items()):
            if now - since >= ORPHAN_RINGS_KEEP:
                del self._orphans[identity]
                rings.close()

    async def housekeeping(self) -> None:
        """Periodic clean-up: silent workers, stale pending requests."""
        ticks = 0
        while True:
            await asyncio.sleep(REGISTER_INTERVAL)
            self.execute(self.switch.silent(WORKER_SILENT_AFTER))
            self._tend_lanes()
            self._expire_orphans(time.monotonic())
            ticks += 1
            if ticks % 15 == 0:
                n = self.routes.expire()
                if n:
                    log.info("forgot %d requests that never got an ACK", n)
