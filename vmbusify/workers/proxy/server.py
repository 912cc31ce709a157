"""The proxy server (docs/proxy.md): answers PROXY-OPEN by connecting to the target.

Resolve, check the egress policy on every resolved address, connect, and only then answer
PROXY-OPEN-ACK, so the reply code is the real outcome. The stream is accepted only on
success; a refusal is logged with the VM and the rule that refused it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable
from typing import Any

from vmbusify.bus.frames import RouteKind
from vmbusify.bus.link import Inbound, WorkerLink
from vmbusify.config import Config, ProxyConfig, Role
from vmbusify.errors import ProtocolError
from vmbusify.logs import printable
from vmbusify.protocol.entities import Entity
from vmbusify.protocol.proxy import (
    Command,
    OpenAck,
    ProxyMessage,
    ProxyOpen,
    ReplyCode,
    reply_for_errno,
)
from vmbusify.runtime import UsesLoop
from vmbusify.workers.base import Spawner
from vmbusify.workers.proxy.policy import EgressPolicy
from vmbusify.workers.proxy.relay import SocketEnd, relay
from vmbusify.workers.proxy.resolve import NameNotFound, Resolver
from vmbusify.workers.proxy.stats import ConnStats
from vmbusify.workers.proxy.udp import UdpRelay

log = logging.getLogger("vmbusify.proxy.server")


class ProxyServer(UsesLoop):
    """Connects to targets on behalf of the peer's proxy client."""

    def __init__(self, link: WorkerLink, cfg: ProxyConfig, role: Role, stats: ConnStats,
                 config: Config | None = None, spawn: Spawner | None = None) -> None:
        """``config``: the whole endpoint's (its ``[subnet]`` and ``[[vms]]`` are what the
        host's policy keeps VMs apart by; None: the subnet's defaults, no VM addresses).
        ``spawn``: the worker's (vmbusify.workers.base), which supervises each relay."""
        self.link = link
        self.spawn: Spawner = spawn or self._link_spawn
        self.cfg = cfg
        self.policy = EgressPolicy.from_config(cfg, role, config.subnet if config else None,
                                               config.vms if config else ())
        self.resolver = Resolver(cfg.hosts_file)
        self.stats = stats

    def _link_spawn(self, coro: Awaitable[Any], vmid: str = "", what: str = "request"
                    ) -> asyncio.Task[Any]:
        return self.link.spawn(coro, vmid, what)  # supervised by the link alone

    def install(self) -> None:
        """Register the routes: PROXY-OPEN requests and the client's PROXY-DATA."""
        self.link.route(Entity.PROXY_CLIENT, ProxyMessage.OPEN, self.on_open, RouteKind.REQUEST)
        self.link.route(Entity.PROXY_CLIENT, ProxyMessage.DATA, None, RouteKind.STREAM)

    async def on_open(self, msg: Inbound) -> dict[str, Any]:
        """Handle one PROXY-OPEN; the return value is the PROXY-OPEN-ACK."""
        label = f"vm={msg.vmid} stream={msg.stream}"
        try:
            req = ProxyOpen.from_body(msg.body)
        except ProtocolError as exc:
            log.warning("%s: bad PROXY-OPEN: %s", label, exc)
            self.stats.refused(msg.vmid)
            return OpenAck(ReplyCode.GENERAL_FAILURE, reason=str(exc)).to_body()
        label += f" target={req.host}:{req.port}"
        if req.command is Command.UDP:
            return await self._open_udp(msg, label)
        if req.command is not Command.CONNECT:
            return self._refuse(msg.vmid, label, ReplyCode.COMMAND_NOT_SUPPORTED,
                                f"command {req.command.name} not supported")
        ack, end = await self.connect(req.host, req.port, label)
        if end is None:
            self.stats.refused(msg.vmid)
            return ack.to_body()
        try:
            stream = self.link.streams.accept(msg.vmid, Entity.PROXY_SERVER, msg.package,
                                              ProxyMessage.DATA)
        except ProtocolError as exc:
            end.close()
            return self._refuse(msg.vmid, label, ReplyCode.GENERAL_FAILURE, str(exc))
        except BaseException:
            end.abort()
            raise
        self.stats.opened(stream)
        log.debug("%s: connected", label)
        self.spawn(self._relay(end, stream, label), msg.vmid, "relaying")
        return ack.to_body()

    async def _relay(self, end: SocketEnd, stream: Any, label: str) -> None:
        try:
            await relay(end, stream, label)
        finally:
            self.stats.closed(stream)

    def _refuse(self, vmid: str, label: str, code: ReplyCode, reason: str) -> dict[str, Any]:
        log.info("%s: refused (%d %s): %s", label, code, code.text, reason)
        self.stats.refused(vmid)
        return OpenAck(code, reason=reason).to_body()

    async def allowed_addresses(self, host: str, port: int, label: str,
                                kind: int = socket.SOCK_STREAM, quiet: bool = False
                                ) -> tuple[list[str], OpenAck]:
        """Resolved addresses the policy allows, or none and the refusal to send.

        ``quiet``: log refusals at debug level only (the caller logs them its own way).
        """
        level = logging.DEBUG if quiet else logging.WARNING
        try:
            addrs = await self.resolver.resolve(host, port, kind)
        except (NameNotFound, ValueError, OSError) as exc:
            # ValueError/OSError: a name getaddrinfo cannot take (a NUL byte, ...): the
            # peer's bad input, answered like a name that does not resolve.
            log.log(min(level, logging.INFO), "%s: refused (4): %s", label, printable(exc))
            return [], OpenAck(ReplyCode.HOST_UNREACHABLE, reason=printable(exc))
        allowed: list[str] = []
        last = ""
        for addr in addrs:
            decision = self.policy.check(addr, port)
            if decision.allowed:
                allowed.append(addr)
            else:
                log.log(level, "%s: egress refused by policy: %s", label, decision.reason)
                last = decision.reason
        if not allowed:
            return [], OpenAck(ReplyCode.NOT_ALLOWED, reason=last)
        return allowed, OpenAck(ReplyCode.SUCCEEDED)

    async def connect(self, host: str, port: int, label: str
                      ) -> tuple[OpenAck, SocketEnd | None]:
        """Resolve, check and connect; the ACK to send and the connection, a protocol of
        the loop's transport (None on failure)."""
        addrs, refusal = await self.allowed_addresses(host, port, label)
        if not addrs:
            return refusal, None
        loop = self.loop
        ack = OpenAck(ReplyCode.GENERAL_FAILURE, reason="no address to try")
        for addr in addrs:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            try:
                # The loop makes the socket: that fails where the host has no IPv6
                # (EAFNOSUPPORT) or is out of descriptors, and a bad address is the peer's
                # input. A timeout closes the half-made connection.
                async with asyncio.timeout(self.cfg.connect_timeout):
                    _, end = await loop.create_connection(lambda: SocketEnd(loop), addr, port,
                                                          family=family)
                bound = end.sockname
            except TimeoutError:
                ack = OpenAck(ReplyCode.TTL_EXPIRED,
                              reason=f"connect to {addr}:{port} timed out")
                continue
            except OSError as exc:
                why = os.strerror(exc.errno) if exc.errno else str(exc)
                ack = OpenAck(reply_for_errno(exc.errno), reason=f"connect to {addr}:{port}: {why}")
                continue
            except (ValueError, OverflowError) as exc:
                ack = OpenAck(ReplyCode.GENERAL_FAILURE,
                              reason=f"connect to {addr}:{port}: {printable(exc)}")
                continue
            return OpenAck(ReplyCode.SUCCEEDED, bound[0], bound[1]), end
        log.info("%s: failed (%d %s): %s", label, ack.reply, ack.reply.text, ack.reason)
        return ack, None

    async def _open_udp(self, msg: Inbound, label: str) -> dict[str, Any]:
        try:
            stream = self.link.streams.accept(msg.vmid, Entity.PROXY_SERVER, msg.package,
                                              ProxyMessage.DATA)
        except ProtocolError as exc:  # e.g. a stream id already open: the peer's fault
            return self._refuse(msg.vmid, label, ReplyCode.GENERAL_FAILURE, str(exc))
        udp = UdpRelay(self, stream, label)
        try:
            await udp.start()
        except OSError as exc:
            await stream.reset(str(exc))
            return self._refuse(msg.vmid, label, reply_for_errno(exc.errno), str(exc))
        self.stats.opened(stream)
        self.spawn(self._run_udp(udp, stream), msg.vmid, "relaying UDP")
        return OpenAck(ReplyCode.SUCCEEDED).to_body()

    async def _run_udp(self, udp: UdpRelay, stream: Any) -> None:
        try:
            await udp.run()
        finally:
            self.stats.closed(stream)
