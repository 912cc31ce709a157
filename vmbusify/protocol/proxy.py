"""The proxy's tunnel messages: PROXY-OPEN, PROXY-OPEN-ACK, PROXY-DATA, PROXY-CLOSE (docs/proxy.md,
"On the tunnel").

Theory of operation
-------------------
One proxied connection is one stream (vmbusify.bus.streams) between the proxy client that
accepted the user's socket and the proxy server on the other end of the tunnel::

    PROXY-OPEN      REQUEST  client -> server  message_id OPEN, header.stream = the proxy-id,
                                               payload msgpack ProxyOpen
    PROXY-OPEN-ACK  ACK of that REQUEST         payload msgpack OpenAck (reply code, bound
                                               address); sent only once the far side's
                                               connect() finished, so the code is the outcome
    PROXY-DATA      DATA     both ways          message_id DATA, raw bytes, credit-windowed
    PROXY-CLOSE     DATA     both ways          flag EOF: the sender's side shut its write half
                                               (half-close); flag RESET: abort both ways

A proxied connection's id is its stream id: the mux and both workers key the connection by
(vmid, peer entity, stream id). UDP ASSOCIATE uses the same stream with ``command`` UDP; its
DATA carries datagrams framed by ``encode_datagram`` (a stream may split a frame across
packages, so the receiver reassembles with ``DatagramDecoder``).

Nothing here does I/O.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from vmbusify.errors import LocalProtocolError, RemoteProtocolError
from vmbusify.protocol.entities import Entity
from vmbusify.protocol.message import Message, body_map, optional

#: Longest host name a proxy message may carry (RFC 1035 limit; SOCKS5 allows 255).
MAX_HOST = 255


class ProxyMessage(IntEnum):
    """Message ids of Entity.PROXY_CLIENT / PROXY_SERVER."""

    #: REQUEST client -> server: connect to a target (payload ProxyOpen).
    OPEN = 1
    #: The ACK of OPEN (the ACK package repeats OPEN's message id; payload OpenAck).
    OPEN_ACK = 2
    #: DATA packages of a proxied connection, both ways.
    DATA = 3
    #: Not a package of its own: a DATA package with flag EOF (half-close) or RESET (abort).
    CLOSE = 4


class Command(IntEnum):
    """What the client asks the far side to do (SOCKS5 CMD values)."""

    CONNECT = 1
    BIND = 2
    UDP = 3


class ReplyCode(IntEnum):
    """RFC 1928 section 6 reply codes; the proxy client maps them to SOCKS4 and HTTP too."""

    #: The far side connected.
    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    #: Refused by the egress policy (ruleset).
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    #: Host unreachable, or the name does not resolve.
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    #: Connect timed out ("TTL expired" in RFC 1928).
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8

    @property
    def text(self) -> str:
        """A short human reason, for logs, HTTP bodies and curl users."""
        return _TEXT[self]


_TEXT = {
    ReplyCode.SUCCEEDED: "succeeded",
    ReplyCode.GENERAL_FAILURE: "general failure",
    ReplyCode.NOT_ALLOWED: "not allowed by the egress policy",
    ReplyCode.NETWORK_UNREACHABLE: "network unreachable",
    ReplyCode.HOST_UNREACHABLE: "host unreachable or name not found",
    ReplyCode.CONNECTION_REFUSED: "connection refused",
    ReplyCode.TTL_EXPIRED: "connect timed out",
    ReplyCode.COMMAND_NOT_SUPPORTED: "command not supported",
    ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
}

_ERRNO_REPLY = {
    errno.ECONNREFUSED: ReplyCode.CONNECTION_REFUSED,
    errno.ENETUNREACH: ReplyCode.NETWORK_UNREACHABLE,
    errno.ENETDOWN: ReplyCode.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: ReplyCode.HOST_UNREACHABLE,
    errno.EHOSTDOWN: ReplyCode.HOST_UNREACHABLE,
    errno.EADDRNOTAVAIL: ReplyCode.HOST_UNREACHABLE,
    errno.ETIMEDOUT: ReplyCode.TTL_EXPIRED,
    errno.EAFNOSUPPORT: ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED,
    errno.EACCES: ReplyCode.NOT_ALLOWED,
    errno.EPERM: ReplyCode.NOT_ALLOWED,
}


def reply_for_errno(code: int | None) -> ReplyCode:
    """The reply code a failed connect() with ``errno`` earns (general failure if unknown)."""
    return _ERRNO_REPLY.get(code or 0, ReplyCode.GENERAL_FAILURE)


def _check_target(host: Any, port: Any, what: str) -> tuple[str, int]:
    if not isinstance(host, str) or not 0 < len(host) <= MAX_HOST:
        raise RemoteProtocolError(f"{what}: host missing, empty or longer than {MAX_HOST}")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise RemoteProtocolError(f"{what}: port must be 0..65535")
    return host, port


@dataclass(frozen=True, slots=True)
class ProxyOpen(Message, entity=Entity.PROXY_CLIENT, message_id=ProxyMessage.OPEN,
                name="PROXY-OPEN"):
    """PROXY-OPEN: connect to ``host`` (an IP literal or a name resolved on the far side)."""

    host: str
    port: int
    command: Command = Command.CONNECT

    def to_body(self) -> dict[str, Any]:
        """The msgpack-ready body (WorkerLink.sync_send serializes it)."""
        if not 0 < len(self.host) <= MAX_HOST or not 0 <= self.port <= 65535:
            raise LocalProtocolError(f"bad proxy target {self.host!r}:{self.port}")
        return {"host": self.host, "port": self.port, "cmd": int(self.command)}

    @classmethod
    def from_body(cls, body: Any) -> ProxyOpen:
        """Validate a received body; raises RemoteProtocolError."""
        d = body_map(body, cls.NAME)
        host, port = _check_target(d.get("host"), d.get("port"), cls.NAME)
        cmd = optional(d, "cmd", int, cls.NAME, Command.CONNECT)
        try:
            command = Command(cmd)
        except ValueError:
            raise RemoteProtocolError(f"{cls.NAME}: unknown command {cmd!r}") from None
        return cls(host, port, command)


@dataclass(frozen=True, slots=True)
class OpenAck(Message, entity=Entity.PROXY_SERVER, message_id=ProxyMessage.OPEN,
              name="PROXY-OPEN-ACK"):
    """PROXY-OPEN-ACK (the ACK's payload): the far side's outcome and the address it
    connected from."""

    reply: ReplyCode
    bound_host: str = "0.0.0.0"
    bound_port: int = 0
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.reply is ReplyCode.SUCCEEDED

    def to_body(self) -> dict[str, Any]:
        """The msgpack-ready body."""
        return {"reply": int(self.reply), "host": self.bound_host, "port": self.bound_port,
                "reason": self.reason[:500]}

    @classmethod
    def from_body(cls, body: Any) -> OpenAck:
        """Validate a received body; raises RemoteProtocolError."""
        d = body_map(body, cls.NAME)
        raw = d.get("reply")
        try:
            reply = ReplyCode(raw if isinstance(raw, int) and not isinstance(raw, bool) else -1)
        except ValueError:
            raise RemoteProtocolError(f"{cls.NAME}: unknown reply code {raw!r}") from None
        host, port = _check_target(d.get("host"), d.get("port"), cls.NAME)
        return cls(reply, host, port, optional(d, "reason", str, cls.NAME, "")[:500])


class HandshakeError(RemoteProtocolError):
    """A user's proxy handshake is malformed or asks for something refused."""

    def __init__(self, message: str, reply: ReplyCode | None = ReplyCode.GENERAL_FAILURE) -> None:
        super().__init__(message)
        #: What to answer before closing; None: close without an answer.
        self.reply = reply


# -- UDP datagrams inside a stream ------------------------------------------------------------
#
#   u16 frame length (of what follows) | u8 host length | host (ASCII) | u16 port | data
#
_U16 = struct.Struct(">H")
#: Largest UDP payload carried (an IPv4 UDP datagram's maximum payload).
MAX_DATAGRAM = 65507


def encode_datagram(host: str, port: int, data: bytes) -> bytes:
    """One datagram to/from ``host:port`` as stream bytes."""
    raw = host.encode("ascii", "strict") if host.isascii() else b""
    if not raw or len(raw) > MAX_HOST or not 0 <= port <= 65535 or len(data) > MAX_DATAGRAM:
        raise LocalProtocolError(f"cannot frame a datagram for {host!r}:{port}")
    body = bytes((len(raw),)) + raw + _U16.pack(port) + data
    return _U16.pack(len(body)) + body


class DatagramDecoder:
    """Reassembles framed datagrams from stream chunks (sans-I/O, bounded to one frame)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[tuple[str, int, bytes]]:
        """Add stream bytes; returns every whole (host, port, data) now available."""
        self._buf += chunk
        out: list[tuple[str, int, bytes]] = []
        buf = self._buf
        while len(buf) >= 2:
            (n,) = _U16.unpack_from(buf)
            if len(buf) < 2 + n:
                break
            frame = bytes(buf[2:2 + n])
            del buf[:2 + n]
            if n < 3 or frame[0] == 0 or 1 + frame[0] + 2 > n:
                raise RemoteProtocolError("malformed datagram frame")
            hl = frame[0]
            try:
                host = frame[1:1 + hl].decode("ascii")
            except UnicodeDecodeError:
                raise RemoteProtocolError("datagram host is not ASCII") from None
            (port,) = _U16.unpack_from(frame, 1 + hl)
            out.append((host, port, frame[3 + hl:]))
        return out
