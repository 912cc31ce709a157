"""Per-stream flow-control credit (sans-I/O), as SSH channels and HTTP/2 streams do it.

The receiver of a stream grants the sender ``INITIAL_WINDOW`` bytes up front. The sender
never has more unacknowledged bytes in flight than its window; the receiver returns credit
(a WINDOW package) once the application has *consumed* a quarter of a window, so credit
arrives before the sender runs dry even when four processes sit between the two ends. So a reader that stops
reading stops its own stream, and only its own: every other stream keeps its credit, and
nothing anywhere buffers more than one window per stream.
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
    """The credit a WINDOW package grants; raises RemoteProtocolError if malformed."""
    if len(payload) != _INCREMENT.size:
        raise RemoteProtocolError(f"WINDOW payload must be 4 bytes, got {len(payload)}")
    (n,) = _INCREMENT.unpack(payload)
    if n == 0:
        raise RemoteProtocolError("WINDOW increment of 0")
    return n


class SendWindow:
    """How many bytes this end may still send on a stream."""

    def __init__(self, initial: int = INITIAL_WINDOW) -> None:
        self.available = initial

    def take(self, wanted: int) -> int:
        """Reserve up to ``wanted`` bytes of credit (capped at MAX_CHUNK); 0 means wait."""
        n = min(wanted, self.available, MAX_CHUNK)
        self.available -= n
        return n

    def grant(self, n: int) -> None:
        """Credit returned by the peer; raises RemoteProtocolError on overflow past 2**32."""
        if self.available + n > 0xFFFFFFFF:
            raise RemoteProtocolError("WINDOW credit overflow")
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
