"""WorkerLink: what a worker process uses to reach the tunnel (docs/protocol.md, "The bus").

A worker declares its entities and the (source entity, message id) pairs it handles, each
with the kind of package it takes, then uses ``sync_send`` / ``async_send`` with
message dataclasses (vmbusify.protocol.message: each carries its entity and id). On
the host every call takes the target vmid; on a guest the only peer is ``HOST_VMID``.
Handlers learn which VM a message came from.

    link = WorkerLink(config, "proxy", [Entity.PROXY_SERVER])
    link.route(Entity.PROXY_CLIENT, ProxyMessage.OPEN, on_open, RouteKind.REQUEST)
    link.route(Entity.PROXY_CLIENT, ProxyMessage.DATA, None, RouteKind.STREAM)
    await link.start()
    ack = await link.sync_send(vmid, ProxyOpen(host, port), OpenAck, stream=s.id)

The peer is not trusted (root in a guest is hostile), so the receive loop:

- drops a package whose type does not fit its route's kind (a REQUEST gets an ERROR ACK at
  once, "wrong package type"), counted and logged a few lines a minute at most;
- runs REQUEST handlers in a task of their own (at most ``[limits] requests_per_vm`` per
  VM, their payloads charged to the VM's unread bytes, ``buffered_per_vm``; past either the
  request is refused at once), in registration order; the first handler's
  return value is the ACK's payload (a VMBusifyError raised becomes an ERROR ACK carrying its
  ErrorCode and text, docs/protocol.md "Error codes");
- runs MESSAGE handlers inline, in order of arrival: they must never wait on anything a
  peer controls (start a task with ``link.spawn`` for that);
- survives any exception from a handler or a malformed message: logged, counted, the
  stream the package belonged to reset;
- hands DATA and WINDOW packages to ``link.streams``, which bounds what each VM may hold.

The link speaks to the mux on two lanes (vmbusify.bus.lanes: stream bytes on one, all else
on the other, taken first; each stream keeps its order).

The heartbeat (REG every 2 s) goes out only while the loop makes progress: a loop that has
work waiting and finishes nothing for STALL_AFTER seconds stops it and the process exits
non-zero, so supervisord restarts it. The counters per VM go into the worker's stats as
``stats["limits"][vmid]`` (see ``report``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from vmbusify.bus.budget import Budget, Counter, VMShare
from vmbusify.bus.frames import (
    HOST_VMID,
    KIND_OF_TYPE,
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
    from_mux,
    vmid_of,
)
from vmbusify.bus.lanes import Lane, LaneReceiver, split_stamp
from vmbusify.bus.ring import ring_size_from_env
from vmbusify.bus.sockets import LanedDealer
from vmbusify.bus.streams import Stream, StreamTable
from vmbusify.config import Config, Role
from vmbusify.errors import (
    BusError,
    ErrorCode,
    LocalProtocolError,
    NotConnectedError,
    ProtocolError,
    RemoteProtocolError,
    RequestTimeout,
    TunnelError,
    VMBusifyError,
    error_from,
)
from vmbusify.logs import RateLimitedLog, printable
from vmbusify.protocol.entities import entity_label
from vmbusify.protocol.message import Message
from vmbusify.protocol.package import ErrorReply, Package, PackageFlag, PackageType
from vmbusify.protocol.serialize import dumps, loads
from vmbusify.runtime import UsesLoop

log = logging.getLogger(__name__)

#: Seconds between registrations; they double as the worker's heartbeat to the mux.
REGISTER_INTERVAL = 2.0
DEFAULT_TIMEOUT = 10.0
#: How long a closing worker's goodbye may take to reach the mux.
UNREG_LINGER_MS = 200
#: Seconds the receive loop may have messages waiting and finish none before the worker
#: counts as stuck (a handler waits on something that never comes): it stops its heartbeat
#: and exits with STALL_EXIT_CODE so supervisord restarts it. Five heartbeats: far above
#: any honest message (a handler runs in microseconds to milliseconds; the slow ones run in
#: tasks), and well below what an operator would call an outage. Checked at each heartbeat,
#: so a stall is seen after 10 to 12 s.
STALL_AFTER = 10.0
#: Exit status of a worker whose receive loop stalled (EX_SOFTWARE): not 0, so supervisord's
#: ``autorestart=unexpected`` (conf/programs/*.conf) restarts it.
STALL_EXIT_CODE = 70
#: Set to "0" in a worker's environment to run it in one lane, as before the bus had two
#: (docs/protocol.md, "The bus: two lanes"): for comparisons only (bench/exec.py --ab).
LANES_ENV = "VMBUSIFY_BUS_LANES"
#: The longest error text sent in an ERROR ACK (characters).
MAX_ERROR_TEXT = 2000


@dataclass(frozen=True, slots=True)
class Inbound:
    """An application message delivered to a handler."""

    vmid: str
    source: int
    message_id: int
    type: PackageType
    id: int
    stream: int
    body: Any
    package: Package


#: The reply type a sync_send decodes its ACK as.
M = TypeVar("M", bound=Message)
Handler = Callable[[Inbound], Awaitable[Any]]
EventHandler = Callable[[TunnelEvent, str, dict[str, Any]], Awaitable[None]]
#: What a stalled link does (given the reason); the default exits the process.
StallAction = Callable[[str], None]


def reply_error(reply: ErrorReply) -> TunnelError:
    """The error a sync_send raises for an ERROR ACK: the class of its code where that is a
    TunnelError (UnknownVMError, NotConnectedError, RequestTimeout, NoHandlerError, ...),
    else a TunnelError (the request failed over there) carrying the code. The text is the
    peer's: escaped, since it may be a guest's."""
    exc = error_from(reply.code, printable(reply.reason, MAX_ERROR_TEXT))
    if isinstance(exc, TunnelError):
        return exc
    failed = TunnelError(str(exc))
    failed.code = reply.code
    return failed


def _where(exc: BaseException) -> str:
    """Where an unexpected exception was raised (file:line in function), for one log line."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno} in {f.name}"


def _expire(fut: asyncio.Future[Any]) -> None:
    """A request's time is up: its waiter raises TimeoutError."""
    if not fut.done():
        fut.set_exception(TimeoutError())


class WorkerLink(UsesLoop):
    """One worker's connection to its endpoint's mux."""

    def __init__(self, config: Config, name: str, entities: list[int], *,
                 stall_after: float = STALL_AFTER, on_stall: StallAction | None = None
                 ) -> None:
        self.config = config
        self.name = name
        self.entities = list(entities)
        self.role: Role = config.role
        self.mux_id = ""
        self.registered = asyncio.Event()
        self.streams = StreamTable(self._send_package, config.limits,
                                   send_now=self._send_package_now, buffer=self._ring_buffer,
                                   unbuffer=self._ring_unbuffer)
        self.budget: Budget = self.streams.budget
        #: (source entity, message id) -> kind -> handlers in registration order.
        self._routes: dict[tuple[int, int], dict[RouteKind, list[Handler | None]]] = {}
        self._event_handlers: list[EventHandler] = []
        self._bus: LanedDealer | None = None
        # Messages from the mux, on two lanes (vmbusify.bus.lanes), handled by one task
        # (handlers may await) in the order the receiver gives: control first, each
        # stream in the order it was sent.
        self._inbox: LaneReceiver[Frames] = LaneReceiver()
        self._inbox_ready = asyncio.Event()
        self._calls: dict[int, asyncio.Future[Package]] = {}
        self._ctl: dict[bytes, asyncio.Future[CtlReply]] = {}
        self._next_call = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._warn = RateLimitedLog(log, config.limits.log_lines_per_minute)
        # Liveness: messages finished, whether one is being handled, and since when the
        # loop has had work and finished none (see _stalled_for).
        self._done = 0
        self._busy = False
        self._seen_done = 0
        self._stuck_since = time.monotonic()
        self.stall_after = stall_after
        self._on_stall = on_stall or self._exit_stalled
        #: Set once the loop was found stuck (the heartbeat has stopped).
        self.stalled = False
        # The worker's last published stats, and the limit counters the mux last took.
        self._last_stats: dict[str, Any] = {}
        self._limits_sent: dict[str, dict[str, int]] = {}
        # The mux's connection was lost (its process went away) and no REGOK has come since;
        # set when the connection is made again: register then, not at the next heartbeat.
        self._mux_gone = False
        self._reconnected = asyncio.Event()

    # -- set-up ----------------------------------------------------------------------------
    def route(self, source: int, message_id: int, handler: Handler | None,
              kind: RouteKind) -> None:
        """Receive ``message_id`` from entity ``source`` as packages of ``kind``: MESSAGE or
        REQUEST with a handler, STREAM (DATA and WINDOW, for ``link.streams``) with None."""
        kind = RouteKind(kind)
        if kind is RouteKind.STREAM and handler is not None:
            raise LocalProtocolError("a STREAM route takes no handler (see link.streams)")
        if kind is not RouteKind.STREAM and handler is None:
            raise LocalProtocolError(f"a {kind.name} route needs a handler")
        kinds = self._routes.setdefault((int(source), int(message_id)), {})
        kinds.setdefault(kind, []).append(handler)

    def routes(self) -> list[list[int]]:
        """The REG body's routes: ``[[source entity, message id, RouteKind bits], ...]``, one
        per pair (the kinds of a pair routed more than once ORed together)."""
        out = []
        for (source, message_id), kinds in self._routes.items():
            bits = 0
            for k in kinds:
                bits |= k
            out.append([source, message_id, bits])
        return out

    def on_event(self, handler: EventHandler) -> None:
        """Be told when a tunnel comes up or goes down: handler(event, vmid, info).
        Runs inline in the receive loop: it must not wait."""
        self._event_handlers.append(handler)

    async def start(self, wait: float | None = 30.0) -> None:
        """Connect to the mux, register, and start receiving. Waits for the first REGOK."""
        self._bus = LanedDealer(self.config.bus_endpoint, self.name, self._on_lane,
                                lanes=os.environ.get(LANES_ENV) != "0", on_peer=self._on_peer,
                                ring_size=ring_size_from_env())
        self._spawn(self._receive_loop())
        self._spawn(self._register_loop())
        if wait:
            try:
                await asyncio.wait_for(self.registered.wait(), wait)
            except TimeoutError:
                raise TunnelError(f"no answer from the mux at {self.config.bus_endpoint}") from None

    async def close(self) -> None:
        """Say goodbye to the mux (it forgets this worker at once and tells the far side,
        instead of noticing the silence seconds later), stop receiving, close the socket."""
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._say_goodbye()

    def _say_goodbye(self) -> None:
        if self._bus is None:
            return
        linger = 0
        if self.registered.is_set():
            try:
                self._bus.send_message(Unreg())
                linger = UNREG_LINGER_MS
            except BusError:
                pass  # the mux is gone: nothing to tell
        self._bus.close(linger)
        self._bus = None

    # -- tasks -----------------------------------------------------------------------------
    def spawn(self, coro: Awaitable[Any], vmid: str = "", what: str = "task") -> asyncio.Task[Any]:
        """Run ``coro`` in a task the link holds: its failure is logged and counted (as a
        handler error of ``vmid``), never fatal. For what a MESSAGE handler must not wait on."""
        # The loop's own create_task: ensure_future looks the loop up (a getpid) each time.
        task = (self.loop.create_task(coro) if asyncio.iscoroutine(coro)
                else asyncio.ensure_future(coro))
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(t, vmid, what))
        return task

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        return self.spawn(coro)

    def _task_done(self, task: asyncio.Task[Any], vmid: str, what: str) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        if vmid:
            self.budget.count(vmid, Counter.HANDLER_ERRORS)
        self._warn.log(logging.ERROR, (vmid, "task"), "worker=%s vm=%s: %s failed: %s: %s%s",
                       self.name, vmid or "-", what, type(exc).__name__,
                       printable(exc), _where(exc))

    # -- heartbeat and liveness ------------------------------------------------------------
    async def _register_loop(self) -> None:
        first = True
        while True:
            stuck = self._stalled_for(time.monotonic())
            if stuck:
                self._stall(stuck)
                return
            try:
                await self._register(both_lanes=first or not self.registered.is_set())
                first = False
            except TunnelError as exc:
                self._warn.warning(("mux", "reg"), "worker=%s: %s", self.name, exc)
            self._report_limits()
            self._expire_holds()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reconnected.wait(), REGISTER_INTERVAL)
            if self._reconnected.is_set():  # a new mux: both lanes, now
                self._reconnected.clear()
                first = True

    def _expire_holds(self) -> None:
        """Let go of a message that waits for one of the other lane that is not coming (the
        mux restarted and it went to the old one): logged, never a silent wait."""
        n = self._inbox.expire(time.monotonic())
        if n:
            self._inbox_ready.set()
            self._warn.warning(("mux", "lanes"), "worker=%s: %d bus messages taken without "
                               "the message of the other lane they waited for", self.name, n)

    def _stalled_for(self, now: float) -> float:
        """Seconds the receive loop has had work and finished none (0: it is fine)."""
        if not (self._busy or len(self._inbox)) or self._done != self._seen_done:
            self._seen_done = self._done
            self._stuck_since = now
            return 0.0
        stuck = now - self._stuck_since
        return stuck if stuck >= self.stall_after else 0.0

    def _stall(self, seconds: float) -> None:
        self.stalled = True
        reason = (f"worker={self.name}: the receive loop has finished no message for "
                  f"{seconds:.0f}s with {len(self._inbox)} waiting (a handler is stuck); "
                  "heartbeat stopped")
        log.error("%s", reason)
        self._on_stall(reason)

    def _exit_stalled(self, reason: str) -> None:
        """The default stall action: tell the mux at once, then exit non-zero (the loop is
        stuck, so an orderly stop might hang too); supervisord starts a fresh process."""
        log.error("worker=%s: exiting with status %d so that it is restarted", self.name,
                  STALL_EXIT_CODE)
        try:
            self._say_goodbye()
        finally:
            logging.shutdown()
            os._exit(STALL_EXIT_CODE)

    async def _register(self, both_lanes: bool = False) -> None:
        """Send REG (the heartbeat, on the control lane). ``both_lanes``: on the bulk lane
        too, so that the mux knows both connections are up before it sends on either (it
        sends only on a lane it has heard from)."""
        bus = self._bus
        reg = Reg(name=self.name, pid=os.getpid(), entities=[int(e) for e in self.entities],
                  routes=self.routes(), since=bus.since if bus is not None else 0,
                  ring=bus.ring_offer() if bus is not None else None)
        if both_lanes and self._bus is not None and self._bus.laned:
            try:
                self._bus.send_message(reg, Lane.BULK)
            except BusError as exc:
                raise TunnelError(f"cannot reach the mux: {exc}") from None
        await self._send(reg)

    # -- sending ---------------------------------------------------------------------------
    def _target(self, vmid: str | None) -> str:
        if self.role is Role.GUEST:
            return HOST_VMID
        if not vmid:
            raise TunnelError("the host must name the target vmid")
        return vmid

    def _send_now(self, msg: BusMessage) -> None:
        """Hand ``msg`` to ZeroMQ (never waits); raises TunnelError."""
        if self._bus is None:
            raise TunnelError("the link to the mux is closed")
        try:
            self._bus.send_message(msg)
        except BusError as exc:  # high-water marks are off: not expected
            raise TunnelError(f"cannot reach the mux: {exc}") from None

    async def _send(self, msg: BusMessage) -> None:
        self._send_now(msg)

    def _ring_buffer(self, n: int) -> memoryview | None:
        return self._bus.ring_buffer(n) if self._bus is not None else None

    def _ring_unbuffer(self, view: memoryview) -> None:
        if self._bus is not None:
            self._bus.ring_unbuffer(view)

    def _send_package_now(self, vmid: str, pkg: Package) -> None:
        self._send_now(Pkg.of(vmid, pkg))

    async def _send_package(self, vmid: str, pkg: Package) -> None:
        await self._send(Pkg.of(vmid, pkg))

    async def async_send(self, vmid: str | None, msg: Message, stream: int = 0) -> None:
        """Send a one-way message as its entity and message id; returns once it is handed to
        the mux."""
        await self.send_body(vmid, msg.ENTITY, msg.MESSAGE_ID, msg.to_body(), stream)

    @overload
    async def sync_send(self, vmid: str | None, msg: Message, reply: type[M], *,
                        stream: int = 0, timeout: float = DEFAULT_TIMEOUT) -> M: ...

    @overload
    async def sync_send(self, vmid: str | None, msg: Message, reply: None = None, *,
                        stream: int = 0, timeout: float = DEFAULT_TIMEOUT) -> None: ...

    async def sync_send(self, vmid: str | None, msg: Message, reply: type[M] | None = None, *,
                        stream: int = 0, timeout: float = DEFAULT_TIMEOUT) -> M | None:
        """Send a request and wait for its ACK; the reply decoded strictly as
        ``reply`` (RemoteProtocolError if it does not fit), or None when ``reply`` is None.

        ``stream``: the stream the request announces (its id goes in the package header).
        Raises as ``request_body`` does.
        """
        body = await self.request_body(vmid, msg.ENTITY, msg.MESSAGE_ID, msg.to_body(),
                                       stream=stream, timeout=timeout)
        return None if reply is None else reply.from_body(body)

    async def send_body(self, vmid: str | None, entity: int, message_id: int, body: Any,
                        stream: int = 0) -> None:
        """``async_send`` of any msgpack-able ``body`` (untyped: for tests and tools that probe
        the bus; a worker sends ``Message`` dataclasses with ``async_send``)."""
        pkg = Package(type=PackageType.MESSAGE, entity=int(entity), message_id=int(message_id),
                      stream=stream, payload=dumps(body))
        await self._send_package(self._target(vmid), pkg)

    async def request_body(self, vmid: str | None, entity: int, message_id: int, body: Any, *,
                           stream: int = 0, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """``sync_send`` of any msgpack-able ``body``, returning the ACK's decoded payload as it
        is (untyped: for tests and tools; a worker uses ``sync_send`` with a reply type).

        Raises RequestTimeout when no ACK comes in ``timeout`` seconds, NotConnectedError when
        the tunnel is down, UnknownVMError for a VM the mux does not know, NoHandlerError when
        nothing over there handles it, else a TunnelError carrying the reason and ErrorCode
        of the ERROR ACK (``exc.code``: e.g. LIMIT when the peer was at a cap).
        """
        target = self._target(vmid)
        self._next_call = self._next_call % 0xFFFFFFFF + 1
        call_id = self._next_call
        fut: asyncio.Future[Package] = self.loop.create_future()
        self._calls[call_id] = fut
        pkg = Package(type=PackageType.REQUEST, entity=int(entity), id=call_id,
                      message_id=int(message_id), stream=stream, payload=dumps(body))
        try:
            await self._send_package(target, pkg)
            # A timer on the future itself, not wait_for (a waiter future and callbacks more).
            timer = self.loop.call_later(timeout, _expire, fut)
            try:
                ack = await fut
            finally:
                timer.cancel()
        except TimeoutError:
            raise RequestTimeout(
                f"no reply from {target} to {entity_label(entity)} message {message_id} "
                f"within {timeout:g}s") from None
        finally:
            self._calls.pop(call_id, None)
        if ack.flags & PackageFlag.ERROR:
            raise reply_error(ErrorReply.read(ack.payload))
        return loads(ack.payload) if ack.payload else None

    async def control(self, request: dict[str, Any], timeout: float = DEFAULT_TIMEOUT) -> Any:
        """A built-in command to the mux itself (status, connect, ...); returns its result."""
        self._next_call = self._next_call % 0xFFFFFFFF + 1
        call_id = str(self._next_call).encode()
        fut: asyncio.Future[CtlReply] = asyncio.get_running_loop().create_future()
        self._ctl[call_id] = fut
        args = dict(request)
        cmd = str(args.pop("cmd", ""))
        try:
            await self._send(CtlRequest(call_id, cmd, args))
            reply = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise RequestTimeout(f"the mux did not answer {request.get('cmd')!r} "
                                 f"within {timeout:g}s") from None
        finally:
            self._ctl.pop(call_id, None)
        if not reply.ok:
            # The mux's error keeps its code across the bus (an unknown VM is a 404 to the
            # listener's clients, a timeout a 504).
            raise reply.exception()
        return reply.result

    async def report(self, stats: dict[str, Any]) -> None:
        """Publish this worker's counters; `vmbusifyctl status` shows them under its name.

        The link adds ``stats["limits"] = {vmid: {counter: n}}`` (non-zero counters of what
        it refused, reset or dropped for each VM; see vmbusify.bus.budget.Counter), and
        publishes again by itself when only those change."""
        self._last_stats = dict(stats)
        limits = self.budget.snapshot()
        await self.control({"cmd": "report", "worker": self.name,
                            "stats": self._with_limits(limits)})
        self._limits_sent = limits

    def limit_stats(self) -> dict[str, dict[str, int]]:
        """The non-zero limit counters per VM (what ``report`` adds as ``limits``)."""
        return self.budget.snapshot()

    def _with_limits(self, limits: dict[str, dict[str, int]]) -> dict[str, Any]:
        stats = dict(self._last_stats)
        if limits:
            stats["limits"] = limits
        return stats

    def _report_limits(self) -> None:
        """Publish the limit counters if they changed since the mux last took them."""
        if not self.registered.is_set():
            return
        limits = self.budget.snapshot()
        if limits == self._limits_sent:
            return

        async def publish() -> None:
            try:
                await self.control({"cmd": "report", "worker": self.name,
                                    "stats": self._with_limits(limits)})
                self._limits_sent = limits
            except VMBusifyError as exc:  # the mux may be restarting: next heartbeat
                log.debug("worker=%s: limit counters not published: %s", self.name, exc)

        self.spawn(publish(), what="publishing the limit counters")

    async def open_stream(self, vmid: str | None, local: int, peer: int, message_id: int
                          ) -> Stream:
        """A new stream to ``peer`` on ``vmid``; announce it with a sync_send(stream=s.id).

        Raises LimitReached (the reason) when the VM or this worker is at its stream cap."""
        return self.streams.open(self._target(vmid), int(local), int(peer), int(message_id))

    # -- receiving -------------------------------------------------------------------------
    def _on_bus(self, frames: Frames) -> None:
        """An unstamped message (a mux of before the lanes; tests): taken in its turn."""
        self._inbox.push(None, frames)
        self._inbox_ready.set()

    def _on_lane(self, lane: Lane, frames: Frames) -> None:
        """A message from the mux on ``lane``, stamp first."""
        try:
            stamp, rest = split_stamp(frames)
            if stamp is not None and stamp.lane is not lane:
                raise RemoteProtocolError(f"a {stamp.lane.name} stamp on the {lane.name} lane")
        except ProtocolError as exc:
            self._loop_error(frames, exc)
            return
        self._inbox.push(stamp, rest, time.monotonic())
        self._inbox_ready.set()

    async def _receive_loop(self) -> None:
        inbox = self._inbox
        while True:
            while (frames := inbox.pop()) is not None:
                self._busy = True
                try:
                    await self._dispatch(frames)
                except Exception as exc:  # noqa: BLE001 (nothing may stop this loop)
                    self._loop_error(frames, exc)
                self._busy = False
                self._done += 1
            self._inbox_ready.clear()
            await self._inbox_ready.wait()

    def _loop_error(self, frames: Frames, exc: Exception) -> None:
        """A bus message that could not be handled at all (malformed): log, count, go on."""
        vmid = vmid_of(frames)
        if vmid:
            self.budget.count(vmid, Counter.BAD_PACKAGES)
        self._warn.warning((vmid, "malformed"), "worker=%s vm=%s: bad bus message dropped: "
                           "%s: %s%s", self.name, printable(vmid or "-"), type(exc).__name__,
                           printable(exc), "" if isinstance(exc, ProtocolError) else _where(exc))

    async def _dispatch(self, frames: Frames) -> None:
        msg = from_mux(frames)  # RemoteProtocolError if malformed
        if type(msg) is PkgRef:
            if self._bus is None:
                return
            msg = Pkg(msg.vmid, msg.header, self._bus.payload_of(msg))
        if type(msg) is Pkg:
            await self._on_package(msg.vmid, msg.package())
        elif type(msg) is Release:
            if self._bus is not None:
                self._bus.ring_released(msg)
        elif type(msg) is RegOk:
            if self.mux_id and msg.mux_id != self.mux_id and not self._mux_gone:
                # A restart the socket did not report: what is in flight went to the old mux.
                self._on_mux_restart()
                if self._bus is not None:
                    self._bus.restart_numbering()
                    await self._register(both_lanes=True)
            self._mux_gone = False
            self.mux_id = msg.mux_id
            self.registered.set()
            if self._bus is not None and self._bus.ring_accepted(msg.ring, msg.offered):
                await self._register()  # offer the rings made only now
        elif type(msg) is Rereg:
            if self._bus is not None and not self._mux_gone:
                # the mux forgot this worker's numbers (when the socket reported the restart,
                # the numbering started again then, and the new mux has seen it from 1); it
                # keeps its rings (a new mux shows in its REGOK's mux_id: new rings then)
                self._bus.restart_numbering(new_rings=False)
            await self._register(both_lanes=True)
        elif type(msg) is CtlReply:
            fut = self._ctl.get(msg.call_id)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif type(msg) is Evt:
            await self._on_event(msg)

    async def _on_event(self, evt: Evt) -> None:
        event, vmid = evt.event, evt.vmid
        if event is TunnelEvent.DOWN:
            self._on_tunnel_down(vmid, evt.reason)
        elif event is TunnelEvent.PEER_LOST:
            n = self.streams.drop_peer(vmid, evt.entities, "the peer's worker went away")
            if n:
                log.info("worker=%s vm=%s: %d streams reset: the peer's %s went away",
                         self.name, vmid, n, ", ".join(entity_label(e) for e in evt.entities))
        info = evt.info()
        for handler in self._event_handlers:
            try:
                await handler(event, vmid, info)
            except Exception as exc:  # noqa: BLE001 (one handler's bug stops nothing)
                self.budget.count(vmid, Counter.HANDLER_ERRORS)
                self._warn.log(logging.ERROR, (vmid, "event"),
                               "worker=%s vm=%s: %s event handler failed: %s: %s%s",
                               self.name, vmid, event.value, type(exc).__name__,
                               printable(exc), _where(exc))

    def _on_peer(self, connected: bool) -> None:
        """The connection to the mux was made (again) or lost (bus/sockets.py's monitor).

        Lost: every call and stream in flight went to the process that is gone, so they fail
        now; what is sent from here on is queued for the next mux, which takes it, so a
        later REGOK with a new ``mux_id`` fails nothing more (a call sent to the new mux
        before this worker registered again would otherwise be failed though it runs)."""
        log.debug("worker=%s: the mux's connection %s", self.name,
                  "is made" if connected else "is lost")
        if not connected:
            if not self._mux_gone and self.registered.is_set():
                self._mux_gone = True
                self._on_mux_restart()
                if self._bus is not None:
                    self._bus.restart_numbering()  # the next mux knows no numbers
        elif self._mux_gone:
            self._reconnected.set()

    def _on_mux_restart(self) -> None:
        log.warning("worker=%s: the mux restarted; every stream and call is lost", self.name)
        self._limits_sent = {}
        for vmid in {s.vmid for s in self.streams}:
            self.streams.drop_vm(vmid, "the mux restarted")
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(NotConnectedError("not connected: the mux restarted"))

    def _on_tunnel_down(self, vmid: str, reason: str) -> None:
        n = self.streams.drop_vm(vmid, f"tunnel to {vmid} lost: {reason}")
        if n:
            log.info("worker=%s vm=%s: tunnel down (%s), %d streams reset",
                     self.name, vmid, reason, n)

    async def _on_package(self, vmid: str, pkg: Package) -> None:
        if pkg.type is PackageType.ACK:
            fut = self._calls.get(pkg.id)
            if fut is not None and not fut.done():
                fut.set_result(pkg)
            return
        # Dispatch by table: the route, then the kind its package type must arrive on.
        kinds = self._routes.get((pkg.entity, pkg.message_id))
        kind = KIND_OF_TYPE[pkg.type]
        handlers = kinds.get(kind) if kinds is not None else None
        if handlers is None:
            if kinds:
                await self._refuse_package(vmid, pkg, "wrong package type",
                                           ErrorCode.PROTOCOL)
            else:
                await self._refuse_package(vmid, pkg, f"{self.name} has no route for it",
                                           ErrorCode.NO_HANDLER)
        elif kind is RouteKind.STREAM:
            await self.streams.on_package(vmid, pkg)
        elif kind is RouteKind.REQUEST:
            await self._start_request(vmid, pkg, handlers)
        else:
            for handler in handlers:
                assert handler is not None
                try:
                    await self._call(handler, vmid, pkg)
                except Exception as exc:  # noqa: BLE001 (a handler must not stop the loop)
                    await self._handler_failed(vmid, pkg, exc)

    def _describe(self, vmid: str, pkg: Package) -> str:
        return (f"worker={self.name} vm={vmid} stream={pkg.stream}: {pkg.type.name} "
                f"{entity_label(pkg.entity)} message {pkg.message_id}")

    async def _refuse_package(self, vmid: str, pkg: Package, why: str, code: ErrorCode
                              ) -> None:
        """Drop a package its route does not take; a REQUEST gets an ERROR ACK at once."""
        self.budget.count(vmid, Counter.BAD_PACKAGES)
        self._warn.warning((vmid, Counter.BAD_PACKAGES), "%s dropped: %s",
                           self._describe(vmid, pkg), why)
        if pkg.type is PackageType.REQUEST:
            await self._send_error_ack(vmid, pkg, f"{self.name}: {why}", code)

    async def _handler_failed(self, vmid: str, pkg: Package, exc: Exception) -> None:
        """A MESSAGE handler raised: log, count, reset the stream the package belonged to."""
        protocol = isinstance(exc, ProtocolError)
        self.budget.count(vmid, Counter.BAD_PACKAGES if protocol else Counter.HANDLER_ERRORS)
        self._warn.log(logging.WARNING if protocol else logging.ERROR, (vmid, "handler"),
                       "%s: handler failed: %s: %s%s", self._describe(vmid, pkg),
                       type(exc).__name__, printable(exc), "" if protocol else _where(exc))
        stream = self.streams.get(vmid, pkg.entity, pkg.stream) if pkg.stream else None
        if stream is not None:
            await stream.reset(str(exc) if protocol else f"{self.name}: internal error")

    async def _send_error_ack(self, vmid: str, pkg: Package, error: str, code: ErrorCode
                              ) -> None:
        """Answer ``pkg`` (a REQUEST) with an ERROR ACK: ``code`` and the text (the mux
        turns it into the plain text of 0.1.0 for a peer that lists no ``error-codes``)."""
        local = self.entities[0] if self.entities else 0
        reply = ErrorReply(code, error[:MAX_ERROR_TEXT])
        await self._send_package(vmid, reply.ack(entity=local, id=pkg.id,
                                                 message_id=pkg.message_id, stream=pkg.stream))

    async def _call(self, handler: Handler, vmid: str, pkg: Package) -> Any:
        body = loads(pkg.payload) if pkg.payload else None
        msg = Inbound(vmid, pkg.entity, pkg.message_id, pkg.type, pkg.id, pkg.stream, body, pkg)
        return await handler(msg)

    async def _start_request(self, vmid: str, pkg: Package, handlers: list[Handler | None]
                             ) -> None:
        """Refuse a request at once at a cap, else run its handlers in a task of their own."""
        share = self.budget.vm(vmid)
        why = ""
        code = ErrorCode.LIMIT
        if share.requests >= self.config.limits.requests_per_vm:
            self.budget.count(vmid, Counter.REQUESTS_REFUSED)
            why = f"{vmid}: {share.requests} requests in flight: limit reached"
        opens = bool(pkg.stream) and self.streams.get(vmid, pkg.entity, pkg.stream) is None
        if not why and opens:
            # It announces a stream: refused before any work if the stream could not be taken.
            why = self.streams.room_for(vmid)
        held = len(pkg.payload)
        if not why and not self.budget.rx_take(share, held):
            # What requests in flight hold counts with the VM's unread bytes, so the count
            # (requests_per_vm, high enough for a burst of 1,000 opens) bounds no memory.
            self.budget.count(vmid, Counter.REQUESTS_REFUSED)
            why = (f"{vmid}: {share.rx >> 20} MiB held in requests and unread bytes: "
                   "limit reached")
        if why:
            self._warn.warning((vmid, "refused"), "%s refused: %s", self._describe(vmid, pkg),
                               why)
            await self._send_error_ack(vmid, pkg, why, code)
            return
        share.requests += 1
        self.spawn(self._handle_request(vmid, pkg, handlers, share, opens, held), vmid,
                   f"request {entity_label(pkg.entity)} message {pkg.message_id}")

    async def _handle_request(self, vmid: str, pkg: Package, handlers: list[Handler | None],
                              share: VMShare, opens: bool, held: int = 0) -> None:
        """Run a request's handlers and answer it; ``held``: its payload's bytes, charged
        to the VM's share until the answer is sent."""
        try:
            reply: Any = None
            error = ""
            code = ErrorCode.GENERIC
            for i, handler in enumerate(handlers):
                assert handler is not None
                try:
                    result = await self._call(handler, vmid, pkg)
                except VMBusifyError as exc:
                    if not error:
                        error, code = str(exc), exc.code
                    result = None
                    if isinstance(exc, ProtocolError):
                        self.budget.count(vmid, Counter.BAD_PACKAGES)
                        self._warn.warning((vmid, "handler"), "%s: refused: %s",
                                           self._describe(vmid, pkg), printable(exc))
                except Exception as exc:  # noqa: BLE001 (a bug in a handler stops nothing)
                    self.budget.count(vmid, Counter.HANDLER_ERRORS)
                    self._warn.log(logging.ERROR, (vmid, "handler"),
                                   "%s: handler failed: %s: %s%s", self._describe(vmid, pkg),
                                   type(exc).__name__, printable(exc), _where(exc))
                    if not error:
                        error, code = f"{self.name}: internal error", ErrorCode.GENERIC
                    result = None
                if i == 0:
                    reply = result
            if error:
                if opens:
                    # The stream a failed open announced must not stay charged to the VM.
                    stream = self.streams.get(vmid, pkg.entity, pkg.stream)
                    if stream is not None:
                        await stream.reset(error)
                await self._send_error_ack(vmid, pkg, error, code)
                return
            try:
                payload = dumps(reply)
            except VMBusifyError as exc:  # a handler returned what cannot be sent
                self.budget.count(vmid, Counter.HANDLER_ERRORS)
                log.error("%s: reply not sent: %s", self._describe(vmid, pkg), exc)
                await self._send_error_ack(vmid, pkg, f"{self.name}: internal error",
                                           ErrorCode.GENERIC)
                return
            local = self.entities[0] if self.entities else 0
            await self._send_package(vmid, Package(
                type=PackageType.ACK, entity=local, id=pkg.id, message_id=pkg.message_id,
                stream=pkg.stream, payload=payload))
        finally:
            share.requests -= 1
            self.budget.rx_release(share, held)
