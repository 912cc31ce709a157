"""The host half of exec: the command listener's exec API, which runs vmbusifyexec's programs
on a VM (the guest half, the command executor, is workers/exec/main.py).

It runs inside the command listener (control/server.py), on the listener's link, as a
``Worker`` of its own that shares that link (vmbusify.workers.base).

Routes (every request carries the bearer token; see docs/exec.md)::

    GET  /v1/vms/{vmid}/exec    WebSocket: first message the JSON ExecSpec, then binary
                                messages whose first byte is a Channel (stdin, stdout, ...)
    POST /v1/vms/{vmid}/exec    JSON ExecSpec with "detach": true -> {"vmid", "pid"}

``vmid`` is a vmid or any IP address the VM reported. For each attached exec the listener opens
two streams to the VM's command executor (main: stdin down, stdout up; side: stderr up, and
down only its EOF when the exec is over), sends START, and then relays: WebSocket -> streams
for stdin, signals and resizes, streams -> WebSocket for output. When both output streams ended
and the EXIT message came, it sends the STATUS message and closes. A client that goes away
resets the streams, which makes the executor kill the remote process tree.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from vmbusify.bus.frames import RouteKind, TunnelEvent
from vmbusify.bus.link import Inbound, WorkerLink
from vmbusify.bus.streams import Stream, StreamReset
from vmbusify.config import Config
from vmbusify.errors import (
    ControlError,
    ErrorCode,
    NoHandlerError,
    ProtocolError,
    RequestTimeout,
    TunnelError,
    UnknownVMError,
    VMBusifyError,
)
from vmbusify.protocol.entities import Entity
from vmbusify.protocol.exec import (
    ExecMessage,
    ExecSpec,
    ExitStatus,
    Kill,
    Resize,
    SendSignal,
    StartReply,
    parse_signal,
)
from vmbusify.protocol.exec_api import EXIT_FAILURE, Channel, ExitReason
from vmbusify.protocol.window import MAX_CHUNK
from vmbusify.workers.base import Worker
from vmbusify.workers.exec.fdfile import Divert, FdRequest, file_to_stream, receive_fd

log = logging.getLogger("vmbusify.exec.host")

#: Seconds a client has to send its request once the WebSocket is open.
REQUEST_TIMEOUT = 10.0
#: Seconds START may take (includes bringing the VM's tunnel up on demand).
START_TIMEOUT = 20.0
_CLOSE_CHANNEL = bytes([Channel.CLOSE, Channel.STDIN])
#: Where to look when a VM's command executor does not answer. The host knows neither the
#: guest's run directory nor where its supervisorctl is, so no supervisorctl line would run
#: as typed; the unit is the same for both guest installs (docs/deploy.md).
EXECUTOR_HINT = ("check in the VM that VMBusify's exec program runs: "
                 "systemctl status vmbusify-guest")


@dataclass
class Relay:
    """One attached exec as the listener sees it."""

    vmid: str
    spec: ExecSpec
    main: Stream
    side: Stream
    exit: asyncio.Future[ExitStatus] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    pid: int = 0
    #: Channel.FD_OPEN "write": stdout bytes that go into the client's file.
    divert: Divert | None = None

    @property
    def ctx(self) -> str:
        return f"vm={self.vmid} stream={self.main.id}"

    def lost(self, reason: str) -> None:
        """End the exec with 255 and ``reason`` (tunnel down)."""
        if not self.exit.done():
            self.exit.set_result(ExitStatus(EXIT_FAILURE, ExitReason.LOST, reason, self.main.id))


class ExecService(Worker):
    """Starts execs on VMs and tracks the running ones (on the command listener's link)."""

    name = "control"
    entities = (Entity.CMD_LISTENER,)
    report_interval = None  # the listener publishes no counters

    def __init__(self, config: Config, link: WorkerLink) -> None:
        super().__init__(config, link)
        self.relays: dict[tuple[str, int], Relay] = {}
        self.started = 0
        #: Attached execs ended, by exit class (issue 16: docs/metrics.md).
        self.exits: dict[str, int] = {}

    def count_exit(self, status: ExitStatus) -> None:
        """Count an ended exec under its class: ``ok`` (exit 0), ``failed`` (another exit
        status), else its reason (``signaled``, ``timeout``, ``not-found``, ...)."""
        cls = status.reason.value
        if status.reason is ExitReason.EXITED:
            cls = "ok" if status.exit_code == 0 else "failed"
        self.exits[cls] = self.exits.get(cls, 0) + 1

    def install(self) -> None:
        """Routes on the worker link (before it starts)."""
        self.link.route(Entity.CMD_EXECUTOR, ExecMessage.DATA, None, RouteKind.STREAM)
        self.link.route(Entity.CMD_EXECUTOR, ExecMessage.EXIT, self.on_exit, RouteKind.MESSAGE)
        self.link.on_event(self.on_event)

    async def on_exit(self, msg: Inbound) -> None:
        try:
            status = ExitStatus.from_body(msg.body)
        except ProtocolError as exc:
            log.warning("vm=%s: bad EXIT dropped: %s", msg.vmid, exc)
            return
        relay = self.relays.get((msg.vmid, status.id))
        if relay is not None and not relay.exit.done():
            relay.exit.set_result(status)

    async def on_event(self, event: TunnelEvent, vmid: str, info: dict[str, Any]) -> None:
        if event is TunnelEvent.DOWN:
            for relay in [r for r in self.relays.values() if r.vmid == vmid]:
                relay.lost(f"tunnel to {vmid} lost ({info.get('reason', 'down')})")

    async def resolve(self, target: str) -> str:
        """The vmid for ``target``: itself, the VM that reported it as an IP address, or
        the VM with this alias (a libvirt domain's UUID: docs/discovery.md)."""
        try:
            ipaddress.ip_address(target)
        except ValueError:
            try:
                uuid.UUID(target)
            except ValueError:
                return target
        try:
            return str(await self.link.control({"cmd": "vmid", "ip": target}))
        except ControlError as exc:
            raise UnknownVMError(str(exc)) from None

    async def _start_request(self, vmid: str, spec: ExecSpec, stream: int = 0) -> StartReply:
        try:
            return await self.link.sync_send(vmid, spec, StartReply, stream=stream,
                                             timeout=START_TIMEOUT)
        except RequestTimeout:
            raise RequestTimeout(f"the command executor on {vmid} did not answer within "
                                 f"{START_TIMEOUT:g}s (is it stuck? {EXECUTOR_HINT})"
                                 ) from None
        except UnknownVMError:  # the host mux's (its code, UNKNOWN_VM): a 404
            raise
        except TunnelError as exc:
            # Nothing on the guest handles START: NO_HANDLER from the guest's mux, or the
            # same words with no code (GENERIC) from a mux of 0.1.0.
            if isinstance(exc, NoHandlerError) or (
                    exc.code is ErrorCode.GENERIC and str(exc).startswith("no worker on")):
                raise TunnelError(f"the command executor is not running on {vmid} "
                                  f"({EXECUTOR_HINT})") from None
            raise

    async def launch(self, target: str, spec: ExecSpec) -> Relay | StartReply:
        """Start ``spec`` on ``target``: the Relay of a started attached exec, else the reply."""
        vmid = await self.resolve(target)
        if spec.detach:
            return await self._start_request(vmid, spec)
        main = await self.link.open_stream(vmid, Entity.CMD_LISTENER, Entity.CMD_EXECUTOR,
                                           ExecMessage.DATA)
        try:
            side = await self.link.open_stream(vmid, Entity.CMD_LISTENER, Entity.CMD_EXECUTOR,
                                               ExecMessage.DATA)
        except VMBusifyError:  # at the stream cap (LimitReached): the first goes too
            self.link.streams.forget(main)
            raise
        spec = dataclasses.replace(spec, side_stream=side.id)
        relay = Relay(vmid, spec, main, side)
        self.relays[(vmid, main.id)] = relay
        try:
            reply = await self._start_request(vmid, spec, main.id)
        except BaseException:
            self._forget(relay)
            raise
        if not reply.started:
            self._forget(relay)
            return reply
        relay.pid = reply.pid
        self.started += 1
        if not spec.stdin:
            await main.write_eof()
        return relay

    def stats(self) -> dict[str, int]:
        """Execs running now and started since the listener started."""
        return {"running": len(self.relays), "started": self.started}

    async def close(self) -> None:
        """The listener is stopping: abort every exec (clients get 255 and the reason)."""
        for relay in list(self.relays.values()):
            await self.finish(relay, "the command listener is stopping")

    def _forget(self, relay: Relay) -> None:
        self.relays.pop((relay.vmid, relay.main.id), None)
        for s in (relay.main, relay.side):
            self.link.streams.forget(s)

    async def finish(self, relay: Relay, reason: str = "") -> None:
        """Drop a relay; ``reason``: abort it (the executor kills the remote tree)."""
        if self.relays.pop((relay.vmid, relay.main.id), None) is None:
            return  # finished already
        if reason:
            try:
                await self.link.async_send(relay.vmid, Kill(relay.main.id, reason))
            except TunnelError:
                pass  # the tunnel is gone: the executor kills the tree on its own
        for s in (relay.main, relay.side):
            if reason:
                await s.reset(reason)
            else:
                await s.write_eof()
                self.link.streams.forget(s)


# -- HTTP ------------------------------------------------------------------------------------

EXEC_KEY = web.AppKey("exec", ExecService)


def _service(request: web.Request) -> ExecService:
    return request.app[EXEC_KEY]


def _status_message(status: ExitStatus) -> bytes:
    return bytes([Channel.STATUS]) + json.dumps(status.to_body()).encode()


async def exec_detached(request: web.Request) -> web.Response:
    """POST: start a detached program; answers ``{"vmid", "pid"}``."""
    try:
        body = await request.json()
    except ValueError:
        raise ControlError("the exec request is not JSON") from None
    try:
        spec = ExecSpec.from_body(body)
    except ProtocolError as exc:
        raise ControlError(str(exc)) from None
    if not spec.detach:
        raise ControlError("POST runs detached execs only (\"detach\": true); "
                           "attached execs use a WebSocket on GET")
    if spec.timeout is not None:
        # The executor watches attached execs only: a timeout would be silently ignored.
        raise ControlError("a detached exec takes no timeout (nothing watches it)")
    service = _service(request)
    vmid = await service.resolve(request.match_info["vmid"])
    reply = await service.launch(vmid, spec)
    assert isinstance(reply, StartReply)
    if not reply.started:
        return web.json_response({"error": reply.message, "exit_code": reply.exit_code},
                                 status=422)
    log.info("vm=%s pid=%d: detached exec %s", vmid, reply.pid, spec.argv[0])
    return web.json_response({"vmid": vmid, "pid": reply.pid})


async def exec_attached(request: web.Request) -> web.StreamResponse:
    """GET: the WebSocket of an attached exec (see the module docstring and docs/exec.md)."""
    ws = web.WebSocketResponse(max_msg_size=MAX_CHUNK + 1024, compress=False, autoping=True)
    if not ws.can_prepare(request).ok:
        raise ControlError("an attached exec needs a WebSocket upgrade "
                           "(or POST with \"detach\": true)")
    await ws.prepare(request)
    service = _service(request)
    target = request.match_info["vmid"]
    try:
        relay = await _start(ws, service, target)
    except VMBusifyError as exc:
        lost = ExitStatus(EXIT_FAILURE, ExitReason.LOST, str(exc))
        service.count_exit(lost)
        await _send_status(ws, lost)
        return ws
    if isinstance(relay, StartReply):
        reason = ExitReason.NOT_FOUND if relay.exit_code == 127 else ExitReason.CANNOT_RUN
        refused = ExitStatus(relay.exit_code, reason, relay.message)
        service.count_exit(refused)
        await _send_status(ws, refused)
        return ws
    log.info("%s pid=%d: exec %s", relay.ctx, relay.pid, relay.spec.argv[0])
    await _relay(ws, service, relay, request.transport)
    return ws


async def _start(ws: web.WebSocketResponse, service: ExecService, target: str
                 ) -> Relay | StartReply:
    try:
        msg = await ws.receive(timeout=REQUEST_TIMEOUT)
    except TimeoutError:
        raise ControlError(f"no exec request within {REQUEST_TIMEOUT:g}s") from None
    if msg.type is not WSMsgType.TEXT:
        raise ControlError("the first message must be the JSON exec request")
    try:
        spec = ExecSpec.from_body(json.loads(msg.data))
    except ValueError:
        raise ControlError("the exec request is not JSON") from None
    except ProtocolError as exc:
        raise ControlError(str(exc)) from None
    if spec.detach:
        raise ControlError("a detached exec is a POST, not a WebSocket")
    return await service.launch(target, spec)


async def _send_status(ws: web.WebSocketResponse, status: ExitStatus) -> None:
    try:
        await ws.send_bytes(_status_message(status))
        await ws.close()
    except (ConnectionError, RuntimeError):
        pass


async def _relay(ws: web.WebSocketResponse, service: ExecService, relay: Relay,
                 transport: Any) -> None:
    """Both directions until the exec ended or the client left."""
    outputs: list[asyncio.Future[str]] = [
        asyncio.ensure_future(_pump_out(ws, relay.main, Channel.STDOUT, relay))]
    if not relay.spec.tty:
        outputs.append(asyncio.ensure_future(_pump_out(ws, relay.side, Channel.STDERR)))
    upstream = asyncio.ensure_future(_pump_in(ws, service, relay, transport))
    abort = ""
    try:
        all_out: asyncio.Future[list[str]] = asyncio.gather(*outputs)
        all_out.add_done_callback(lambda f: f.cancelled() or f.exception())
        waits: list[asyncio.Future[Any]] = [upstream, all_out]
        done, _ = await asyncio.wait(waits,
                                     return_when=asyncio.FIRST_COMPLETED)
        if upstream in done:
            abort = upstream.result()
            if abort:  # the client left: nothing to wait for
                return
        results = await asyncio.gather(*outputs)
        abort = next((r for r in results if r), "")
        if abort:
            relay.lost(f"exec on {relay.vmid} lost: {abort}")
        status = await relay.exit
        service.count_exit(status)
        log.info("%s: %s", relay.ctx, status.message or f"exit {status.exit_code}")
        await _send_status(ws, status)
    finally:
        upstream.cancel()
        for t in outputs:
            t.cancel()
        if relay.divert is not None:
            await relay.divert.end()
        await service.finish(relay, abort)
        log.debug("%s: finished%s", relay.ctx, f" ({abort})" if abort else "")


async def _pump_out(ws: web.WebSocketResponse, stream: Stream, channel: Channel,
                    relay: Relay | None = None) -> str:
    """Stream -> client (or, while ``relay.divert`` is set, into the client's file);
    returns "" at EOF, else why it stopped."""
    prefix = bytes([channel])
    try:
        while chunk := await stream.read():
            divert = relay.divert if relay is not None else None
            if divert is not None:
                rest = await divert.take(chunk)
                if not divert.left:
                    relay.divert = None  # type: ignore[union-attr]
                    await divert.end()
                if not rest:
                    continue
                chunk = bytes(rest)
            await ws.send_bytes(prefix + chunk)
        if relay is not None and relay.divert is not None:
            divert, relay.divert = relay.divert, None
            await divert.end()  # short: the program's output ended first
    except StreamReset as exc:
        return str(exc) or "stream reset"
    except (ConnectionError, RuntimeError) as exc:
        return f"client gone: {exc}"
    return ""


async def _fd_open(ws: web.WebSocketResponse, relay: Relay, transport: Any,
                   data: bytes) -> None:
    """Channel.FD_OPEN: take the client's file (fdfile.py); "read" sends it as stdin now,
    "write" diverts the next bytes of stdout into it."""
    req = FdRequest.parse(data)
    if relay.divert is not None or (req.op == "read" and not relay.spec.stdin):
        raise ControlError("FD_OPEN: not now (a transfer is running, or no stdin)")

    async def report(doc: dict[str, Any]) -> None:
        await ws.send_bytes(bytes([Channel.FD_DONE]) + json.dumps(doc).encode())

    fd = await receive_fd(transport, lambda: ws.send_bytes(bytes([Channel.FD_READY])))
    log.info("%s: file by descriptor: %s %d bytes at %d", relay.ctx, req.op, req.count,
             req.offset)
    if req.op == "write":
        divert = Divert(fd, req, report)
        if req.count:
            relay.divert = divert
        else:
            await divert.end()
        return
    await file_to_stream(fd, req, relay.main, report,
                         lambda: relay.exit.done() or transport.is_closing())


async def _pump_in(ws: web.WebSocketResponse, service: ExecService, relay: Relay,
                   transport: Any = None) -> str:
    """Client -> stdin stream, signals and resizes; returns why the client left ("" never).

    Signals and resizes say how many bytes of stdin went before them (``after``): they are
    control messages, which may overtake those bytes on the way, and the executor applies
    them only once the bytes are in the program's stdin (docs/exec.md)."""
    link, body_id = service.link, relay.main.id
    sent = 0  # bytes of stdin written to the main stream
    async for msg in ws:
        if msg.type is not WSMsgType.BINARY or not msg.data:
            continue
        channel, data = msg.data[0], msg.data[1:]
        try:
            if channel == Channel.STDIN:
                if relay.spec.stdin and data:
                    await relay.main.write(data)
                    sent += len(data)
            elif msg.data == _CLOSE_CHANNEL:
                if relay.spec.stdin:
                    await relay.main.write_eof()
            elif channel == Channel.SIGNAL:
                sig = parse_signal(json.loads(data).get("signal"))
                await link.async_send(relay.vmid, SendSignal(body_id, sig.name[3:], sent))
            elif channel == Channel.RESIZE:
                r = Resize.from_body(json.loads(data))
                await link.async_send(relay.vmid, Resize(r.rows, r.cols, body_id, sent))
            elif channel == Channel.FD_OPEN:
                try:
                    await _fd_open(ws, relay, transport, data)
                except ControlError as exc:
                    log.warning("%s: %s", relay.ctx, exc)
                    await ws.send_bytes(bytes([Channel.FD_DONE]) + json.dumps(
                        {"bytes": 0, "end": True, "error": str(exc)}).encode())
        except (ValueError, AttributeError, ProtocolError) as exc:
            log.warning("%s: bad client message ignored: %s", relay.ctx, exc)
        except StreamReset:
            pass  # the output side reports it
        except TunnelError as exc:
            log.info("%s: %s", relay.ctx, exc)
    if relay.exit.done():
        return ""
    return "the client went away"


def setup(app: web.Application, config: Config, link: WorkerLink) -> ExecService:
    """Add the exec routes and the exec service on ``link``; the caller starts the service
    (``await service.start()``) before the link, and the app's shutdown stops it."""
    service = ExecService(config, link)
    app[EXEC_KEY] = service

    async def stop(_app: web.Application) -> None:
        await service.stop()

    app.on_shutdown.append(stop)
    app.router.add_get("/v1/vms/{vmid}/exec", exec_attached)
    app.router.add_post("/v1/vms/{vmid}/exec", exec_detached)
    return service
