"""Stream.write holds large writes to send them together (up to MAX_CHUNK a package)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.unit.test_bus_limits import LOCAL, MID, PEER, Wire, run, window
from vmbusify.bus.streams import COALESCE_MIN, StreamReset, StreamTable
from vmbusify.config import LimitsConfig
from vmbusify.errors import TunnelError
from vmbusify.protocol.package import PackageFlag, PackageType
from vmbusify.protocol.window import INITIAL_WINDOW, MAX_CHUNK

MakeTable = Callable[[], tuple[StreamTable, Wire]]


@pytest.fixture(params=["send_now", "send only"])
def table(request: pytest.FixtureRequest) -> MakeTable:
    """A table whose held bytes go from a loop callback (a worker's link) or a task."""
    def make() -> tuple[StreamTable, Wire]:
        wire = Wire()
        send_now = (lambda vmid, pkg: wire.sent.append((vmid, pkg))) \
            if request.param == "send_now" else None
        return StreamTable(wire.send, LimitsConfig(), send_now=send_now), wire
    return make


def sizes(wire: Wire) -> list[tuple[int, PackageFlag]]:
    return [(len(p.payload), p.flags) for _, p in wire.sent if p.type is PackageType.DATA]


def test_quarter_mib_writes_go_out_as_one_mib_packages(table: MakeTable) -> None:
    async def go() -> None:
        t, wire = table()
        s = t.open("vm1", LOCAL, PEER, MID)
        block = bytes(range(256)) * 1024  # 256 KiB
        for _ in range(6):
            await s.write(block)
        assert sizes(wire) == [(MAX_CHUNK, PackageFlag.NONE)]  # the rest is held...
        await asyncio.sleep(0)
        assert sizes(wire)[1:] == [(2 * len(block), PackageFlag.NONE)]  # ...one loop turn
        assert b"".join(bytes(p.payload) for _, p in wire.sent) == block * 6

    run(go)


def test_small_writes_go_at_once_and_eof_follows_held_bytes(table: MakeTable) -> None:
    async def go() -> None:
        t, wire = table()
        s = t.open("vm1", LOCAL, PEER, MID)
        await s.write(b"ls\n")
        assert sizes(wire) == [(3, PackageFlag.NONE)]
        buf = bytearray(COALESCE_MIN)
        await s.write(buf)
        buf[:] = b"x" * len(buf)  # the caller reuses its buffer: what was written is kept
        await s.write(b"!")  # behind held bytes: held too, in order
        await s.write_eof()
        assert sizes(wire) == [(3, PackageFlag.NONE), (COALESCE_MIN + 1, PackageFlag.NONE),
                               (0, PackageFlag.EOF)]
        assert bytes(wire.sent[1][1].payload) == bytes(COALESCE_MIN) + b"!"

    run(go)


def test_held_bytes_go_before_the_writer_waits_for_credit(table: MakeTable) -> None:
    async def go() -> None:
        t, wire = table()
        s = t.open("vm1", LOCAL, PEER, MID)
        block = b"z" * (COALESCE_MIN * 3)
        writer = asyncio.ensure_future(s.write(block * ((INITIAL_WINDOW // len(block)) + 2)))
        await asyncio.sleep(0.01)
        assert not writer.done()  # out of credit, and everything it took is on the wire
        assert sum(n for n, _ in sizes(wire)) == INITIAL_WINDOW
        assert max(n for n, _ in sizes(wire)) <= MAX_CHUNK
        await t.on_package("vm1", window(s, INITIAL_WINDOW))
        await asyncio.wait_for(writer, 5)

    run(go)


def test_a_reset_drops_held_bytes(table: MakeTable) -> None:
    async def go() -> None:
        t, wire = table()
        s = t.open("vm1", LOCAL, PEER, MID)
        await s.write(b"q" * COALESCE_MIN)
        await s.reset("gone")
        await asyncio.sleep(0)
        assert [f for _, f in sizes(wire)] == [PackageFlag.RESET]
        try:
            await s.write(b"more")
        except StreamReset:
            pass
        else:
            raise AssertionError("a write after the reset was taken")

    run(go)


def test_a_failed_send_of_held_bytes_reaches_the_writer() -> None:
    """Held bytes go from a loop callback: if the mux is gone by then, the writer's next
    write and its EOF say so instead of the bytes vanishing without a word."""
    async def go() -> None:
        def gone(vmid: str, pkg: object) -> None:
            raise TunnelError("cannot reach the mux: gone")
        wire = Wire()
        s = StreamTable(wire.send, LimitsConfig(), send_now=gone).open("vm1", LOCAL, PEER, MID)
        await s.write(b"h" * COALESCE_MIN)
        await asyncio.sleep(0)  # the callback runs, and fails
        with pytest.raises(TunnelError, match="gone"):
            await s.write(b"more")
        with pytest.raises(TunnelError, match="gone"):
            await s.write_eof()

    run(go)
