"""The proxy's relay (workers/proxy/relay.py): a connection as a protocol of the loop's
transport, tied to a stream's credit both ways, with half-close and resets."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from tests.unit.test_bus_limits import LOCAL, MID, PEER, Wire, run, window
from vmbusify.bus.streams import Stream, StreamTable
from vmbusify.config import LimitsConfig
from vmbusify.protocol.package import Package, PackageFlag, PackageType
from vmbusify.protocol.window import INITIAL_WINDOW, MAX_CHUNK
from vmbusify.workers.proxy.relay import (
    PRE_RELAY_LIMIT,
    PRE_RELAY_READ,
    READ_SIZE,
    WRITE_HIGH,
    SocketEnd,
    relay,
)


class FakeSocket:
    def __init__(self) -> None:
        self.options: list[tuple[int, int, bytes]] = []

    def setsockopt(self, level: int, opt: int, value: bytes) -> None:
        self.options.append((level, opt, value))


class FakeTransport:
    """What SocketEnd uses of a transport; it calls pause_writing past WRITE_HIGH."""

    def __init__(self, end: SocketEnd) -> None:
        self.end = end
        self.written = bytearray()
        self.eof = False
        self.reading = True
        self.closing = False
        self.aborted = False
        self.sock = FakeSocket()
        self.full = False  # the user reads nothing: everything written stays buffered
        end.connection_made(self)  # type: ignore[arg-type]

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        self.high = high

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else ("127.0.0.1", 4242)

    def write(self, data: Any) -> None:
        assert not self.closing
        self.written += data
        if self.full and len(self.written) > self.high:
            self.end.pause_writing()

    def drain(self) -> None:
        """The user read everything."""
        self.full = False
        self.end.resume_writing()

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self._lost(None)

    def abort(self) -> None:
        self.aborted = True
        self._lost(None)

    def _lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.end.connection_lost, exc)


def setup() -> tuple[StreamTable, Wire, Stream, SocketEnd, FakeTransport]:
    wire = Wire()
    t = StreamTable(wire.send, LimitsConfig(),
                    send_now=lambda vmid, pkg: wire.sent.append((vmid, pkg)))
    stream = t.open("vm1", LOCAL, PEER, MID)
    end = SocketEnd(asyncio.get_running_loop())
    return t, wire, stream, end, FakeTransport(end)


def feed(end: SocketEnd, data: bytes) -> None:
    """``data`` as the transport gives it: into the protocol's buffer, a read at a time."""
    while data:
        buf = end.get_buffer(-1)
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        end.buffer_updated(n)
        data = data[n:]


def data(stream: Stream, payload: bytes = b"", flags: PackageFlag = PackageFlag.NONE
         ) -> Package:
    return Package(type=PackageType.DATA, flags=flags, entity=stream.peer, message_id=MID,
                   stream=stream.id, payload=payload)


def sent(wire: Wire, kind: PackageType = PackageType.DATA) -> list[Package]:
    return [p for _, p in wire.sent if p.type is kind]


def test_a_user_that_reads_nothing_stops_the_stream_being_read() -> None:
    """The guest's users are untrusted: a slow reader leaves what the far side sends in the
    stream (within its credit window), not in the proxy's buffers."""
    async def go() -> None:
        t, wire, stream, end, tr = setup()
        tr.full = True
        task = asyncio.ensure_future(relay(end, stream, "test"))
        await asyncio.sleep(0)
        for _ in range(6):
            await t.on_package("vm1", data(stream, b"x" * MAX_CHUNK))
        assert len(tr.written) == MAX_CHUNK  # one chunk past the high-water mark, no more
        assert len(tr.written) <= WRITE_HIGH + MAX_CHUNK
        assert stream.buffered == 5 * MAX_CHUNK
        assert not sent(wire, PackageType.WINDOW)  # no credit for what was not read
        tr.written.clear()
        tr.drain()
        assert len(tr.written) == 5 * MAX_CHUNK and stream.buffered == 0
        await t.on_package("vm1", data(stream, flags=PackageFlag.EOF))
        assert tr.eof
        task.cancel()
    run(go)


def test_reading_pauses_without_credit_and_resumes_with_it() -> None:
    async def go() -> None:
        t, wire, stream, end, tr = setup()
        task = asyncio.ensure_future(relay(end, stream, "test"))
        await asyncio.sleep(0)
        block = bytes(range(256)) * 4096  # 1 MiB
        for _ in range(INITIAL_WINDOW // len(block) + 1):
            feed(end, block)
        assert not tr.reading  # the window is spent: the socket is not read meanwhile
        await asyncio.sleep(0)
        assert sum(len(p.payload) for p in sent(wire)) == INITIAL_WINDOW
        await t.on_package("vm1", window(stream, INITIAL_WINDOW))
        for _ in range(3):
            await asyncio.sleep(0)
        assert tr.reading
        assert b"".join(bytes(p.payload) for p in sent(wire)) == block * 9
        task.cancel()
    run(go)


def test_half_close_each_way_then_a_clean_close() -> None:
    async def go() -> None:
        t, wire, stream, end, tr = setup()
        task = asyncio.ensure_future(relay(end, stream, "test"))
        await asyncio.sleep(0)
        feed(end, b"request")
        end.eof_received()
        assert [(bytes(p.payload), p.flags) for p in sent(wire)] == [
            (b"request", PackageFlag.NONE), (b"", PackageFlag.EOF)]
        assert not tr.closing  # the reply may still come
        await t.on_package("vm1", data(stream, b"reply"))
        await t.on_package("vm1", data(stream, flags=PackageFlag.EOF))
        assert bytes(tr.written) == b"reply" and tr.eof
        await asyncio.wait_for(task, 1)
        assert tr.closing and not tr.aborted and not wire.resets()
    run(go)


def test_a_reset_stream_aborts_the_connection_with_an_rst() -> None:
    async def go() -> None:
        t, wire, stream, end, tr = setup()
        task = asyncio.ensure_future(relay(end, stream, "test"))
        await asyncio.sleep(0)
        await t.on_package("vm1", data(stream, b"gone", PackageFlag.RESET))
        await asyncio.wait_for(task, 1)
        assert tr.aborted
        assert tr.sock.options == [(socket.SOL_SOCKET, socket.SO_LINGER,
                                    b"\x01\x00\x00\x00\x00\x00\x00\x00")]
        assert not wire.resets()  # the peer knows already
    run(go)


def test_a_socket_error_resets_the_stream() -> None:
    async def go() -> None:
        _t, wire, stream, end, _tr = setup()
        task = asyncio.ensure_future(relay(end, stream, "test"))
        await asyncio.sleep(0)
        end.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
        await asyncio.wait_for(task, 1)
        assert wire.resets() == [
            ("vm1", stream.id, "socket error: [Errno 104] Connection reset by peer")]
    run(go)


def test_what_arrives_before_the_relay_is_bounded_and_goes_first() -> None:
    async def go() -> None:
        _t, wire, stream, end, tr = setup()
        feed(end, b"hello")
        assert await end.recv() == b"hello"
        assert len(end.get_buffer(-1)) == PRE_RELAY_READ  # a read brings little until then
        feed(end, b"y" * (PRE_RELAY_LIMIT + 1))
        assert not tr.reading  # past the bound: the kernel keeps the rest
        end.eof_received()
        task = asyncio.ensure_future(relay(end, stream, "test"))
        await asyncio.sleep(0)
        assert [(len(p.payload), p.flags) for p in sent(wire)] == [
            (PRE_RELAY_LIMIT + 1, PackageFlag.NONE), (0, PackageFlag.EOF)]
        assert len(end.get_buffer(-1)) == READ_SIZE
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert wire.resets() == [("vm1", stream.id, "proxy stopping")] and tr.aborted
    run(go)


def test_nothing_is_sent_to_a_connection_already_gone() -> None:
    """A user that hung up while the far side connected: the reply is dropped quietly (a
    write on uvloop's closed transport would raise RuntimeError out of the handler)."""
    async def go() -> None:
        _t, _wire, _stream, end, tr = setup()
        end.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
        end.send(b"\x05\x00\x00\x01")
        assert not tr.written
        end.abort()
        assert not tr.aborted
    run(go)
