"""Finding the start of a host's tunnel in a byte stream that never "accepts" (sans-I/O).

A virtio-serial port is one byte stream for the guest's whole life: host muxes come and go
on QEMU's side, and what one of them left in the buffers (half a package, or whole ones such
as an exec START) is still there when the next one arrives. ``PortReader`` is fed what the
port gives and says what to do with it:

- while no host is in session it *scans*: every occurrence of the package signature whose
  24-byte header is a tunnel HELLO MESSAGE, whose payload decodes as a ``Hello`` from role
  "host" with a full ``NONCE_SIZE`` nonce not seen before, starts a session (``NewHost``);
  everything before it is dropped (counted in ``skipped``);
- in session it passes bytes on (``Deliver``) while following package boundaries: a host
  HELLO with a fresh nonce at a boundary is a new host (``NewHost`` again: the host went and
  came back faster than the port said so), and a header that does not decode means the
  stream is not the session's any more (``Lost``): back to scanning.

Nothing here runs or interprets a package beyond its header and a HELLO's payload, so a stale
or hostile stream can make the guest wait, never act.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from vmbusify.errors import VMBusifyError
from vmbusify.protocol.entities import Entity, TunnelMessage
from vmbusify.protocol.package import (
    HEADER_SIZE,
    SIGNATURE,
    Header,
    PackageFlag,
    PackageType,
    decode_header,
)
from vmbusify.protocol.tunnel import NONCE_SIZE, Hello

#: The signature as it appears on the wire.
SIGNATURE_BYTES = SIGNATURE.to_bytes(4, "big")
#: A HELLO's payload is a few hundred bytes (256 addresses at most are read); a header that
#: claims more is not a HELLO worth waiting for.
HELLO_MAX = 64 << 10
#: How many host nonces are remembered: a HELLO repeating one of them is stale.
NONCES_KEPT = 64


@dataclass(frozen=True, slots=True)
class Deliver:
    """Bytes of the current session, for the tunnel."""

    data: bytes


@dataclass(frozen=True, slots=True)
class NewHost:
    """A host's HELLO starts a session; ``skipped`` stale bytes were dropped before it."""

    hello: Hello
    skipped: int


@dataclass(frozen=True, slots=True)
class Lost:
    """The session's stream stopped making sense (``reason``): it is over."""

    reason: str


Event = Deliver | NewHost | Lost


def _is_hello_header(header: Header) -> bool:
    return (header.type is PackageType.MESSAGE and header.entity == Entity.TUNNEL
            and header.message_id == TunnelMessage.HELLO and header.flags == PackageFlag.NONE
            and header.length <= HELLO_MAX)


class PortReader:
    """Splits a port's byte stream into host sessions (see the module docstring)."""

    def __init__(self, max_payload: int, role: str = "host") -> None:
        #: The role whose HELLO starts a session ("host" in a guest).
        self.role = role
        self.max_payload = max_payload
        self.in_session = False
        #: Bytes dropped while scanning, since the last session started (or reset()).
        self.skipped = 0
        self._buf = bytearray()       # scanning: not yet judged; in session: a held HELLO
        self._remaining = 0           # in session: payload bytes of the current package
        self._nonces: collections.deque[bytes] = collections.deque(maxlen=NONCES_KEPT)

    def reset(self) -> None:
        """The host went away: drop everything held and scan for the next one."""
        self.skipped += len(self._buf)
        self._buf.clear()
        self._remaining = 0
        self.in_session = False

    def feed(self, data: bytes) -> list[Event]:
        """Take bytes read from the port; returns what to do, in order."""
        events: list[Event] = []
        self._buf += data
        while self._buf:
            before = len(self._buf)
            if self.in_session:
                self._follow(events)
            else:
                self._scan(events)
            if len(self._buf) == before and not self._progressed:
                break
        return events

    # -- scanning ------------------------------------------------------------------------
    def _hello(self, view: bytes | bytearray, header: Header) -> Hello | None:
        """The host HELLO in ``view`` (header and whole payload), or None if it is not one
        that may start a session."""
        try:
            hello = Hello.from_payload(bytes(view[HEADER_SIZE:HEADER_SIZE + header.length]))
        except (VMBusifyError, ValueError, TypeError, OverflowError):
            return None
        if hello.role != self.role or len(hello.nonce) != NONCE_SIZE:
            return None
        if hello.nonce in self._nonces:
            return None
        return hello

    def _scan(self, events: list[Event]) -> None:
        """Look for a session start in the held bytes; drop what can never be part of one."""
        buf = self._buf
        self._progressed = False
        keep_from = max(len(buf) - (len(SIGNATURE_BYTES) - 1), 0)  # a signature's first part
        pos = buf.find(SIGNATURE_BYTES)
        while pos >= 0:
            if len(buf) - pos < HEADER_SIZE:
                keep_from = min(keep_from, pos)
                break
            header = self._header_at(pos)
            if header is not None and _is_hello_header(header):
                if len(buf) - pos < HEADER_SIZE + header.length:
                    keep_from = min(keep_from, pos)  # may be it: wait for its payload
                else:
                    hello = self._hello(buf[pos:pos + HEADER_SIZE + header.length], header)
                    if hello is not None:
                        self._start(pos, hello, events)
                        return
            pos = buf.find(SIGNATURE_BYTES, pos + 1)
        if keep_from:
            self.skipped += keep_from
            del buf[:keep_from]
            self._progressed = True

    def _header_at(self, pos: int) -> Header | None:
        try:
            return decode_header(bytes(self._buf[pos:pos + HEADER_SIZE]), self.max_payload)
        except VMBusifyError:
            return None

    def _start(self, pos: int, hello: Hello, events: list[Event]) -> None:
        """A session starts with the HELLO at ``pos``."""
        self.skipped += pos
        del self._buf[:pos]
        self._nonces.append(hello.nonce)
        events.append(NewHost(hello, self.skipped))
        self.skipped = 0
        self.in_session = True
        self._remaining = 0
        self._progressed = True

    # -- in session ----------------------------------------------------------------------
    def _follow(self, events: list[Event]) -> None:
        """Pass session bytes on, watching each header: everything up to the first header
        that needs a decision (or the end of what is held) goes out as one Deliver."""
        buf = self._buf
        self._progressed = False
        i = 0  # bytes of buf judged to be the session's
        end = len(buf)
        stop: Event | None = None
        hello: Hello | None = None
        while i < end:
            if self._remaining:
                n = min(self._remaining, end - i)
                i += n
                self._remaining -= n
                continue
            if end - i < HEADER_SIZE:
                break
            header = self._header_at(i)
            if header is None:
                try:
                    decode_header(bytes(buf[i:i + HEADER_SIZE]), self.max_payload)
                except VMBusifyError as exc:
                    stop = Lost(f"not a package header: {exc}")
                else:  # pragma: no cover - _header_at said it does not decode
                    stop = Lost("not a package header")
                break
            if _is_hello_header(header):
                if end - i < HEADER_SIZE + header.length:
                    break  # hold a HELLO until it is whole: it may be a new host's
                hello = self._hello(buf[i:i + HEADER_SIZE + header.length], header)
                if hello is not None:  # the host went and came back before we saw it go
                    break
            # An ordinary package (or a HELLO that starts nothing: the tunnel judges it).
            self._remaining = HEADER_SIZE + header.length
        if i:
            events.append(Deliver(bytes(buf[:i])))
            del buf[:i]
            self._progressed = True
        if hello is not None:
            self._start(0, hello, events)
        elif stop is not None:
            events.append(stop)
            self.in_session = False
            # The next host's HELLO may start anywhere after this byte: scan from there.
            self.skipped += 1
            del buf[:1]
            self._progressed = True

    _progressed = False


__all__ = ["HELLO_MAX", "NONCES_KEPT", "SIGNATURE_BYTES", "Deliver", "Event", "Lost",
           "NewHost", "PortReader"]
