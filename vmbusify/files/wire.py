"""The file stream of `vmbusifyctl cp`: a small strict record format, sans-I/O.

Standard library only and no other module of the package: this module is also sent to the
guest as source and runs there under the guest's own ``python3`` (vmbusify/files/agent.py).

A stream is a sequence of records, each ``KIND (1 byte) | LENGTH (u32, big-endian) | BODY``::

    F  file       entry header (below); then C records, then one Z
    D  directory  entry header; the entries inside it follow (depth first)
    L  symlink    entry header; the link's target is the rest of the body
    C  chunk      file data, 1..MAX_CHUNK bytes
    Z  file end   empty, or the 32-byte sha256 of the whole file as the sender read it
    W  warning    JSON {"path", "kind", "message"}: one entry was not copied (inside a
                  file: that file failed at the sender and is dropped)
    X  failure    JSON {"kind", "message"}: the copy stops; nothing after it
    E  end        JSON {"files", "dirs", "links", "bytes"}: the sender's counts; the last record

Entry header: ``mode u32 | uid u32 | gid u32 | mtime_ns i64 | size u64 | offset u64 |
name_len u16 | name | link``. ``name`` is the entry's path relative to the copy's root,
components joined by ``/`` (the first is the source's own name), at most MAX_DEPTH of them;
``size`` is the file's size in bytes, binding: the C records that follow carry exactly
``size - offset`` bytes (the receiver refuses a byte more, and a Z before the last), except
``UNKNOWN_SIZE`` (stdin pushed to a file: only a push's receiver accepts it); ``offset`` is
where the data starts (non-zero only when resuming). Names and link targets are bytes: any
name a file system holds.

**Raw mode** (a request's ``"raw": true``; the fast path of one large file, docs/files.md):
when the stream's first entry is an F, its data is not cut into C records but follows the
entry as exactly ``size - offset`` raw bytes, then the Z (or a W: the sender could not send
it all, and the file is dropped). The sender then pads a file that shrank with zeros and
sends only the ``size`` it announced of one that grew; the receiver never takes more.

The decoder checks every record as it comes and keeps at most one record buffered
(``MAX_RECORD``); it raises ``StreamError`` with a one-line reason. Name checks (no absolute
names, no ``..``) are the receiver's (vmbusify/files/tree.py), which decides what is safe.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

#: Version of the stream; the agent's request names it and the agent refuses another.
VERSION = 1
#: Largest file data in one C record.
MAX_CHUNK = 4 << 20
#: Largest path of an entry, and of a symlink's target (Linux's PATH_MAX).
MAX_NAME = 4096
#: Most components in an entry's name (directories a tree may nest; the receiver holds one fd
#: for each, and the sender recurses once for each).
MAX_DEPTH = 256
#: An F record's ``size`` when the sender does not know it (stdin pushed to a file).
UNKNOWN_SIZE = (1 << 64) - 1
#: Largest JSON body (W, X, E records).
MAX_NOTE = 64 << 10
_RECORD = struct.Struct(">cI")
_ENTRY = struct.Struct(">IIIqQQH")
MAX_ENTRY = _ENTRY.size + 2 * MAX_NAME
HEADER_SIZE = _RECORD.size
#: The largest record the decoder may have to hold.
MAX_RECORD = HEADER_SIZE + MAX_CHUNK
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1


class StreamError(Exception):
    """The stream broke the format; ``str()`` is a one-line reason."""


class Kind(bytes, Enum):
    """The first byte of a record."""

    FILE = b"F"
    DIR = b"D"
    LINK = b"L"
    CHUNK = b"C"
    FILE_END = b"Z"
    WARNING = b"W"
    FAILURE = b"X"
    END = b"E"


#: Kinds whose body is an entry header.
ENTRY_KINDS = (Kind.FILE, Kind.DIR, Kind.LINK)
_NOTE_KINDS = (Kind.WARNING, Kind.FAILURE, Kind.END)


@dataclass(slots=True)
class Entry:
    """A file, directory or symlink, as its F, D or L record says. (Not frozen: a frozen
    dataclass's ``__init__`` costs 4x as much, ~1 us of each file of a tree.)"""

    kind: Kind
    name: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    offset: int = 0
    link: bytes = b""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Data of the current file."""

    data: bytes


@dataclass(frozen=True, slots=True)
class FileEnd:
    """The current file is complete; ``sha256`` is the sender's digest (or empty)."""

    sha256: bytes = b""


@dataclass(frozen=True, slots=True)
class Note:
    """A W, X or E record: its kind and its JSON object."""

    kind: Kind
    doc: dict[str, object]


Event = Entry | Chunk | FileEnd | Note


def record_header(kind: Kind, length: int) -> bytes:
    """The 5 bytes before a body of ``length`` bytes."""
    return _RECORD.pack(kind.value, length)


def encode_entry(entry: Entry) -> bytes:
    """A whole F, D or L record."""
    if entry.kind not in ENTRY_KINDS:
        raise ValueError(f"not an entry kind: {entry.kind!r}")
    if not 0 < len(entry.name) <= MAX_NAME or len(entry.link) > MAX_NAME:
        raise ValueError(f"name or link target too long: {entry.name[:80]!r}")
    body = _ENTRY.pack(entry.mode & _U32, entry.uid & _U32, entry.gid & _U32, entry.mtime_ns,
                       entry.size, entry.offset, len(entry.name)) + entry.name + entry.link
    return record_header(entry.kind, len(body)) + body


def encode_chunk_header(length: int) -> bytes:
    """The header of a C record; the data follows (sent separately: no copy)."""
    if not 0 < length <= MAX_CHUNK:
        raise ValueError(f"chunk of {length} bytes")
    return record_header(Kind.CHUNK, length)


def encode_file_end(sha256: bytes = b"") -> bytes:
    """A Z record."""
    return record_header(Kind.FILE_END, len(sha256)) + sha256


def encode_note(kind: Kind, doc: Mapping[str, object]) -> bytes:
    """A W, X or E record (JSON, ASCII: names are escaped, bytes as surrogates). A body
    longer than MAX_NOTE has its texts cut (never the JSON itself)."""
    body = json.dumps(doc).encode()
    if len(body) > MAX_NOTE:
        body = json.dumps({k: v[:1000] if isinstance(v, str) else v
                           for k, v in doc.items()}).encode()
    if len(body) > MAX_NOTE:
        body = json.dumps({"kind": str(doc.get("kind", "io"))[:100],
                           "message": "(a note too long to send)"}).encode()
    return record_header(kind, len(body)) + body


def _limit(kind: Kind) -> int:
    if kind in ENTRY_KINDS:
        return MAX_ENTRY
    if kind is Kind.CHUNK:
        return MAX_CHUNK
    if kind is Kind.FILE_END:
        return 32
    return MAX_NOTE


#: A record's first byte -> its kind, and each kind's largest body (looked up per record:
#: a dict is ~6x faster than ``Kind(byte)``).
_KIND_OF = {kind.value: kind for kind in Kind}
_LIMIT_OF = {kind: _limit(kind) for kind in Kind}


def _entry(kind: Kind, body: bytes | bytearray, at: int = 0, end: int = -1) -> Entry:
    """The entry in ``body[at:end]`` (``end`` -1: to the end), checked."""
    if end < 0:
        end = len(body)
    if end - at < _ENTRY.size:
        raise StreamError(f"{kind.name} record too short ({end - at} bytes)")
    mode, uid, gid, mtime_ns, size, offset, name_len = _ENTRY.unpack_from(body, at)
    at += _ENTRY.size
    if not 0 < name_len <= min(end - at, MAX_NAME):
        raise StreamError(f"{kind.name} record with a bad name length {name_len}")
    name = bytes(body[at:at + name_len])
    link_len = end - at - name_len
    if kind is not Kind.LINK and link_len:
        raise StreamError(f"{kind.name} record with trailing bytes")
    if kind is Kind.LINK and not link_len:
        raise StreamError("symlink record without a target")
    if link_len > MAX_NAME:
        raise StreamError(f"symlink target of {link_len} bytes is too long")
    if offset > size:
        raise StreamError(f"entry offset {offset} beyond its size {size}")
    link = bytes(body[at + name_len:end]) if link_len else b""
    return Entry(kind, name, mode, uid, gid, mtime_ns, size, offset, link)


def _note(kind: Kind, body: bytes) -> Note:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
        raise StreamError(f"{kind.name} record is not JSON") from None
    if not isinstance(doc, dict):
        raise StreamError(f"{kind.name} record is not a JSON object")
    return Note(kind, doc)


class Decoder:
    """Incremental decoder: ``feed(bytes)``, then ``next_event()`` until it returns None.

    It also checks the order: C and Z only inside a file, no entry inside a file, nothing
    after X or E. ``finished`` is true after X or E; ``in_file`` while a file is open.
    """

    def __init__(self, raw_first: bool = False) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.in_file = False
        self.finished = False
        #: Raw mode: the data of a first F entry follows raw (see the module docstring).
        self._raw_first = raw_first
        self._entries = 0
        #: Raw bytes of the current file still to come.
        self.raw_left = 0

    def skip_raw(self, n: int) -> None:
        """``n`` bytes of the raw run went elsewhere (written to the file by another
        process): the stream goes on after them."""
        if not 0 <= n <= self.raw_left or (n and self.buffered):
            raise StreamError("raw data accounted out of order")
        self.raw_left -= n

    @property
    def buffered(self) -> int:
        """Bytes held that are not a whole record yet."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes received."""
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        if data and self.finished:
            raise StreamError("data after the end of the stream")
        self._buf += data

    def next_event(self) -> Event | None:
        """The next record, decoded and checked; None when more bytes are needed."""
        buf, at = self._buf, self._pos
        if self.raw_left:
            n = min(self.raw_left, len(buf) - at, MAX_CHUNK)
            if not n:
                return None
            with memoryview(buf) as view:
                data = bytes(view[at:at + n])
            self._pos += n
            self.raw_left -= n
            return Chunk(data)
        if len(buf) - at < HEADER_SIZE:
            return None
        if self.finished:
            raise StreamError("data after the end of the stream")
        raw_kind, length = _RECORD.unpack_from(buf, at)
        kind = _KIND_OF.get(raw_kind)
        if kind is None:
            raise StreamError(f"unknown record kind {raw_kind!r}")
        if length > _LIMIT_OF[kind]:
            raise StreamError(f"{kind.name} record of {length} bytes is too large")
        start = at + HEADER_SIZE
        end = start + length
        if len(buf) < end:
            return None
        self._pos = end
        if kind is Kind.CHUNK:
            if not self.in_file or not length:
                raise StreamError("file data outside a file" if length else "empty chunk")
            with memoryview(buf) as view:
                return Chunk(bytes(view[start:end]))
        if kind in ENTRY_KINDS:  # parsed in place: its body is not copied first
            return self._entry(kind, buf, start, end)
        if kind is Kind.FILE_END:
            if not self.in_file:
                raise StreamError("file end outside a file")
            if length not in (0, 32):
                raise StreamError("file end with a bad digest")
            self.in_file = False
            return FileEnd(bytes(buf[start:end]) if length else b"")
        with memoryview(buf) as view:
            body = bytes(view[start:end])
        return self._note(kind, body)

    def _entry(self, kind: Kind, buf: bytearray, start: int, end: int) -> Entry:
        if self.in_file:
            raise StreamError("an entry inside a file")
        entry = _entry(kind, buf, start, end)
        self.in_file = kind is Kind.FILE
        self._entries += 1
        if self.in_file and self._raw_first and self._entries == 1:
            self.raw_left = entry.size - entry.offset
        return entry

    def _note(self, kind: Kind, body: bytes) -> Note:
        # A W inside a file: that file failed at the sender (a read error): it is dropped.
        self.in_file = False
        if kind is not Kind.WARNING:
            self.finished = True
        return _note(kind, body)
