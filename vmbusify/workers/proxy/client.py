"""The proxy client (docs/proxy.md): SOCKS5, SOCKS4/4a and HTTP proxy on 127.0.0.1:6542.

Who may use it (``[proxy] access``, users/access.py): on the host, root and members of
group ``vmbusify`` without credentials, other local users only with RFC 1929 / Basic
credentials (SOCKS5 without them: reply 2 "not allowed by ruleset" to the CONNECT; HTTP:
407 asking for Basic; SOCKS4 has no password: refused); a guest's proxy is open to every
guest process. The user is the owner of the client's socket, asked once per connection.

Per user connection: read the handshake (protocol/socks.py), pick the VM (route.py), open a
stream and send PROXY-OPEN, wait for PROXY-OPEN-ACK, answer the user with the far side's
real outcome, then relay (relay.py). UDP ASSOCIATE gets a UDP socket on the listen address
(udp_client.py). Nothing a user sends can raise out of ``serve``: bad input is answered in
its protocol when possible, then the connection is closed, and the log says why.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable
from typing import Any

from vmbusify.bus.frames import RouteKind
from vmbusify.bus.link import WorkerLink
from vmbusify.bus.streams import Stream
from vmbusify.config import ProxyConfig, Role
from vmbusify.config_file import split_listen
from vmbusify.errors import (
    LimitReached,
    NotConnectedError,
    ProtocolError,
    RequestTimeout,
    TunnelError,
    UnknownVMError,
)
from vmbusify.logs import RateLimitedLog, printable
from vmbusify.protocol.entities import Entity
from vmbusify.protocol.httpproxy import http_auth_required
from vmbusify.protocol.proxy import Command, OpenAck, ProxyMessage, ProxyOpen, ReplyCode
from vmbusify.protocol.socks import (
    Handshake,
    HandshakeError,
    ProxyKind,
    Socks5Auth,
    Socks5Greeting,
    TargetRequest,
)
from vmbusify.runtime import UsesLoop
from vmbusify.users.access import AccessMode, Credentials, LocalUsers, access_mode
from vmbusify.users.peer import tcp_peer_uid
from vmbusify.workers.base import Spawner
from vmbusify.workers.proxy.relay import SocketEnd, relay
from vmbusify.workers.proxy.route import Route, RouteError, Router
from vmbusify.workers.proxy.stats import ConnStats
from vmbusify.workers.proxy.udp_client import UdpAssociation

log = logging.getLogger("vmbusify.proxy.client")

#: Seconds a user has to finish the handshake.
HANDSHAKE_TIMEOUT = 30.0
#: Extra seconds the client waits for PROXY-OPEN-ACK beyond the far side's connect timeout.
ACK_MARGIN = 5.0
#: Users accepted per wake-up of the listening socket (then the loop's other work).
ACCEPT_BATCH = 32
#: Seconds before accepting again after accept failed (EMFILE: out of descriptors).
ACCEPT_RETRY = 0.1


class Caller:
    """Who is at the other end of one user connection, as far as access goes."""

    __slots__ = ("authenticated", "free", "uid")

    def __init__(self, uid: int | None, free: bool) -> None:
        #: The owner of the client's socket (None: not looked up, or not found).
        self.uid = uid
        #: Served without credentials (access "open", or root / the group).
        self.free = free
        #: Gave valid credentials (SOCKS5 user/password or HTTP Basic).
        self.authenticated = False

    @property
    def allowed(self) -> bool:
        return self.free or self.authenticated

    def __str__(self) -> str:
        return f"uid={self.uid if self.uid is not None else '?'}"


class ProxyClient(UsesLoop):
    """Accepts users' proxy connections and carries them through the tunnel."""

    def __init__(self, link: WorkerLink, cfg: ProxyConfig, role: Role, stats: ConnStats,
                 spawn: Spawner | None = None) -> None:
        """``spawn``: the worker's (vmbusify.workers.base), which supervises each connection."""
        self.link = link
        self.spawn: Spawner = spawn or self._link_spawn
        self.cfg = cfg
        self.role = role
        self.stats = stats
        self.router = Router(link, role)
        self._sock: socket.socket | None = None
        self._family = socket.AF_INET
        self._accepting = False
        self._next_conn = 0
        self.mode = access_mode(cfg, role)
        self.credentials = Credentials.from_config(cfg)
        self.users = LocalUsers(cfg.group)
        self._refusals = RateLimitedLog(log)

    def _link_spawn(self, coro: Awaitable[Any], vmid: str = "", what: str = "request"
                    ) -> asyncio.Task[Any]:
        return self.link.spawn(coro, vmid, what)  # supervised by the link alone

    def install(self) -> None:
        """Register the route for the server's PROXY-DATA."""
        self.link.route(Entity.PROXY_SERVER, ProxyMessage.DATA, None, RouteKind.STREAM)

    def listen(self) -> socket.socket:
        """Bind the listening socket (raises OSError)."""
        host, port = split_listen(self.cfg.listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1024)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock = sock
        self._family = family
        return sock

    async def serve_forever(self) -> None:
        """Accept users until cancelled.

        The listening socket stays registered with the loop, which calls ``_accept_ready``
        while users wait (``loop.sock_accept`` would register and unregister it, two
        ``epoll_ctl`` calls, and make a future for every connection)."""
        assert self._sock is not None
        self._resume_accepting()
        try:
            await self.loop.create_future()  # until cancelled
        finally:
            self._pause_accepting()

    def _resume_accepting(self) -> None:
        if self._sock is not None and not self._accepting and self._sock.fileno() >= 0:
            self._accepting = True
            self.loop.add_reader(self._sock.fileno(), self._accept_ready)

    def _pause_accepting(self) -> None:
        if self._accepting and self._sock is not None:
            self._accepting = False
            self.loop.remove_reader(self._sock.fileno())

    def _accept_ready(self) -> None:
        """Accept up to ACCEPT_BATCH waiting users (the rest at the loop's next turn)."""
        sock = self._sock
        assert sock is not None
        family = self._family
        for _ in range(ACCEPT_BATCH):
            try:
                fd, _addr = sock._accept()  # type: ignore[attr-defined]  # accept, unwrapped
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: wait, do not spin
                log.warning("accept failed: %s", exc)
                self._pause_accepting()
                self.loop.call_later(ACCEPT_RETRY, self._resume_accepting)
                return
            conn = socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)
            self._next_conn += 1
            self.spawn(self.serve(conn, f"conn={self._next_conn}"), what="a user connection")

    def close(self) -> None:
        """Stop listening (the worker ends the connections)."""
        if self._sock is not None:
            self._pause_accepting()
            self._sock.close()

    # -- one connection --------------------------------------------------------------------
    async def serve(self, sock: socket.socket, label: str) -> None:
        """Handle one user connection to its end. Never raises (but for cancellation)."""
        caller = self.caller(sock)
        if caller.uid is not None:
            label = f"{label} {caller}"
        loop = self.loop
        try:
            _, conn = await loop.connect_accepted_socket(lambda: SocketEnd(loop), sock)
        except OSError as exc:
            log.debug("%s: connection lost before the handshake: %s", label, exc)
            sock.close()
            return
        hs = Handshake(require_auth=self.mode is AccessMode.CREDENTIALS,
                       prefer_auth=not caller.free)
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                req = await self._handshake(conn, hs, caller, label)
        except TimeoutError:
            log.info("%s: handshake not finished in %gs; closed", label, HANDSHAKE_TIMEOUT)
            req = None
        except HandshakeError as exc:
            log.info("%s: bad handshake: %s", label, exc)
            if exc.reply is not None:
                conn.send(hs.error_reply(exc.reply, str(exc)))
            req = None
        except OSError as exc:
            log.debug("%s: connection lost during the handshake: %s", label, exc)
            req = None
        if req is None:
            conn.close()
            return
        try:
            await self._proxy(conn, hs, req, f"{label} target={req.host}:{req.port}")
        except OSError as exc:
            log.debug("%s: user connection lost: %s", label, exc)
            conn.close()

    def caller(self, conn: socket.socket) -> Caller:
        """Who connected: looked up (once) where the access mode depends on it."""
        if self.mode is AccessMode.OPEN:
            return Caller(None, True)
        if self.mode is AccessMode.CREDENTIALS:
            return Caller(None, False)
        uid = tcp_peer_uid(conn)
        return Caller(uid, self.users.privileged(uid))

    async def _handshake(self, conn: SocketEnd, hs: Handshake, caller: Caller, label: str
                         ) -> TargetRequest | None:
        while True:
            event = hs.next_event()
            if event is None:
                data = await conn.recv()
                if not data:
                    log.debug("%s: closed during the handshake", label)
                    return None
                hs.receive_data(data)
            elif isinstance(event, Socks5Greeting):
                try:
                    answer = hs.select_method(event.methods)
                except HandshakeError:
                    conn.send(hs.no_acceptable_method())
                    raise
                conn.send(answer)
            elif isinstance(event, Socks5Auth):
                # Root and the group need none: whatever they offer is fine.
                ok = caller.free or self.credentials.check(event.username, event.password)
                caller.authenticated = ok
                conn.send(hs.auth_result(ok))
                if not ok:
                    self._refusals.warning(
                        ("auth", caller.uid), "%s: SOCKS5 authentication failed for user %s",
                        label, printable(event.username, 80))
                    return None
            else:
                return await self._check_request_auth(conn, hs, event, caller, label)

    async def _check_request_auth(self, conn: SocketEnd, hs: Handshake, req: TargetRequest,
                                  caller: Caller, label: str) -> TargetRequest | None:
        if caller.allowed:
            return req
        if req.kind is ProxyKind.HTTP:
            creds = req.http.credentials() if req.http else None
            if creds is not None and self.credentials.check(*creds):
                caller.authenticated = True
                return req
            why = "wrong credentials" if creds is not None else "no credentials"
            answer = http_auth_required()
        else:  # SOCKS5 without credentials: "not allowed by ruleset"; SOCKS4 has none
            why = "no credentials" if req.kind is ProxyKind.SOCKS5 else "SOCKS4 (no password)"
            answer = hs.error_reply(ReplyCode.NOT_ALLOWED)
        who = ("the connecting user is unknown" if caller.uid is None else
               f"uid {caller.uid} is neither root nor in group {self.cfg.group or '(none)'}")
        self._refusals.warning(("refused", caller.uid), "%s: refused %s: %s, %s", label,
                               req.kind.value, who, why)
        conn.send(answer)
        return None

    async def open_far(self, route: Route, command: Command, label: str
                       ) -> tuple[OpenAck, Stream | None]:
        """Open a stream and send PROXY-OPEN; the ACK and the stream (None on failure)."""
        try:
            stream = await self.link.open_stream(route.vmid, Entity.PROXY_CLIENT,
                                                 Entity.PROXY_SERVER, ProxyMessage.DATA)
        except LimitReached as exc:  # this VM (or every VM) is at its stream cap
            return OpenAck(ReplyCode.GENERAL_FAILURE, reason=str(exc)), None
        request = ProxyOpen(route.host, route.port, command)
        try:
            ack = await self.link.sync_send(route.vmid, request, OpenAck, stream=stream.id,
                                            timeout=self.cfg.connect_timeout + ACK_MARGIN)
        except RequestTimeout as exc:
            ack = OpenAck(ReplyCode.TTL_EXPIRED, reason=str(exc))
        except (NotConnectedError, UnknownVMError) as exc:  # the host mux's, by their codes
            ack = OpenAck(ReplyCode.NETWORK_UNREACHABLE, reason=str(exc))
        except TunnelError as exc:
            ack = OpenAck(ReplyCode.GENERAL_FAILURE, reason=str(exc))
        except ProtocolError as exc:
            ack = OpenAck(ReplyCode.GENERAL_FAILURE, reason=str(exc))
        if not ack.ok:
            if ack.reply is ReplyCode.TTL_EXPIRED:
                # the far side may yet connect: tell it to drop the connection
                await stream.reset("PROXY-OPEN-ACK never came")
            self.link.streams.forget(stream)
            return ack, None
        return ack, stream

    async def _proxy(self, conn: SocketEnd, hs: Handshake, req: TargetRequest,
                     label: str) -> None:
        try:
            route = await self.router.route(req.host, req.port)
        except RouteError as exc:
            log.info("%s: no route (%d): %s", label, exc.reply, exc)
            conn.send(hs.error_reply(exc.reply, str(exc)))
            conn.close()
            return
        label = f"vm={route.vmid} {label}"
        if req.command is Command.UDP:
            await self._udp(conn, hs, route, label)
            return
        ack, stream = await self.open_far(route, Command.CONNECT, label)
        if stream is None:
            log.info("%s: refused by the far side (%d %s): %s", label, ack.reply,
                     ack.reply.text, ack.reason)
            self.stats.refused(route.vmid)
            conn.send(hs.error_reply(ack.reply, ack.reason))
            conn.close()
            return
        self.stats.opened(stream)
        label = f"{label} stream={stream.id}"
        log.debug("%s: open", label)
        try:
            conn.send(hs.success_reply(ack.bound_host, ack.bound_port))
            first = hs.trailing
            if req.http is not None and not req.http.is_connect:
                first = req.http.forward_head() + first
            if first:
                await stream.write(first)
        except BaseException:
            await stream.reset("user connection lost")
            self.stats.closed(stream)
            conn.abort()
            raise
        try:
            await relay(conn, stream, label)
        finally:
            self.stats.closed(stream)

    async def _udp(self, conn: SocketEnd, hs: Handshake, route: Route, label: str) -> None:
        if self.role is Role.HOST:
            log.info("%s: UDP ASSOCIATE refused: offered inside VMs only", label)
            conn.send(hs.error_reply(ReplyCode.COMMAND_NOT_SUPPORTED))
            conn.close()
            return
        ack, stream = await self.open_far(route, Command.UDP, label)
        if stream is None:
            self.stats.refused(route.vmid)
            conn.send(hs.error_reply(ack.reply, ack.reason))
            conn.close()
            return
        self.stats.opened(stream)
        assoc = UdpAssociation(conn, stream, f"{label} stream={stream.id}")
        try:
            host, port = await assoc.open(conn.sockname[0])
            conn.send(hs.success_reply(host, port))
            await assoc.run()
        finally:
            self.stats.closed(stream)

    def describe(self) -> dict[str, Any]:
        return {"listen": self.cfg.listen, "access": self.mode.value}
