"""The host's DNS forwarder on its subnet address (UDP and TCP port 53).

A VM asks ``100.77.0.1``; the forwarder relays the query unchanged to the host's own
resolvers (``[subnet] dns_upstream`` or the host's /etc/resolv.conf) and the first answer
back, so VMs see exactly what the host would (split DNS of a corporate VPN included). It
keeps no cache and parses nothing but the 2-byte query id it checks the answer against.

A VM is hostile (docs/security.md), and the subnet worker lets a packet in only from the
address leased to its VM, so the client's address names the VM. Each client may have
``per_client_queries`` queries and ``per_client_tcp`` TCP connections at once, and all
clients together ``MAX_PENDING`` queries and ``MAX_TCP`` connections; past a cap a UDP query is
dropped (the client retries) and a TCP connection closed at once, counted in ``refused``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from vmbusify.workers.base import Spawner

log = logging.getLogger(__name__)

DNS_PORT = 53
#: Queries in flight and TCP connections open, over every client (file descriptors: each
#: query holds an upstream socket).
MAX_PENDING = 256
MAX_TCP = 128
#: Seconds to wait for one upstream before trying the next.
UPSTREAM_TIMEOUT = 2.0
MAX_MESSAGE = 65535


def resolv_conf_servers(path: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The ``nameserver`` addresses of a resolv.conf (invalid lines skipped)."""
    servers = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                servers.append(str(ipaddress.ip_address(parts[1].split("%")[0])))
            except ValueError:
                continue
    return servers


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, forwarder: DnsForwarder) -> None:
        self.forwarder = forwarder
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.forwarder.on_udp_query(self, data, addr)


class DnsForwarder:
    """Answers DNS on the given addresses by asking ``upstreams`` in turn."""

    def __init__(self, listen: list[str], upstreams: list[str], port: int = DNS_PORT,
                 upstream_port: int = DNS_PORT, per_client_queries: int = 64,
                 per_client_tcp: int = 8, spawn: Spawner | None = None) -> None:
        """``spawn``: the worker's (vmbusify.workers.base), which logs a failed query."""
        self.listen = listen
        self._spawner = spawn
        self.upstreams = upstreams
        self.port = port
        self.upstream_port = upstream_port
        self.per_client_queries = per_client_queries
        self.per_client_tcp = per_client_tcp
        self.queries = 0
        self.failures = 0
        self.dropped = 0
        #: Queries and connections turned away at a cap, by client address.
        self.refused: dict[str, int] = {}
        self._pending: set[asyncio.Task[Any]] = set()
        self._queries_of: dict[str, int] = {}  # client address -> queries in flight
        self._tcp_of: dict[str, int] = {}  # client address -> TCP connections open
        self._transports: list[asyncio.BaseTransport] = []
        self._servers: list[asyncio.AbstractServer] = []

    async def start(self) -> None:
        """Listen on every address (UDP and TCP port 53)."""
        loop = asyncio.get_running_loop()
        for addr in self.listen:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpServer(self), local_addr=(addr, self.port))
            self._transports.append(transport)
            self._servers.append(await asyncio.start_server(self._on_tcp, addr, self.port))
        log.info("dns: answering on %s, forwarding to %s", ", ".join(self.listen),
                 ", ".join(self.upstreams) or "nobody (no upstream resolver)")

    async def close(self) -> None:
        for t in self._transports:
            t.close()
        for s in self._servers:
            s.close()
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None], client: str) -> None:
        """Run one query of ``client`` (counted against its cap until it ends)."""
        task = (self._spawner(coro, "", "a DNS query") if self._spawner is not None
                else asyncio.ensure_future(coro))
        self._pending.add(task)
        _take(self._queries_of, client)

        def done(t: asyncio.Task[Any]) -> None:
            self._pending.discard(t)
            _give(self._queries_of, client)

        task.add_done_callback(done)

    def _refuse(self, client: str) -> None:
        self.refused[client] = self.refused.get(client, 0) + 1
        if len(self.refused) > 4096:  # addresses come from peers: keep the table small
            self.refused.pop(next(iter(self.refused)))

    def _may_query(self, client: str) -> bool:
        """Whether one more query of ``client`` fits under its cap and the total."""
        if (len(self._pending) >= MAX_PENDING
                or self._queries_of.get(client, 0) >= self.per_client_queries):
            self._refuse(client)
            return False
        return True

    def on_udp_query(self, server: _UdpServer, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 12:
            self.dropped += 1
            return
        if not self._may_query(addr[0]):
            self.dropped += 1
            return
        self.queries += 1
        self._spawn(self._answer_udp(server, data, addr), addr[0])

    async def _answer_udp(self, server: _UdpServer, query: bytes, addr: tuple[str, int]) -> None:
        answer = await self._ask_udp(query)
        if answer is None:
            self.failures += 1
            return
        if server.transport is not None and not server.transport.is_closing():
            server.transport.sendto(answer, addr)

    async def _ask_udp(self, query: bytes) -> bytes | None:
        loop = asyncio.get_running_loop()
        for upstream in self.upstreams:
            family = socket.AF_INET6 if ":" in upstream else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                try:
                    sock.connect((upstream, self.upstream_port))
                    await loop.sock_sendall(sock, query)
                    deadline = loop.time() + UPSTREAM_TIMEOUT
                    while True:
                        answer = await asyncio.wait_for(
                            loop.sock_recv(sock, MAX_MESSAGE), deadline - loop.time())
                        if answer[:2] == query[:2]:  # same query id: ours
                            return answer
                except (OSError, TimeoutError) as exc:
                    log.debug("dns: upstream %s failed: %s", upstream, exc)
        return None

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if peer else "?"
        if (sum(self._tcp_of.values()) >= MAX_TCP
                or self._tcp_of.get(client, 0) >= self.per_client_tcp):
            self._refuse(client)
            writer.close()
            return
        _take(self._tcp_of, client)
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), 10.0)
                query = await asyncio.wait_for(reader.readexactly(struct.unpack(">H", head)[0]),
                                               10.0)
                if not self._may_query(client):
                    return
                self.queries += 1
                _take(self._queries_of, client)
                try:
                    answer = await self._ask_tcp(head + query)
                finally:
                    _give(self._queries_of, client)
                if answer is None:
                    self.failures += 1
                    return
                writer.write(answer)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            _give(self._tcp_of, client)
            writer.close()

    async def _ask_tcp(self, message: bytes) -> bytes | None:
        for upstream in self.upstreams:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(upstream, self.upstream_port), UPSTREAM_TIMEOUT)
            except (OSError, TimeoutError):
                continue
            try:
                writer.write(message)
                head = await asyncio.wait_for(reader.readexactly(2), UPSTREAM_TIMEOUT)
                body = await asyncio.wait_for(
                    reader.readexactly(struct.unpack(">H", head)[0]), UPSTREAM_TIMEOUT)
                return head + body
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                continue
            finally:
                writer.close()
        return None


def _take(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def _give(counts: dict[str, int], key: str) -> None:
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)
