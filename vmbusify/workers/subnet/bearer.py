"""ip-bearer (docs/subnet.md): IP packets between a TUN device and a peer's bearer stream.

Each peer has one ``Bearer``: an ``Outbox`` the TUN reader fills and a task drains into the
stream, one batch (every frame waiting, up to one DATA package) per write (one of 64 KiB or
more is built straight in the link's shared-memory ring when it can go whole), and a task
that reads the stream and hands each frame to ``deliver``. Nothing here blocks the TUN reader: when
a peer's outbox is full, its packets are dropped (IP tolerates loss, TCP backs off), so one
slow VM never holds up the others and memory per VM stays bounded by the outbox plus the
stream's credit window.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Callable
from typing import Any

from vmbusify.bus.ring import RING_MIN_PAYLOAD
from vmbusify.bus.streams import Stream, StreamReset
from vmbusify.errors import ProtocolError
from vmbusify.protocol.subnet import FrameDecoder, frame_header, frame_header_into
from vmbusify.protocol.window import MAX_CHUNK
from vmbusify.workers.subnet.tun import TunDevice

log = logging.getLogger(__name__)

#: Bytes of frames that may wait for one peer's stream before new ones are dropped.
OUTBOX_LIMIT = 4 << 20
#: Corking: while bulk packets keep coming (the last batch left less than CORK_BUSY seconds ago),
#: a batch that still has room for the largest frame seen waits up to CORK_DELAY for more. Every
#: package costs the same four process hops whatever its size, so full packages are what makes
#: bulk traffic fast; an idle link (a ping, a DNS query) never waits.
CORK_BUSY = 0.004
CORK_DELAY = 0.002
#: Only bulk is corked: a batch waits only if it or the last one held a frame this big. The
#: other direction of a bulk transfer carries ACKs (and an interactive session small packets):
#: waiting could never fill their batch and only added CORK_DELAY to every round trip.
BULK_FRAME = 8 << 10
#: One TUN wake-up reads at most this much before letting the event loop run.
READ_BUDGET_FRAMES = 256
READ_BUDGET_BYTES = 1 << 20


class Outbox:
    """Frames waiting for one peer: bounded, drop-on-overload, taken as whole batches."""

    def __init__(self, limit: int = OUTBOX_LIMIT) -> None:
        self.limit = limit
        self.bytes = 0
        self.dropped = 0
        #: The largest frame ever queued (how much room a batch must keep for one more).
        self.max_frame = 0
        #: The largest frame of the last batch and of those queued since (see ``bulk``).
        self.recent_max = 0
        self._frames: collections.deque[bytes] = collections.deque()
        self._ready = asyncio.Event()
        #: Set once ``bytes`` reaches ``_fill_target`` (see ``wait_fill``).
        self._filled = asyncio.Event()
        self._fill_target = 0

    def __len__(self) -> int:
        return len(self._frames)

    def put(self, frame: bytes) -> bool:
        """Queue a frame; False (and counted) if the outbox is full."""
        if self.bytes + len(frame) > self.limit:
            self.dropped += 1
            return False
        self._frames.append(frame)
        self.bytes += len(frame)
        self.max_frame = max(self.max_frame, len(frame))
        self.recent_max = max(self.recent_max, len(frame))
        self._ready.set()
        if self._fill_target and self.bytes >= self._fill_target:
            self._filled.set()
        return True

    @property
    def bulk(self) -> bool:
        """Bulk is flowing: the last batch or a frame queued since was large."""
        return self.recent_max >= BULK_FRAME

    def take_batch(self, max_bytes: int = MAX_CHUNK) -> tuple[bytes, int]:
        """(encoded batch, frame count) of the frames that fit in ``max_bytes`` (at least one)."""
        parts: list[bytes] = []
        size = count = 0
        frames = self._frames
        self.recent_max = 0
        while frames and (count == 0 or size + 4 + len(frames[0]) <= max_bytes):
            frame = frames.popleft()
            parts.append(frame_header(len(frame)))
            parts.append(frame)
            size += 4 + len(frame)
            count += 1
            self.recent_max = max(self.recent_max, len(frame))
            self.bytes -= len(frame)
        if not frames:
            self._ready.clear()
        return b"".join(parts), count

    def batch_size(self, max_bytes: int = MAX_CHUNK) -> tuple[int, int]:
        """(bytes, frame count) of the batch ``take_batch`` or ``take_into`` would take now."""
        size = count = 0
        for frame in self._frames:
            n = 4 + len(frame)
            if count and size + n > max_bytes:
                break
            size += n
            count += 1
        return size, count

    def take_into(self, count: int, view: memoryview) -> None:
        """Take the next ``count`` frames (``batch_size``'s), encoded as ``take_batch``
        would, into ``view`` (exactly their size): each frame copied once, into the buffer
        the batch travels in."""
        frames = self._frames
        header_into = frame_header_into
        pos = biggest = 0
        for _ in range(count):
            frame = frames.popleft()
            n = len(frame)
            header_into(view, pos, n)
            view[pos + 4:pos + 4 + n] = frame
            pos += 4 + n
            biggest = max(biggest, n)
            self.bytes -= n
        self.recent_max = biggest
        if not frames:
            self._ready.clear()

    async def wait(self) -> None:
        """Until at least one frame is queued."""
        while not self._frames:
            self._ready.clear()
            await self._ready.wait()

    async def wait_fill(self, target: int, timeout: float) -> None:
        """Until ``target`` bytes are queued or ``timeout`` seconds passed."""
        if self.bytes >= target:
            return
        self._fill_target = target
        self._filled.clear()
        try:
            await asyncio.wait_for(self._filled.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self._fill_target = 0


class Bearer:
    """One peer's end of the ip-bearer: outbox -> stream, stream -> ``deliver``."""

    def __init__(self, stream: Stream, deliver: Callable[[memoryview], object], label: str) -> None:
        self.stream = stream
        self.deliver = deliver
        self.label = label
        self.outbox = Outbox()
        self.closed = asyncio.Event()
        self.reason = ""
        self.frames_out = self.frames_in = self.batches_out = 0
        self._decoder = FrameDecoder()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._send_loop()),
                       asyncio.ensure_future(self._recv_loop())]

    def stats(self) -> dict[str, Any]:
        return {"stream": self.stream.id, "frames_out": self.frames_out,
                "frames_in": self.frames_in, "batches_out": self.batches_out,
                "bytes_out": self.stream.bytes_out, "bytes_in": self.stream.bytes_in,
                "dropped_full": self.outbox.dropped, "queued_bytes": self.outbox.bytes}

    async def _send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last = 0.0
        try:
            while True:
                await self.outbox.wait()
                if loop.time() - last < CORK_BUSY and self.outbox.bulk:
                    full = MAX_CHUNK - (self.outbox.max_frame + 4)
                    await self.outbox.wait_fill(full, CORK_DELAY)
                self.frames_out += await self._send_batch()
                self.batches_out += 1
                last = loop.time()
        except StreamReset as exc:
            self._closing(f"stream reset: {exc}")

    async def _send_batch(self) -> int:
        """Send the next batch; how many frames it took. One big enough for the link's ring
        is built in it (each frame copied once, where the mux reads it); else it is joined
        and written (which may wait for credit)."""
        outbox = self.outbox
        if outbox.bytes + 4 * len(outbox) >= RING_MIN_PAYLOAD:
            size, count = outbox.batch_size()
            if size >= RING_MIN_PAYLOAD and self.stream.write_built(
                    size, functools.partial(outbox.take_into, count)):
                return count
        batch, count = outbox.take_batch()
        await self.stream.write(batch)
        return count

    async def _recv_loop(self) -> None:
        try:
            while True:
                chunk = await self.stream.read()
                if not chunk:
                    self._closing("peer ended the stream")
                    return
                for frame in self._decoder.feed(chunk):
                    self.frames_in += 1
                    self.deliver(frame)
        except StreamReset as exc:
            self._closing(f"stream reset: {exc}")
        except ProtocolError as exc:
            self._closing(f"bad data from the peer: {exc}")

    def _closing(self, reason: str) -> None:
        if not self.closed.is_set():
            self.reason = reason
            log.info("%s: bearer stream=%d ended: %s", self.label, self.stream.id, reason)
            self.closed.set()

    async def close(self, reason: str) -> None:
        """Stop both loops and reset the stream (if the peer did not already)."""
        self._closing(reason)
        current = asyncio.current_task()
        for t in self._tasks:
            if t is not current:
                t.cancel()
        await asyncio.gather(*(t for t in self._tasks if t is not current),
                             return_exceptions=True)
        try:
            await self.stream.reset(reason)
        except Exception as exc:  # noqa: BLE001 (the mux may be gone too: nothing to tell)
            log.debug("%s: reset of stream %d failed: %s", self.label, self.stream.id, exc)


class TunReader:
    """Reads the TUN device whenever the kernel has packets and routes each frame."""

    def __init__(self, tun: TunDevice, route: Callable[[bytes], None]) -> None:
        self.tun = tun
        self.route = route
        self.frames = 0

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.tun.fd, self._on_readable)

    def stop(self) -> None:
        if self.tun.fd >= 0:
            asyncio.get_running_loop().remove_reader(self.tun.fd)

    def _on_readable(self) -> None:
        frames = self.tun.read_frames(READ_BUDGET_FRAMES, READ_BUDGET_BYTES)
        self.frames += len(frames)
        route = self.route
        for frame in frames:
            route(frame)
