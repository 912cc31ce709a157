"""UDP ASSOCIATE on the proxy client's side (RFC 1928 section 7).

The user gets a UDP socket on the proxy's listen address. Datagrams from the user (the
first source address that sends one is the user's, and only loopback or the TCP control
connection's address may) carry a SOCKS5 UDP header naming the destination; they go into
the association's stream framed by protocol/proxy.py. Replies come back with the header
naming their source. The association lives as long as the TCP control connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from vmbusify.bus.streams import Stream, StreamReset
from vmbusify.errors import ProtocolError
from vmbusify.protocol.proxy import DatagramDecoder, HandshakeError, encode_datagram
from vmbusify.protocol.socks import parse_udp_request, udp_reply_header
from vmbusify.workers.proxy.relay import SocketEnd
from vmbusify.workers.proxy.udp import Receiver

log = logging.getLogger("vmbusify.proxy.udp")


class UdpAssociation:
    """One UDP ASSOCIATE: a UDP socket for the user, a stream to the far side."""

    def __init__(self, control: SocketEnd, stream: Stream, label: str) -> None:
        self.control = control
        self.stream = stream
        self.label = label
        self.user: tuple[str, int] | None = None
        self._allowed_ip = control.peername[0]
        self._transport: asyncio.DatagramTransport | None = None
        self._out: asyncio.Queue[bytes] = asyncio.Queue(maxsize=256)

    async def open(self, local_ip: str) -> tuple[str, int]:
        """Bind the user's UDP socket; the address to tell the user."""
        family = socket.AF_INET6 if ":" in local_ip else socket.AF_INET
        self._transport, _ = await self.control.loop.create_datagram_endpoint(
            lambda: Receiver(self.from_user), local_addr=(local_ip, 0), family=family)
        host, port = self._transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    def from_user(self, data: bytes, addr: Any) -> None:
        src = (str(addr[0]), int(addr[1]))
        if self.user is None:
            if src[0] != self._allowed_ip:
                return
            self.user = src
        elif src != self.user:
            return
        try:
            host, port, payload = parse_udp_request(data)
            self._out.put_nowait(encode_datagram(host, port, payload))
        except (HandshakeError, ProtocolError) as exc:
            log.debug("%s: datagram dropped: %s", self.label, exc)
        except asyncio.QueueFull:
            pass

    async def run(self) -> None:
        """Relay until the control connection closes; always ends the stream."""
        tasks = [asyncio.ensure_future(self._to_stream()),
                 asyncio.ensure_future(self._from_stream()),
                 asyncio.ensure_future(self.control.recv())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._transport is not None:
                self._transport.close()
            self.control.close()
            if self.stream.state.value not in ("reset", "closed"):
                await self.stream.reset("UDP association ended")

    async def _to_stream(self) -> None:
        while True:
            await self.stream.write(await self._out.get())

    async def _from_stream(self) -> None:
        decoder = DatagramDecoder()
        try:
            while True:
                chunk = await self.stream.read()
                if not chunk:
                    return
                for host, port, data in decoder.feed(chunk):
                    if self.user is not None and self._transport is not None:
                        self._transport.sendto(udp_reply_header(host, port) + data, self.user)
        except (StreamReset, ProtocolError) as exc:
            log.debug("%s: UDP association ended: %s", self.label, exc)
