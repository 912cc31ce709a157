"""The client half of WebSocket framing (RFC 6455), sans-I/O and standard library only.

vmbusifyexec speaks it to the command listener (whose server half is aiohttp's). Only what a
client needs: the handshake key and its expected answer, masked frames out, frames in
(incremental, bounded), control frames (ping, pong, close). No extensions, no compression.
"""

from __future__ import annotations

import os
import struct
from binascii import b2a_base64  # base64 itself imports re: ~1 ms of vmbusifyexec's start
from enum import IntEnum

from vmbusify.errors import RemoteProtocolError

# vmbusifyexec imports this module and starts once per command: hashlib would load OpenSSL
# (~2 ms) for one SHA-1 that CPython's built-in module does as well.
try:
    from _sha1 import sha1
except ImportError:  # pragma: no cover - a Python built without it
    from hashlib import sha1

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Largest frame payload accepted from the server.
MAX_FRAME = 16 << 20


class Opcode(IntEnum):
    """RFC 6455 section 5.2 opcodes."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


def handshake_key() -> str:
    """A fresh Sec-WebSocket-Key."""
    return b2a_base64(os.urandom(16), newline=False).decode()


def expected_accept(key: str) -> str:
    """The Sec-WebSocket-Accept a server must answer ``key`` with (RFC 6455 section 4.2.2)."""
    return b2a_base64(sha1(key.encode() + _GUID).digest(), newline=False).decode()


def mask(payload: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``key`` (one big-integer XOR: C speed, no loop)."""
    n = len(payload)
    if not n:
        return b""
    keystream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(keystream, "little")
            ).to_bytes(n, "little")


def encode_frame(opcode: Opcode, payload: bytes | bytearray | memoryview = b"",
                 masked: bool = True) -> bytes:
    """One final frame; clients must mask (``masked=True``), servers must not."""
    n = len(payload)
    head = bytearray([0x80 | opcode])
    bit = 0x80 if masked else 0
    if n < 126:
        head.append(bit | n)
    elif n < 1 << 16:
        head.append(bit | 126)
        head += struct.pack(">H", n)
    else:
        head.append(bit | 127)
        head += struct.pack(">Q", n)
    if not masked:
        return bytes(head) + bytes(payload)
    key = os.urandom(4)
    return bytes(head) + key + mask(payload, key)


class Frame:
    """One received frame (a plain class: vmbusifyexec does not import dataclasses)."""

    __slots__ = ("fin", "opcode", "payload")

    def __init__(self, opcode: Opcode, fin: bool, payload: bytes) -> None:
        self.opcode = opcode
        self.fin = fin
        self.payload = payload

    def __repr__(self) -> str:
        return f"Frame({self.opcode!r}, fin={self.fin}, {len(self.payload)} bytes)"


class FrameDecoder:
    """Incremental parser of frames from a server (h11 style: feed bytes, pull frames)."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0  # start of the first unparsed byte: consumed bytes go at the next feed

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes read from the server."""
        if self._pos:
            del self._buf[:self._pos]  # one move per feed, not one per frame
            self._pos = 0
        self._buf += data

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None when more bytes are needed."""
        buf, at = self._buf, self._pos
        if len(buf) - at < 2:
            return None
        b0, b1 = buf[at], buf[at + 1]
        if b0 & 0x70:
            raise RemoteProtocolError("WebSocket frame with reserved bits set")
        try:
            opcode = Opcode(b0 & 0x0F)
        except ValueError:
            raise RemoteProtocolError(f"unknown WebSocket opcode {b0 & 0x0F}") from None
        n, pos = b1 & 0x7F, at + 2
        if n == 126:
            if len(buf) < at + 4:
                return None
            n, pos = struct.unpack_from(">H", buf, at + 2)[0], at + 4
        elif n == 127:
            if len(buf) < at + 10:
                return None
            n, pos = struct.unpack_from(">Q", buf, at + 2)[0], at + 10
        if n > self.max_frame:
            raise RemoteProtocolError(f"WebSocket frame of {n} bytes exceeds {self.max_frame}")
        key = b""
        if b1 & 0x80:
            if len(buf) < pos + 4:
                return None
            key, pos = bytes(buf[pos:pos + 4]), pos + 4
        end = pos + n
        if len(buf) < end:
            return None
        with memoryview(buf) as view:
            payload = bytes(view[pos:end])  # one copy
        self._pos = end
        if key:
            payload = mask(payload, key)
        return Frame(opcode, bool(b0 & 0x80), payload)

    @property
    def buffered(self) -> int:
        """Bytes held that do not form a whole frame yet."""
        return len(self._buf) - self._pos


def close_payload(payload: bytes) -> tuple[int, str]:
    """(code, reason) of a CLOSE frame (1005, "" when it carries none)."""
    if len(payload) < 2:
        return 1005, ""
    return struct.unpack(">H", payload[:2])[0], payload[2:].decode("utf-8", "replace")
