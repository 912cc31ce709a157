"""Per-stream flow-control credit (sans-I/O), as SSH channels and HTTP/2 streams do it.

The receiver of a stream grants the sender ``INITIAL_WINDOW`` bytes up front. The sender
never has more unacknowledged bytes in flight than its window; the receiver returns credit
(a WINDOW package) once the application has *consumed* a quarter of a window, so credit
arrives before the sender runs dry even when four processes sit between the two ends. So a
reader that stops reading stops its own stream, and only its own: every other stream keeps its
credit, and nothing anywhere buffers more than one window per stream.

Credit is checked as strictly as data: an honest receiver never returns more than was sent,
so a sender's available credit never exceeds the window it started with. A WINDOW that
would take it past that (a peer granting itself gigabytes to make us queue them) or a WINDOW
of 0 is a FlowControlError, and the stream is reset.
"""

from __future__ import annotations

import struct

from vmbusify.errors import FlowControlError, RemoteProtocolError

#: Credit each receiver grants at open. 8 MiB keeps one stream near 450 MB/s through four
#: processes on two cores (4 MiB gave about half that; bench/tunnel.py).
INITIAL_WINDOW = 8 << 20
#: Largest DATA payload a sender puts in one package. 1 MiB rather than 256 KiB: the cost of
#: the data path is per package (four processes, two ZeroMQ hops), and bigger packages gave
#: the subnet about a third more throughput (bench/subnet.py). Every end must accept it, so
#: [tunnel] max_payload may not be set below it.
MAX_CHUNK = 1 << 20
_INCREMENT = struct.Struct(">I")


def encode_increment(n: int) -> bytes:
    """Payload of a WINDOW package granting ``n`` more bytes."""
    return _INCREMENT.pack(n)


def decode_increment(payload: bytes | memoryview) -> int:
    """The credit a WINDOW package grants; raises RemoteProtocolError if malformed and
    FlowControlError for an increment of 0."""
    if len(payload) != _INCREMENT.size:
        raise RemoteProtocolError(f"WINDOW payload must be 4 bytes, got {len(payload)}")
    (n,) = _INCREMENT.unpack(payload)
    if n == 0:
        raise FlowControlError("WINDOW increment of 0")
    return n


class SendWindow:
    """How many bytes this end may still send on a stream.

    ``available + unacked == size`` for an honest peer, so ``unacked`` (bytes sent and not
    yet credited back) is what may still sit between here and the peer's application.
    """

    def __init__(self, initial: int = INITIAL_WINDOW) -> None:
        self.size = initial
        self.available = initial

    @property
    def unacked(self) -> int:
        """Bytes sent and not yet credited back by the peer."""
        return self.size - self.available

    def sendable(self, wanted: int) -> int:
        """How much of ``wanted`` could be sent now (capped at MAX_CHUNK), without taking it."""
        return min(wanted, self.available, MAX_CHUNK)

    def take(self, wanted: int) -> int:
        """Reserve up to ``wanted`` bytes of credit (capped at MAX_CHUNK); 0 means wait."""
        n = min(wanted, self.available, MAX_CHUNK)
        self.available -= n
        return n

    def grant(self, n: int) -> None:
        """Credit returned by the peer; raises FlowControlError if it is 0 or would take the
        available credit past the window (the peer returned bytes it never received)."""
        if n <= 0 or self.available + n > self.size:
            raise FlowControlError(
                f"WINDOW of {n} bytes with {self.unacked} unacknowledged: credit past the "
                f"window of {self.size} bytes")
        self.available += n


class ReceiveWindow:
    """Credit this end granted the peer, and when to grant more."""

    def __init__(self, size: int = INITIAL_WINDOW) -> None:
        self.size = size
        self.outstanding = size  # bytes the peer may still send
        self._consumed = 0       # consumed by the application, not yet returned as credit

    def on_data(self, n: int) -> None:
        """The peer sent ``n`` bytes; raises FlowControlError if it overran its window."""
        if n > self.outstanding:
            raise FlowControlError(f"peer sent {n} bytes with only {self.outstanding} of credit")
        self.outstanding -= n

    def on_consumed(self, n: int) -> int:
        """The application consumed ``n`` bytes; returns the credit to grant now (0: not yet)."""
        self._consumed += n
        if self._consumed < self.size // 4:
            return 0
        grant, self._consumed = self._consumed, 0
        self.outstanding += grant
        return grant

    @property
    def owed(self) -> int:
        """Bytes consumed and not yet returned as credit (under a quarter of a window)."""
        return self._consumed

    def flush(self) -> int:
        """Return every consumed byte now, below the quarter too; the credit to grant (0:
        none owed). For a receiver whose many small streams together owe the sender its
        whole send budget (vmbusify.bus.streams, "credit owed per VM")."""
        grant, self._consumed = self._consumed, 0
        self.outstanding += grant
        return grant
