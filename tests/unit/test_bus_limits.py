"""The stream table's caps and budgets per VM and in total (no sockets, no ZeroMQ)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from vmbusify.bus.budget import TX_STUCK_AFTER
from vmbusify.bus.streams import BUFFER_LIMIT_REASON, Stream, StreamReset, StreamTable
from vmbusify.config import LimitsConfig
from vmbusify.errors import LimitReached
from vmbusify.protocol.entities import Entity
from vmbusify.protocol.package import Package, PackageFlag, PackageType
from vmbusify.protocol.window import INITIAL_WINDOW, MAX_CHUNK, decode_increment, encode_increment

LOCAL, PEER, MID = Entity.PROXY_CLIENT, Entity.PROXY_SERVER, 7


class Wire:
    """Captures what a table sends, per vmid."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Package]] = []

    async def send(self, vmid: str, pkg: Package) -> None:
        self.sent.append((vmid, pkg))

    def data(self, vmid: str, stream: int) -> int:
        return sum(len(p.payload) for v, p in self.sent
                   if v == vmid and p.stream == stream and p.type is PackageType.DATA
                   and not p.flags)

    def resets(self) -> list[tuple[str, int, str]]:
        return [(v, p.stream, bytes(p.payload).decode()) for v, p in self.sent
                if p.type is PackageType.DATA and p.flags & PackageFlag.RESET]


def table(**limits: int) -> tuple[StreamTable, Wire]:
    wire = Wire()
    return StreamTable(wire.send, LimitsConfig(**limits)), wire  # type: ignore[arg-type]


def run(coro: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(coro(), 10))


def data(stream: Stream, n: int, flags: PackageFlag = PackageFlag.NONE) -> Package:
    """A DATA package from the peer on ``stream``."""
    return Package(type=PackageType.DATA, flags=flags, entity=stream.peer, message_id=MID,
                   stream=stream.id, payload=b"x" * n)


def window(stream: Stream, n: int) -> Package:
    return Package(type=PackageType.WINDOW, entity=stream.peer, message_id=MID, stream=stream.id,
                   payload=encode_increment(n))


# -- streams ---------------------------------------------------------------------------------

def test_streams_are_capped_per_vm_and_in_total_with_the_reason() -> None:
    async def scenario() -> None:
        t, _ = table(streams_per_vm=2, streams_total=3)
        a = t.open("vm1", LOCAL, PEER, MID)
        t.open("vm1", LOCAL, PEER, MID)
        with pytest.raises(LimitReached, match=r"^vm1: 2 streams open: limit reached$"):
            t.open("vm1", LOCAL, PEER, MID)
        open_req = Package(type=PackageType.REQUEST, entity=PEER, message_id=1, id=5, stream=99)
        with pytest.raises(LimitReached, match="vm1: 2 streams open"):
            t.accept("vm1", LOCAL, open_req, MID)
        t.open("vm2", LOCAL, PEER, MID)  # another VM is not refused for vm1's streams
        with pytest.raises(LimitReached, match="3 streams open with all VMs: limit reached"):
            t.open("vm3", LOCAL, PEER, MID)
        assert t.room_for("vm2") != ""
        await a.reset("done")  # a finished stream gives its place back
        t.accept("vm1", LOCAL, open_req, MID)
        assert t.budget.snapshot() == {"vm1": {"streams_refused": 2},
                                       "vm3": {"streams_refused": 1},
                                       "vm2": {"streams_refused": 1}}
        assert len(t) == 3

    run(scenario)


def test_a_closed_or_forgotten_stream_is_no_longer_charged() -> None:
    async def scenario() -> None:
        t, _ = table(streams_per_vm=1)
        s = t.open("vm1", LOCAL, PEER, MID)
        await s.write_eof()
        await t.on_package("vm1", data(s, 0, PackageFlag.EOF))  # both ends done: closed
        t.open("vm1", LOCAL, PEER, MID)
        t.forget(s)  # forgetting twice changes nothing
        with pytest.raises(LimitReached):
            t.open("vm1", LOCAL, PEER, MID)

    run(scenario)


# -- bytes received and not yet read ------------------------------------------------------------

def test_unread_bytes_past_the_vm_cap_reset_the_stream_that_brought_them() -> None:
    async def scenario() -> None:
        t, wire = table(buffered_per_vm=1000, buffered_total=10_000)
        a = t.open("vm1", LOCAL, PEER, MID)
        b = t.open("vm1", LOCAL, PEER, MID)
        other = t.open("vm2", LOCAL, PEER, MID)
        await t.on_package("vm1", data(a, 600))
        await t.on_package("vm1", data(b, 600))  # 1200 unread for vm1: b is reset
        assert wire.resets() == [("vm1", b.id, BUFFER_LIMIT_REASON)]
        with pytest.raises(StreamReset, match=BUFFER_LIMIT_REASON):
            await b.read()
        await t.on_package("vm2", data(other, 900))  # vm2 has its own share
        assert len(await a.read()) == 600  # read: room again
        c = t.open("vm1", LOCAL, PEER, MID)
        await t.on_package("vm1", data(c, 1000))
        assert c.buffered == 1000
        assert t.budget.snapshot() == {"vm1": {"buffer_resets": 1}}
        assert t.budget.vm("vm1").rx == 1000 and t.budget.rx == 1900

    run(scenario)


def test_unread_bytes_are_capped_in_total() -> None:
    async def scenario() -> None:
        t, wire = table(buffered_per_vm=1000, buffered_total=1500)
        a = t.open("vm1", LOCAL, PEER, MID)
        b = t.open("vm2", LOCAL, PEER, MID)
        await t.on_package("vm1", data(a, 1000))
        await t.on_package("vm2", data(b, 600))
        assert wire.resets() == [("vm2", b.id, BUFFER_LIMIT_REASON)]
        await a.reset("gone")  # a reset stream's unread bytes are given back
        assert t.budget.rx == 0 and a.buffered == 0

    run(scenario)


# -- bytes sent and not yet credited back ------------------------------------------------------

def test_writers_wait_for_the_vms_send_budget_and_are_served_in_order() -> None:
    """A VM that grants credit on many streams and reads none holds at most its cap."""

    async def scenario() -> None:
        cap = 2 * MAX_CHUNK
        t, wire = table(buffered_per_vm=cap)
        streams = [t.open("vm1", LOCAL, PEER, MID) for _ in range(4)]
        blob = b"y" * MAX_CHUNK * 3
        writers = []
        for s in streams:
            writers.append(asyncio.ensure_future(s.write(blob)))
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        m = MAX_CHUNK
        assert [wire.data("vm1", s.id) for s in streams] == [2 * m, 0, 0, 0]  # first come
        assert not any(w.done() for w in writers)
        # vm2 is not held back by vm1's budget
        await asyncio.wait_for(t.open("vm2", LOCAL, PEER, MID).write(blob[:cap]), 1)
        # credit back: the writers in line get it, in the order they came
        await t.on_package("vm1", window(streams[0], m))
        await asyncio.sleep(0.01)
        assert [wire.data("vm1", s.id) for s in streams] == [3 * m, 0, 0, 0]
        assert writers[0].done()
        await t.on_package("vm1", window(streams[0], m))
        await asyncio.sleep(0.01)
        assert [wire.data("vm1", s.id) for s in streams] == [3 * m, m, 0, 0]
        # a stream that ends gives back what was never credited: the next in line goes on
        await streams[1].reset("gone")
        await asyncio.sleep(0.01)
        with pytest.raises(StreamReset):
            await writers[1]
        assert [wire.data("vm1", s.id) for s in streams] == [3 * m, m, m, 0]
        assert t.budget.vm("vm1").tx == cap
        for w in writers:
            w.cancel()
        await asyncio.gather(*writers, return_exceptions=True)

    run(scenario)


def test_a_writer_waiting_for_the_budget_learns_of_its_reset() -> None:
    async def scenario() -> None:
        t, _ = table(buffered_per_vm=MAX_CHUNK)
        a = t.open("vm1", LOCAL, PEER, MID)
        b = t.open("vm1", LOCAL, PEER, MID)
        await a.write(b"z" * MAX_CHUNK)
        waiting = asyncio.ensure_future(b.write(b"z"))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        await t.on_package("vm1", data(b, 0, PackageFlag.RESET))
        with pytest.raises(StreamReset, match="reset by peer"):
            await asyncio.wait_for(waiting, 1)
        assert not t.budget.vm("vm1").waiters

    run(scenario)


def test_a_cancelled_writer_gives_its_budget_back() -> None:
    async def scenario() -> None:
        t, _ = table(buffered_per_vm=MAX_CHUNK)
        a = t.open("vm1", LOCAL, PEER, MID)
        b = t.open("vm1", LOCAL, PEER, MID)
        await a.write(b"z" * MAX_CHUNK)
        waiting = asyncio.ensure_future(b.write(b"z"))
        await asyncio.sleep(0.01)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await t.on_package("vm1", window(a, MAX_CHUNK))
        assert t.budget.vm("vm1").tx == 0 and not t.budget.vm("vm1").waiters

    run(scenario)


# -- a peer breaking flow control ---------------------------------------------------------------

@pytest.mark.parametrize("credit", [1, 0xFFFFFFFF, 0])
def test_credit_beyond_the_window_or_zero_resets_the_stream(credit: int) -> None:
    async def scenario() -> None:
        t, wire = table()
        s = t.open("vm1", LOCAL, PEER, MID)
        ok = t.open("vm1", LOCAL, PEER, MID)
        await t.on_package("vm1", window(s, credit))  # nothing was sent: no credit is owed
        assert [r[:2] for r in wire.resets()] == [("vm1", s.id)]
        assert "window" in wire.resets()[0][2] or "of 0" in wire.resets()[0][2]
        with pytest.raises(StreamReset):
            await s.write(b"x")
        await ok.write(b"still fine")
        assert t.budget.snapshot() == {"vm1": {"credit_resets": 1}}

    run(scenario)


def test_data_past_the_credit_given_resets_the_stream() -> None:
    async def scenario() -> None:
        t, wire = table()
        s = t.open("vm1", LOCAL, PEER, MID)
        for _ in range(INITIAL_WINDOW // MAX_CHUNK):
            await t.on_package("vm1", data(s, MAX_CHUNK))
        assert not wire.resets()
        await t.on_package("vm1", data(s, 1))
        assert wire.resets()[0][:2] == ("vm1", s.id)
        assert t.budget.snapshot() == {"vm1": {"credit_resets": 1}}
        assert t.budget.rx == 0  # the reset stream's bytes are not held

    run(scenario)


def test_data_after_eof_is_a_bad_package() -> None:
    async def scenario() -> None:
        t, wire = table()
        s = t.open("vm1", LOCAL, PEER, MID)
        await t.on_package("vm1", data(s, 0, PackageFlag.EOF))
        await t.on_package("vm1", data(s, 5))
        assert wire.resets() == [("vm1", s.id, "DATA after EOF")]
        assert t.budget.snapshot() == {"vm1": {"bad_packages": 1}}

    run(scenario)


def test_packages_for_no_open_stream_are_counted_and_logged_a_few_times(
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        t, wire = table(log_lines_per_minute=3)
        s = t.open("vm1", LOCAL, PEER, MID)
        await s.reset("bye")
        wire.sent.clear()
        for i in range(500):
            await t.on_package("vm1", data(s, 10) if i % 2 else window(s, 10))
        assert wire.sent == []
        # WINDOWs for a finished stream carry nothing (a peer paying credit as the stream
        # ended, StreamTable.pay_owed): dropped uncounted; the DATA is counted
        assert t.budget.snapshot() == {"vm1": {"unknown_stream": 250}}

    with caplog.at_level(logging.INFO, logger="vmbusify.bus.streams"):
        run(scenario)
    lines = [r for r in caplog.records if "no open stream" in r.getMessage()]
    assert len(lines) == 3
    assert "vm=vm1" in lines[0].getMessage()


def test_a_peers_reset_reason_is_kept_as_printable_text() -> None:
    async def scenario() -> None:
        t, _ = table()
        s = t.open("vm1", LOCAL, PEER, MID)
        evil = Package(type=PackageType.DATA, flags=PackageFlag.RESET, entity=PEER, message_id=MID,
                       stream=s.id,
                       payload=b"gone\n2026-12-03 INFO forged line")
        await t.on_package("vm1", evil)
        assert "\n" not in s.reset_reason and "\\x0a" in s.reset_reason

    run(scenario)


def test_no_new_stream_while_the_vms_send_budget_is_stuck() -> None:
    """A VM that holds its whole budget unacknowledged for TX_STUCK_AFTER gets new opens
    refused with the reason (they would only wait); a budget that just filled is busy, not
    stuck, and refuses nothing; once credit comes back, opens work again."""
    async def scenario() -> None:
        t, _ = table(buffered_per_vm=2 * MAX_CHUNK)
        now = [100.0]
        t.budget.clock = lambda: now[0]
        a = t.open("vm1", LOCAL, PEER, MID)
        await a.write(b"q" * 2 * MAX_CHUNK)
        t.open("vm1", LOCAL, PEER, MID)  # just filled: a burst, not a stall
        now[0] += TX_STUCK_AFTER
        with pytest.raises(LimitReached, match=r"^vm1: 2 MiB sent and not yet acknowledged"):
            t.accept("vm1", LOCAL, Package(type=PackageType.REQUEST, entity=PEER, id=5,
                                           message_id=1, stream=99), MID)
        t.open("vm2", LOCAL, PEER, MID)  # another VM is not refused
        await t.on_package("vm1", window(a, MAX_CHUNK))
        t.open("vm1", LOCAL, PEER, MID)
        assert t.budget.snapshot() == {"vm1": {"streams_refused": 1}}

    run(scenario)


def test_short_streams_together_owe_at_most_a_quarter_of_the_budget() -> None:
    """Each stream returns credit at a quarter of its window; streams that each bring less
    return theirs together once the VM is owed a quarter of buffered_per_vm, so the peer's
    send budget is never held by bytes already read."""
    async def scenario() -> None:
        t, wire = table(buffered_per_vm=4 * MAX_CHUNK)
        streams = [t.accept("vm1", LOCAL, Package(type=PackageType.REQUEST, entity=PEER,
                                                  id=i, message_id=1, stream=i), MID)
                   for i in range(1, 41)]
        for s in streams:
            await t.on_package("vm1", Package(type=PackageType.DATA, entity=PEER,
                                              message_id=MID, stream=s.id,
                                              payload=b"x" * (64 << 10)))
            assert len(await s.read()) == 64 << 10
        granted: dict[int, int] = {}
        for _, p in wire.sent:
            assert p.type is PackageType.WINDOW
            granted[p.stream] = granted.get(p.stream, 0) + decode_increment(p.payload)
        owed = 40 * (64 << 10) - sum(granted.values())
        assert 0 <= owed <= MAX_CHUNK == t.owed_max
        assert len(granted) > 16  # paid in whole rounds, each stream its own

    run(scenario)


def test_a_burst_of_short_echoed_streams_never_stalls() -> None:
    """Two tables joined back to back, a budget far below what the burst sends: 64 streams
    each send 256 KiB (in 64 KiB pieces) and EOF, the far end echoes each whole and EOFs,
    and every byte comes back. (Before credit was paid per VM, each stream kept its 256 KiB
    charged until it ended, the budget filled with half-sent streams, and the burst stalled
    for good.)"""
    async def scenario() -> None:
        limits = LimitsConfig(buffered_per_vm=2 * MAX_CHUNK)
        tables: dict[str, StreamTable] = {}
        queue: asyncio.Queue[tuple[str, Package]] = asyncio.Queue()

        async def to_b(vmid: str, pkg: Package) -> None:
            await queue.put(("b", pkg))

        async def to_a(vmid: str, pkg: Package) -> None:
            await queue.put(("a", pkg))

        a, b = StreamTable(to_b, limits), StreamTable(to_a, limits)
        tables.update(a=a, b=b)

        async def wire() -> None:
            while True:
                side, pkg = await queue.get()
                await tables[side].on_package("vm1", pkg)

        async def echo(s: Stream) -> None:
            while data := await s.read():
                await s.write(bytes(data))
            await s.write_eof()

        async def one(i: int) -> bool:
            s = a.open("vm1", LOCAL, PEER, MID)
            far = b.accept("vm1", PEER, Package(type=PackageType.REQUEST, entity=LOCAL, id=i,
                                               message_id=1, stream=s.id), MID)
            echoer = asyncio.ensure_future(echo(far))
            payload = bytes([i]) * (256 << 10)

            async def send() -> None:  # in pieces, as a relay reads them from its socket
                for k in range(0, len(payload), 64 << 10):
                    await s.write(payload[k:k + (64 << 10)])
                    await asyncio.sleep(0)
                await s.write_eof()

            sender = asyncio.ensure_future(send())
            got = bytearray()
            while chunk := await s.read():
                got += chunk
            await sender
            await echoer
            return bytes(got) == payload

        w = asyncio.ensure_future(wire())
        try:
            results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(64))), 5)
        finally:
            w.cancel()
        assert all(results)
        assert a.budget.snapshot() == b.budget.snapshot() == {}

    run(scenario)
