"""WorkerLink: what a worker process uses to reach the tunnel (the spec's worker interface).

A worker declares its entities and the (source entity, message id) pairs it handles, then
uses ``sync_send`` / ``async_send`` (spec 4.1). On the host every call takes the target vmid;
on a guest the only peer is ``HOST_VMID``. Handlers learn which VM a message came from.

    link = WorkerLink(config, "proxy", [Entity.PROXY_SERVER])
    link.route(Entity.PROXY_CLIENT, ProxyMessage.OPEN, on_open)   # handler(msg) -> reply
    await link.start()
    reply = await link.sync_send(vmid, Entity.PROXY_SERVER, ProxyMessage.OPEN, {...})

REQUEST handlers run in a task of their own, in registration order; the first handler's
return value is the ACK's payload (a VMBusifyError raised becomes an error ACK). MESSAGE
handlers run inline, in order of arrival: keep them quick. DATA and WINDOW packages go to
``link.streams``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import zmq

from vmbusify.bus.frames import HOST_VMID, BusKind, TunnelEvent
from vmbusify.bus.sockets import BusSocket, Frames, connect_dealer, shared_context
from vmbusify.bus.streams import Stream, StreamTable
from vmbusify.config import Config, Role
from vmbusify.errors import (
    ControlError,
    NotConnectedError,
    ProtocolError,
    RequestTimeout,
    TunnelError,
    UnknownVMError,
    VMBusifyError,
)
from vmbusify.protocol.entities import entity_label
from vmbusify.protocol.package import (
    MAX_PAYLOAD_LIMIT,
    Package,
    PackageFlag,
    PackageType,
    decode_header,
)
from vmbusify.protocol.serialize import dumps, loads, loads_dict

log = logging.getLogger(__name__)

#: Seconds between registrations; they double as the worker's heartbeat to the mux.
REGISTER_INTERVAL = 2.0
DEFAULT_TIMEOUT = 10.0
#: How long a closing worker's goodbye may take to reach the mux.
UNREG_LINGER_MS = 200
#: Errors of the mux's built-in commands that keep their kind across the bus.
_CONTROL_ERRORS: dict[str, type[VMBusifyError]] = {
    e.__name__: e for e in (UnknownVMError, NotConnectedError, RequestTimeout, TunnelError)}


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


Handler = Callable[[Inbound], Awaitable[Any]]
EventHandler = Callable[[TunnelEvent, str, dict[str, Any]], Awaitable[None]]


class WorkerLink:
    """One worker's connection to its endpoint's mux."""

    def __init__(self, config: Config, name: str, entities: list[int]) -> None:
        self.config = config
        self.name = name
        self.entities = list(entities)
        self.role: Role = config.role
        self.mux_id = ""
        self.registered = asyncio.Event()
        self.streams = StreamTable(self._send_package)
        self._routes: dict[tuple[int, int], list[Handler | None]] = {}
        self._event_handlers: list[EventHandler] = []
        self._ctx = shared_context()
        self._bus: BusSocket | None = None
        # Messages from the mux, handled in order by one task (handlers may await).
        self._inbox: collections.deque[Frames] = collections.deque()
        self._inbox_ready = asyncio.Event()
        self._calls: dict[int, asyncio.Future[Package]] = {}
        self._ctl: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self._next_call = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- set-up ----------------------------------------------------------------------------
    def route(self, source: int, message_id: int, handler: Handler | None = None) -> None:
        """Receive ``message_id`` from entity ``source``; ``handler`` None for stream data."""
        self._routes.setdefault((int(source), int(message_id)), []).append(handler)

    def on_event(self, handler: EventHandler) -> None:
        """Be told when a tunnel comes up or goes down: handler(event, vmid, info)."""
        self._event_handlers.append(handler)

    async def start(self, wait: float | None = 30.0) -> None:
        """Connect to the mux, register, and start receiving. Waits for the first REGOK."""
        self._bus = BusSocket(connect_dealer(self._ctx, self.config.bus_endpoint, self.name),
                              self._on_bus)
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
        if self._bus is not None:
            linger = 0
            if self.registered.is_set():
                try:
                    self._bus.send([BusKind.UNREG.value])
                    linger = UNREG_LINGER_MS
                except zmq.ZMQError:
                    pass  # the mux is gone: nothing to tell
            self._bus.close(linger)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("worker=%s task failed", self.name, exc_info=task.exception())

    async def _register_loop(self) -> None:
        while True:
            await self._register()
            await asyncio.sleep(REGISTER_INTERVAL)

    async def _register(self) -> None:
        body = {
            "name": self.name, "pid": os.getpid(), "entities": [int(e) for e in self.entities],
            "routes": [list(k) for k in self._routes],
        }
        await self._send_frames([BusKind.REG.value, dumps(body)])

    # -- sending ---------------------------------------------------------------------------
    def _target(self, vmid: str | None) -> str:
        if self.role is Role.GUEST:
            return HOST_VMID
        if not vmid:
            raise TunnelError("the host must name the target vmid")
        return vmid

    async def _send_frames(self, frames: Frames) -> None:
        assert self._bus is not None, "start() first"
        try:
            self._bus.send(frames)
        except zmq.ZMQError as exc:  # high-water marks are off: not expected
            raise TunnelError(f"cannot reach the mux: {exc}") from None

    async def _send_package(self, vmid: str, pkg: Package) -> None:
        await self._send_frames([BusKind.PKG.value, vmid.encode(), pkg.header(), pkg.payload])

    async def async_send(self, vmid: str | None, entity: int, message_id: int, body: Any,
                         stream: int = 0) -> None:
        """Send a one-way message (spec async_send); returns once it is handed to the mux."""
        pkg = Package(PackageType.MESSAGE, int(entity), int(message_id), 0, stream,
                      payload=dumps(body))
        await self._send_package(self._target(vmid), pkg)

    async def sync_send(self, vmid: str | None, entity: int, message_id: int, body: Any,
                        stream: int = 0, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """Send a request and wait for the ACK's reply (spec sync_send).

        Raises RequestTimeout when no ACK comes in ``timeout`` seconds, NotConnectedError when
        the tunnel is down, TunnelError carrying the peer's reason when its handler failed.
        """
        target = self._target(vmid)
        self._next_call = self._next_call % 0xFFFFFFFF + 1
        call_id = self._next_call
        fut: asyncio.Future[Package] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        pkg = Package(PackageType.REQUEST, int(entity), int(message_id), call_id, stream,
                      payload=dumps(body))
        try:
            await self._send_package(target, pkg)
            ack = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise RequestTimeout(
                f"no reply from {target} to {entity_label(entity)} message {message_id} "
                f"within {timeout:g}s") from None
        finally:
            self._calls.pop(call_id, None)
        if ack.flags & PackageFlag.ERROR:
            reason = bytes(ack.payload).decode("utf-8", "replace")
            if reason.startswith("not connected:"):
                raise NotConnectedError(reason)
            raise TunnelError(reason)
        return loads(ack.payload) if ack.payload else None

    async def control(self, request: dict[str, Any], timeout: float = DEFAULT_TIMEOUT) -> Any:
        """A built-in command to the mux itself (status, connect, ...); returns its result."""
        self._next_call = self._next_call % 0xFFFFFFFF + 1
        call_id = str(self._next_call).encode()
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._ctl[call_id] = fut
        try:
            await self._send_frames([BusKind.CTL.value, call_id, dumps(request)])
            reply = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise RequestTimeout(f"the mux did not answer {request.get('cmd')!r} "
                                 f"within {timeout:g}s") from None
        finally:
            self._ctl.pop(call_id, None)
        if not reply.get("ok"):
            # The mux's error keeps its kind across the bus (an unknown VM is a 404 to the
            # listener's clients, a timeout a 504); any other is a failed command.
            kind = _CONTROL_ERRORS.get(str(reply.get("kind")), ControlError)
            raise kind(str(reply.get("error", "failed")))
        return reply.get("result")

    async def report(self, stats: dict[str, Any]) -> None:
        """Publish this worker's counters; `vmbusifyctl status` shows them under its name."""
        await self.control({"cmd": "report", "worker": self.name, "stats": stats})

    async def open_stream(self, vmid: str | None, local: int, peer: int, message_id: int
                          ) -> Stream:
        """A new stream to ``peer`` on ``vmid``; announce it with a sync_send(stream=s.id)."""
        return self.streams.open(self._target(vmid), int(local), int(peer), int(message_id))

    # -- receiving -------------------------------------------------------------------------
    def _on_bus(self, frames: Frames) -> None:
        self._inbox.append(frames)
        self._inbox_ready.set()

    async def _receive_loop(self) -> None:
        inbox = self._inbox
        while True:
            while inbox:
                try:
                    await self._dispatch(inbox.popleft())
                except (ProtocolError, ValueError, IndexError, UnicodeDecodeError) as exc:
                    log.warning("worker=%s: bad bus message from the mux dropped: %s",
                                self.name, exc)
            self._inbox_ready.clear()
            await self._inbox_ready.wait()

    async def _dispatch(self, frames: list[Any]) -> None:
        kind = BusKind(bytes(frames[0]))
        if kind is BusKind.PKG:
            await self._on_package(frames[1].decode(), frames[2], frames[3])
        elif kind is BusKind.REGOK:
            info = loads_dict(frames[1], "REGOK")
            mux_id = str(info.get("mux_id", ""))
            if self.mux_id and mux_id != self.mux_id:
                self._on_mux_restart()
            self.mux_id = mux_id
            self.registered.set()
        elif kind is BusKind.REREG:
            await self._register()
        elif kind is BusKind.CTL:
            fut = self._ctl.get(frames[1])
            if fut is not None and not fut.done():
                fut.set_result(loads_dict(frames[2], "CTL reply"))
        elif kind is BusKind.EVT:
            info = loads_dict(frames[1], "EVT")
            event, vmid = TunnelEvent(info["event"]), str(info["vmid"])
            if event is TunnelEvent.DOWN:
                self._on_tunnel_down(vmid, str(info.get("reason", "tunnel down")))
            elif event is TunnelEvent.PEER_LOST:
                entities = [int(e) for e in info.get("entities", [])]
                n = self.streams.drop_peer(vmid, entities, "the peer's worker went away")
                if n:
                    log.info("worker=%s vm=%s: %d streams reset: the peer's %s went away",
                             self.name, vmid, n, ", ".join(entity_label(e) for e in entities))
            for handler in self._event_handlers:
                await handler(event, vmid, info)

    def _on_mux_restart(self) -> None:
        log.warning("worker=%s: the mux restarted; every stream and call is lost", self.name)
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

    async def _on_package(self, vmid: str, header: bytes, payload: bytes) -> None:
        h = decode_header(header, MAX_PAYLOAD_LIMIT)
        pkg = Package(h.type, h.entity, h.message_id, h.id, h.stream, h.flags, payload)
        if pkg.type in (PackageType.DATA, PackageType.WINDOW):
            await self.streams.on_package(vmid, pkg)
        elif pkg.type is PackageType.ACK:
            fut = self._calls.get(pkg.id)
            if fut is not None and not fut.done():
                fut.set_result(pkg)
        elif pkg.type is PackageType.REQUEST:
            self._spawn(self._handle_request(vmid, pkg))
        else:
            for handler in self._handlers(pkg):
                await self._call(handler, vmid, pkg)

    def _handlers(self, pkg: Package) -> list[Handler]:
        return [h for h in self._routes.get((pkg.entity, pkg.message_id), []) if h is not None]

    async def _call(self, handler: Handler, vmid: str, pkg: Package) -> Any:
        body = loads(pkg.payload) if pkg.payload else None
        msg = Inbound(vmid, pkg.entity, pkg.message_id, pkg.type, pkg.id, pkg.stream, body, pkg)
        return await handler(msg)

    async def _handle_request(self, vmid: str, pkg: Package) -> None:
        handlers = self._handlers(pkg)
        reply: Any = None
        error = "" if handlers else (
            f"{self.name} has no handler for {entity_label(pkg.entity)} message {pkg.message_id}")
        for i, handler in enumerate(handlers):
            try:
                result = await self._call(handler, vmid, pkg)
            except VMBusifyError as exc:
                result, error = None, error or str(exc)
            except Exception:  # a bug in a handler must not take the worker down
                log.exception("worker=%s vm=%s: handler for %s message %d failed",
                              self.name, vmid, entity_label(pkg.entity), pkg.message_id)
                result, error = None, error or f"{self.name}: internal error"
            if i == 0:
                reply = result
        local = self.entities[0] if self.entities else 0
        if error:
            ack = Package(PackageType.ACK, local, pkg.message_id, pkg.id, pkg.stream,
                          PackageFlag.ERROR, error.encode()[:2000])
        else:
            ack = Package(PackageType.ACK, local, pkg.message_id, pkg.id, pkg.stream,
                          payload=dumps(reply))
        await self._send_package(vmid, ack)
