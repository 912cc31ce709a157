"""The vmbus package: the tunnel's unit of transfer, and its incremental codec.

Theory of operation
-------------------
Everything that crosses a tunnel is a *vmbus package*: a fixed 24-byte header followed by
``length`` bytes of payload (docs/protocol.md, "The vmbus package"). All integers are
big-endian (network order)::

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

import collections
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from vmbusify.errors import ErrorCode, LocalProtocolError, RemoteProtocolError, code_of
from vmbusify.protocol.serialize import dumps, loads_dict

SIGNATURE = 0x564D4255
PROTOCOL_VERSION = 1
HEADER = struct.Struct(">IBBHHIHII")
HEADER_SIZE = HEADER.size  # 24
#: Default and hard ceiling for one package's payload.
DEFAULT_MAX_PAYLOAD = 1 << 20
MAX_PAYLOAD_LIMIT = 16 << 20
MAX_ID = 0xFFFFFFFF
#: The decoder's fixed buffer for headers and small payloads (larger ones get their own).
SCRATCH_SIZE = 64 << 10
#: A payload: bytes, or a view of a buffer nobody writes to again (a large payload the
#: decoder received in place, a ZeroMQ frame).
Payload = bytes | memoryview
#: Makes the buffer a large payload is received into: ``allocate(n)`` is a writable view of
#: exactly ``n`` bytes (PackageDecoder's ``allocate``; the mux gives ZeroMQ frames).
Allocator = Callable[[int], memoryview]


def new_buffer(n: int) -> memoryview:
    """The default Allocator: a fresh bytearray of ``n`` bytes."""
    return memoryview(bytearray(n))


class PackageType(IntEnum):
    """What a package is for."""

    #: One-way application message (a worker's ``async_send``).
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
#: Every valid type and flags field of a header, and its enum member.
_TYPE_OF = {int(t): t for t in PackageType}
_FLAGS_OF = {bits: PackageFlag(bits) for bits in range(_KNOWN_FLAGS + 1)}


@dataclass(slots=True, frozen=True, kw_only=True)
class Package:
    """One vmbus package: its header's fields in the wire's order, then the payload.

    Keyword-only (``Package(type=..., entity=..., message_id=...)``), as are ``Header`` and
    ``encode_header``: one order for the fields everywhere, and no call that counts them.
    ``entity`` is the sender's Entity code (an int on the wire); ``length`` is the payload's.
    """

    type: PackageType
    flags: PackageFlag = PackageFlag.NONE
    entity: int
    id: int = 0
    message_id: int
    stream: int = 0
    payload: Payload = b""

    def header(self) -> bytes:
        """The 24-byte header of this package (payload not included)."""
        return encode_header(type=self.type, flags=self.flags, entity=self.entity, id=self.id,
                             message_id=self.message_id, stream=self.stream,
                             length=len(self.payload))

    def encode(self) -> bytes:
        """Header and payload as one bytes object."""
        return self.header() + bytes(self.payload)


def encode_header(*, type: int, flags: int, entity: int, id: int,
                  message_id: int, stream: int, length: int) -> bytes:
    """Pack a header (fields in the wire's order, by keyword); raises LocalProtocolError for
    a field out of range."""
    try:
        return HEADER.pack(SIGNATURE, PROTOCOL_VERSION, type, flags, entity, id, message_id,
                           stream, length)
    except struct.error as exc:
        raise LocalProtocolError(f"cannot encode package header: {exc}") from None


@dataclass(slots=True, frozen=True, kw_only=True)
class Header:
    """A decoded header, before its payload has arrived (fields in the wire's order)."""

    type: PackageType
    flags: PackageFlag
    entity: int
    id: int
    message_id: int
    stream: int
    length: int

    def package(self, payload: Payload) -> Package:
        """The package this header starts, with ``payload`` (used as it is, never copied)."""
        return Package(type=self.type, flags=self.flags, entity=self.entity, id=self.id,
                       message_id=self.message_id, stream=self.stream, payload=payload)


def decode_header(data: bytes | bytearray | memoryview, max_payload: int) -> Header:
    """Unpack and validate a 24-byte header; raises RemoteProtocolError if it is invalid."""
    if len(data) != HEADER_SIZE:
        raise RemoteProtocolError(f"a package header is {HEADER_SIZE} bytes, not {len(data)}")
    sig, version, ptype, flags, entity, pid, message_id, stream, length = HEADER.unpack_from(data)
    if sig != SIGNATURE:
        raise RemoteProtocolError(f"bad signature 0x{sig:08x} (expected 0x{SIGNATURE:08x})")
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(f"unsupported protocol version {version}")
    # Dict lookups, not PackageType(ptype) and PackageFlag(flags): an enum's call is ~1 us
    # each, and every package crossing a mux has its header decoded once or twice.
    kind = _TYPE_OF.get(ptype)
    if kind is None:
        raise RemoteProtocolError(f"unknown package type {ptype}")
    flag = _FLAGS_OF.get(flags)
    if flag is None:
        raise RemoteProtocolError(f"unknown flag bits 0x{flags:04x}")
    if length > max_payload:
        raise RemoteProtocolError(f"payload length {length} exceeds the maximum {max_payload}")
    return Header(type=kind, flags=flag, entity=entity, id=pid,
                  message_id=message_id, stream=stream, length=length)


#: The longest reason read from an ERROR ACK (characters).
MAX_REASON = 2000


@dataclass(slots=True, frozen=True)
class ErrorReply:
    """The payload of an ERROR ACK: why the request failed, as an ErrorCode and a text.

    Two forms on the wire (docs/protocol.md, "Error codes"): ``encode()``, msgpack
    ``{code, reason}``, between ends that both list the HELLO feature ``error-codes`` (and
    always on the bus); ``plain()``, the UTF-8 reason alone, to a peer of 0.1.0, whose
    reasons are read back with ``from_plain`` as GENERIC.
    """

    code: ErrorCode
    reason: str

    def encode(self) -> bytes:
        """The coded form: msgpack ``{"code": int, "reason": str}``."""
        return dumps({"code": int(self.code), "reason": self.reason[:MAX_REASON]})

    def plain(self) -> bytes:
        """The form of 0.1.0: the reason as UTF-8 text."""
        return self.reason[:MAX_REASON].encode()

    def ack(self, *, entity: int, id: int, message_id: int, stream: int = 0,
            plain: bool = False) -> Package:
        """The ERROR ACK that answers request ``id`` with this reply (``plain``: for a peer
        of 0.1.0)."""
        return Package(type=PackageType.ACK, flags=PackageFlag.ERROR, entity=entity, id=id,
                       message_id=message_id, stream=stream,
                       payload=self.plain() if plain else self.encode())

    @classmethod
    def decode(cls, payload: Payload) -> ErrorReply:
        """The coded form, strictly (RemoteProtocolError if it is not one); an unknown code
        reads as GENERIC."""
        body = loads_dict(payload, "error reply")
        code, reason = body.get("code"), body.get("reason")
        if not isinstance(code, int) or isinstance(code, bool) or not isinstance(reason, str):
            raise RemoteProtocolError("error reply: 'code' (int) and 'reason' (str) wanted")
        return cls(code_of(code), reason[:MAX_REASON])

    @classmethod
    def from_plain(cls, payload: Payload) -> ErrorReply:
        """A reason of 0.1.0 (plain text): GENERIC, the text as it is (invalid UTF-8
        replaced)."""
        return cls(ErrorCode.GENERIC,
                   bytes(payload[:MAX_REASON * 4]).decode("utf-8", "replace")[:MAX_REASON])

    @classmethod
    def read(cls, payload: Payload, coded: bool = True) -> ErrorReply:
        """Whatever an ERROR ACK carries, never raising: the coded form when ``coded`` (a
        malformed one is read as GENERIC, saying so), else plain text."""
        if not coded:
            return cls.from_plain(payload)
        try:
            return cls.decode(payload)
        except RemoteProtocolError as exc:
            return cls(ErrorCode.REMOTE_PROTOCOL, f"the peer's error reply is malformed: {exc}")


class PackageDecoder:
    """Incremental, bounded parser of a byte stream into Packages (sans-I/O).

    Two ways to feed it, one parser behind both:

    - ``receive_data(data)``: hand it bytes read elsewhere (they are copied in);
    - ``get_buffer()`` / ``buffer_updated(n)``: read *into* the decoder, as an asyncio
      BufferedProtocol does. Headers and small payloads land in a fixed scratch buffer; a
      payload larger than half of it is received straight into a buffer of its own size
      (made by ``allocate``), which becomes the Package's payload, so a bulk DATA package is
      never copied in user space between the socket and the next hop.

    Drain with ``next_package`` until it returns None. After a RemoteProtocolError the decoder
    is dead: the connection must be closed. Bytes held never exceed the scratch buffer plus
    one maximal payload (and the whole packages already parsed but not yet taken).
    """

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 allocate: Allocator = new_buffer) -> None:
        if not 0 < max_payload <= MAX_PAYLOAD_LIMIT:
            raise LocalProtocolError(f"max_payload must be in 1..{MAX_PAYLOAD_LIMIT}")
        self.max_payload = max_payload
        self._allocate = allocate
        # An anonymous mapping, not a bytearray (which is zeroed, so resident, at once): a
        # page is resident only once bytes land in it, and an idle tunnel's reads all start
        # at offset 0. 64 KiB a tunnel was most of the host mux's memory per idle VM
        # (docs/performance.md, "Idle VMs on one host mux").
        self._scratch = memoryview(mmap.mmap(-1, SCRATCH_SIZE))
        self._start = 0                  # first unparsed byte in the scratch buffer
        self._end = 0                    # end of the bytes received into it
        self._header: Header | None = None   # parsed, its payload not yet whole
        self._body: memoryview | None = None  # a large payload being received in place
        self._filled = 0
        self._ready: collections.deque[Package] = collections.deque()
        self._error: RemoteProtocolError | None = None

    @property
    def receiving(self) -> Header | None:
        """The header whose payload is being received (what an Allocator is called for)."""
        return self._header

    def move_body(self, body: memoryview, allocate: Allocator) -> bool:
        """If ``body`` (an Allocator's buffer) is the one a payload is being received into,
        go on in a new one of ``allocate``'s (the bytes so far copied over); True if so."""
        if self._body is not body:
            return False
        new = allocate(len(body))
        new[:self._filled] = body[:self._filled]
        self._body = new
        return True

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole package."""
        held = self._end - self._start
        if self._header is not None:
            held += HEADER_SIZE + (self._filled if self._body is not None else 0)
        return held

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes read from the peer (a malformed package shows at next_package)."""
        if self._error is not None:
            raise self._error
        with memoryview(data) as whole:
            view = whole.cast("B")
            while view and self._error is None:
                room = self.get_buffer()
                n = min(len(room), len(view))
                room[:n] = view[:n]
                self.buffer_updated(n)
                view = view[n:]

    def get_buffer(self) -> memoryview:
        """Where the next bytes from the peer go: fill a prefix of it, then buffer_updated(n)."""
        if self._error is not None:
            raise self._error
        if self._body is not None:
            return self._body[self._filled:]
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start and self._end > SCRATCH_SIZE // 2:
            # keep room for the rest of the partial package: move it to the front
            n = self._end - self._start
            self._scratch[:n] = self._scratch[self._start:self._end]
            self._start, self._end = 0, n
        return self._scratch[self._end:]

    def buffer_updated(self, n: int) -> None:
        """``n`` bytes were written at the start of the last get_buffer() view."""
        if self._error is not None:
            raise self._error
        if self._body is not None:
            self._filled += n
            if self._filled == len(self._body):
                body, self._body = self._body, None
                self._emit(body)
            return
        self._end += n
        self._parse()

    def _parse(self) -> None:
        scratch = self._scratch
        while True:
            avail = self._end - self._start
            if self._header is None:
                if avail < HEADER_SIZE:
                    return
                try:
                    self._header = decode_header(scratch[self._start:self._start + HEADER_SIZE],
                                                 self.max_payload)
                except RemoteProtocolError as exc:
                    self._fail(exc)
                    return
                self._start += HEADER_SIZE
                avail -= HEADER_SIZE
            length = self._header.length
            if avail >= length:
                payload = bytes(scratch[self._start:self._start + length])
                self._start += length
                self._emit(payload)
                continue
            if length > SCRATCH_SIZE // 2:
                # large: receive the rest straight into a buffer of the payload's size
                body = self._allocate(length)
                body[:avail] = scratch[self._start:self._end]
                self._body, self._filled = body, avail
                self._start = self._end = 0
            return

    def _emit(self, payload: Payload) -> None:
        head = self._header
        assert head is not None
        self._header = None
        self._ready.append(head.package(payload))

    def _fail(self, exc: RemoteProtocolError) -> None:
        self._error = exc
        self._start = self._end = 0
        self._header = self._body = None

    def next_package(self) -> Package | None:
        """The next whole package, or None when more bytes are needed.

        Raises RemoteProtocolError once the packages before a malformed one are taken.
        """
        if self._ready:
            return self._ready.popleft()
        if self._error is not None:
            raise self._error
        return None

    def packages(self) -> list[Package]:
        """Every whole package available now."""
        out: list[Package] = []
        while (pkg := self.next_package()) is not None:
            out.append(pkg)
        return out
