"""The vmbus package: the tunnel's unit of transfer, and its incremental codec.

Theory of operation
-------------------
Everything that crosses a tunnel is a *vmbus package*: a fixed 24-byte header followed by
``length`` bytes of payload (spec section 4.1). All integers are big-endian (network order)::

    offset size field        meaning
    0      4    sig          0x564D4255 ("VMBU"): marks a package start
    4      1    version      protocol version (PROTOCOL_VERSION)
    5      1    type         PackageType
    6      2    flags        PackageFlag bits
    8      2    entity       Entity code of the *sending* application entity
    10     4    id           package counter of the sender; an ACK repeats its request's id
    14     2    message_id   what the message is, within its entity
    16     4    stream       stream id, 0 for messages outside any stream
    20     4    length       payload length in bytes, at most the decoder's max_payload

This module knows nothing of sockets: ``PackageDecoder.receive_data()`` takes bytes from any
source and ``next_package()`` hands back whole packages, as h11 does for HTTP. Every check
happens at the header, so a hostile length is refused before any payload is buffered and a
decoder never holds more than one header plus one maximal payload plus the last chunk fed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from vmbusify.errors import LocalProtocolError, RemoteProtocolError

SIGNATURE = 0x564D4255
PROTOCOL_VERSION = 1
HEADER = struct.Struct(">IBBHHIHII")
HEADER_SIZE = HEADER.size  # 24
#: Default and hard ceiling for one package's payload.
DEFAULT_MAX_PAYLOAD = 1 << 20
MAX_PAYLOAD_LIMIT = 16 << 20
MAX_ID = 0xFFFFFFFF
#: A payload: bytes, or (on the mux's zero-copy path) a view of a received chunk.
Payload = bytes | memoryview


class PackageType(IntEnum):
    """What a package is for."""

    #: One-way application message (the spec's async_send).
    MESSAGE = 1
    #: Application message that wants an ACK carrying the reply (sync_send).
    REQUEST = 2
    #: The reply to a REQUEST; ``id`` is the request's id.
    ACK = 3
    #: Bytes of a stream; payload is raw, never msgpack.
    DATA = 4
    #: Flow-control credit for a stream; payload is a 4-byte increment.
    WINDOW = 5


class PackageFlag(IntFlag):
    """Per-package flag bits."""

    NONE = 0
    #: DATA: the sender will send no more bytes on this stream (half-close).
    EOF = 1
    #: DATA: the stream is aborted in both directions; payload may carry a reason.
    RESET = 2
    #: ACK: the request failed; the payload is an error message.
    ERROR = 4


_KNOWN_FLAGS = int(PackageFlag.EOF | PackageFlag.RESET | PackageFlag.ERROR)
_TYPES = frozenset(int(t) for t in PackageType)


@dataclass(slots=True, frozen=True)
class Package:
    """One vmbus package. ``entity`` is the sender's Entity code (an int on the wire)."""

    type: PackageType
    entity: int
    message_id: int
    id: int = 0
    stream: int = 0
    flags: PackageFlag = PackageFlag.NONE
    payload: Payload = b""

    def header(self) -> bytes:
        """The 24-byte header of this package (payload not included)."""
        return encode_header(
            self.type, self.entity, self.message_id, self.id, self.stream, self.flags,
            len(self.payload),
        )

    def encode(self) -> bytes:
        """Header and payload as one bytes object."""
        return self.header() + bytes(self.payload)


def encode_header(
    ptype: int, entity: int, message_id: int, pid: int, stream: int, flags: int, length: int,
) -> bytes:
    """Pack a header; raises LocalProtocolError for a field out of range."""
    try:
        return HEADER.pack(
            SIGNATURE, PROTOCOL_VERSION, ptype, flags, entity, pid, message_id, stream, length
        )
    except struct.error as exc:
        raise LocalProtocolError(f"cannot encode package header: {exc}") from None


@dataclass(slots=True, frozen=True)
class Header:
    """A decoded header, before its payload has arrived."""

    type: PackageType
    flags: PackageFlag
    entity: int
    id: int
    message_id: int
    stream: int
    length: int


def decode_header(data: bytes | bytearray | memoryview, max_payload: int) -> Header:
    """Unpack and validate a 24-byte header; raises RemoteProtocolError if it is invalid."""
    sig, version, ptype, flags, entity, pid, message_id, stream, length = HEADER.unpack_from(data)
    if sig != SIGNATURE:
        raise RemoteProtocolError(f"bad signature 0x{sig:08x} (expected 0x{SIGNATURE:08x})")
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(f"unsupported protocol version {version}")
    if ptype not in _TYPES:
        raise RemoteProtocolError(f"unknown package type {ptype}")
    if flags & ~_KNOWN_FLAGS:
        raise RemoteProtocolError(f"unknown flag bits 0x{flags:04x}")
    if length > max_payload:
        raise RemoteProtocolError(f"payload length {length} exceeds the maximum {max_payload}")
    return Header(PackageType(ptype), PackageFlag(flags), entity, pid, message_id, stream, length)


class PackageDecoder:
    """Incremental, bounded parser of a byte stream into Packages (sans-I/O).

    Feed bytes with ``receive_data`` and drain with ``next_package`` until it returns None.
    After a RemoteProtocolError the decoder is dead: the connection must be closed.

    With ``zero_copy`` a package lying whole inside one immutable chunk fed in gets a
    memoryview of that chunk as its payload instead of a copy (the mux's data path hands it
    straight to ZeroMQ); only bytes that straddle chunks are copied into an internal buffer.
    """

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD, zero_copy: bool = False) -> None:
        if not 0 < max_payload <= MAX_PAYLOAD_LIMIT:
            raise LocalProtocolError(f"max_payload must be in 1..{MAX_PAYLOAD_LIMIT}")
        self.max_payload = max_payload
        self.zero_copy = zero_copy
        self._buf = bytearray()          # bytes that straddle chunks
        self._chunk = memoryview(b"")    # the unparsed rest of the last immutable chunk
        self._header: Header | None = None
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole package."""
        return len(self._buf) + len(self._chunk)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes read from the peer."""
        if self._error is not None:
            raise self._error
        if self._chunk:
            self._buf += self._chunk
            self._chunk = memoryview(b"")
        if self._buf or not isinstance(data, bytes):
            self._buf += data
        else:
            self._chunk = memoryview(data)

    def _fail(self, exc: RemoteProtocolError) -> RemoteProtocolError:
        self._error = exc
        self._buf = bytearray()
        self._chunk = memoryview(b"")
        return exc

    def next_package(self) -> Package | None:
        """The next whole package, or None when more bytes are needed."""
        if self._error is not None:
            raise self._error
        if self._buf:
            return self._from_buffer()
        chunk = self._chunk
        if self._header is None:
            if len(chunk) < HEADER_SIZE:
                if chunk:  # keep the fragment where later bytes can join it
                    self._buf += chunk
                    self._chunk = memoryview(b"")
                return None
            try:
                self._header = decode_header(chunk, self.max_payload)
            except RemoteProtocolError as exc:
                raise self._fail(exc) from None
        head = self._header
        end = HEADER_SIZE + head.length
        if len(chunk) < end:
            self._buf += chunk
            self._chunk = memoryview(b"")
            return None
        view = chunk[HEADER_SIZE:end]
        self._chunk = chunk[end:]
        self._header = None
        payload = view if self.zero_copy else bytes(view)
        return Package(head.type, head.entity, head.message_id, head.id, head.stream,
                       head.flags, payload)

    def _from_buffer(self) -> Package | None:
        buf = self._buf
        if self._header is None:
            if len(buf) < HEADER_SIZE:
                return None
            try:
                self._header = decode_header(buf, self.max_payload)
            except RemoteProtocolError as exc:
                raise self._fail(exc) from None
        head = self._header
        end = HEADER_SIZE + head.length
        if len(buf) < end:
            return None
        with memoryview(buf) as mv:
            payload = bytes(mv[HEADER_SIZE:end])
        del buf[:end]
        self._header = None
        return Package(
            head.type, head.entity, head.message_id, head.id, head.stream, head.flags, payload
        )

    def packages(self) -> list[Package]:
        """Every whole package available now."""
        out: list[Package] = []
        while (pkg := self.next_package()) is not None:
            out.append(pkg)
        return out
