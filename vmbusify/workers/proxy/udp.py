"""UDP ASSOCIATE on the proxy server's side: datagrams framed inside one stream.

The client frames each datagram with its destination (protocol/proxy.py encode_datagram);
this end resolves and checks each destination against the egress policy, sends it from one
UDP socket per address family, and frames replies back with their source. Only replies from
an address:port this association sent to are passed back (like a port-restricted NAT).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any, Protocol

from vmbusify.bus.streams import Stream, StreamReset
from vmbusify.errors import ProtocolError
from vmbusify.protocol.proxy import DatagramDecoder, OpenAck, encode_datagram

log = logging.getLogger("vmbusify.proxy.udp")

#: Destinations one association may talk to (bounds the peer table).
MAX_PEERS = 1024


class EgressCheck(Protocol):
    """What an association asks of the proxy server (``ProxyServer`` is one): the addresses
    the egress policy allows for a destination. A protocol, so this module need not import
    the server, which imports it."""

    async def allowed_addresses(self, host: str, port: int, label: str,
                                kind: int = ..., quiet: bool = ...
                                ) -> tuple[list[str], OpenAck]:
        """Resolved addresses the policy allows, or none and the refusal to send."""
        ...


class Receiver(asyncio.DatagramProtocol):
    """Hands every datagram received to a callback(data, addr)."""

    def __init__(self, callback: Callable[[bytes, Any], None]) -> None:
        self.callback = callback

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.callback(data, addr)


class UdpRelay:
    """One UDP association on the server side."""

    def __init__(self, server: EgressCheck, stream: Stream, label: str) -> None:
        self.server = server
        self.stream = stream
        self.label = label
        self._transports: dict[int, asyncio.DatagramTransport] = {}
        self._peers: set[tuple[str, int]] = set()
        #: Destinations refused so far: each is logged once per association, not per datagram
        #: (a program retrying a forbidden address must not flood the log).
        self._refused: set[tuple[str, int]] = set()
        self.refused_datagrams = 0
        self._out: asyncio.Queue[bytes] = asyncio.Queue(maxsize=256)

    async def start(self) -> None:
        """Open the IPv4 socket now (so a failure is reported in the ACK)."""
        await self._transport(socket.AF_INET)

    async def _transport(self, family: int) -> asyncio.DatagramTransport:
        t = self._transports.get(family)
        if t is None:
            loop = asyncio.get_running_loop()
            local = ("0.0.0.0", 0) if family == socket.AF_INET else ("::", 0)
            t, _ = await loop.create_datagram_endpoint(lambda: Receiver(self.from_target),
                                                       local_addr=local, family=family)
            self._transports[family] = t
        return t

    def from_target(self, data: bytes, addr: Any) -> None:
        host, port = str(addr[0]).split("%")[0], int(addr[1])
        if (host, port) not in self._peers:
            return
        try:
            self._out.put_nowait(encode_datagram(host, port, data))
        except asyncio.QueueFull:
            pass  # UDP: dropped under back-pressure

    async def run(self) -> None:
        """Relay until the client ends the association."""
        writer = asyncio.ensure_future(self._write_loop())
        try:
            decoder = DatagramDecoder()
            while True:
                chunk = await self.stream.read()
                if not chunk:
                    break
                for host, port, data in decoder.feed(chunk):
                    await self._send(host, port, data)
        except (StreamReset, ProtocolError) as exc:
            log.debug("%s: UDP association ended: %s", self.label, exc)
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            for t in self._transports.values():
                t.close()
            if self.refused_datagrams:
                log.info("%s: UDP association ended; %d datagrams refused", self.label,
                         self.refused_datagrams)
            if self.stream.state.value not in ("reset", "closed"):
                await self.stream.reset("UDP association ended")

    async def _send(self, host: str, port: int, data: bytes) -> None:
        label = f"{self.label} udp={host}:{port}"
        addrs, refusal = await self.server.allowed_addresses(host, port, label,
                                                             socket.SOCK_DGRAM, quiet=True)
        if not addrs:
            self.refused_datagrams += 1
            if (host, port) not in self._refused and len(self._refused) < MAX_PEERS:
                self._refused.add((host, port))
                log.warning("%s: datagrams refused (%d %s): %s (logged once per destination "
                            "and association)", label, refusal.reply, refusal.reply.text,
                            refusal.reason)
            return
        addr = addrs[0]
        if len(self._peers) >= MAX_PEERS and (addr, port) not in self._peers:
            log.warning("%s: too many UDP destinations; datagram dropped", label)
            return
        self._peers.add((addr, port))
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        try:
            (await self._transport(family)).sendto(data, (addr, port))
        except OSError as exc:
            log.debug("%s: sendto failed: %s", label, exc)

    async def _write_loop(self) -> None:
        while True:
            frame = await self._out.get()
            await self.stream.write(frame)
