"""Stream.write_built: a payload built straight in the link's buffer (a worker's ring) and
sent as that very buffer, or nothing done at all."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.unit.test_bus_limits import LOCAL, MID, PEER, Wire, run, window
from vmbusify.bus.streams import COALESCE_MIN, StreamReset, StreamTable
from vmbusify.config import LimitsConfig
from vmbusify.errors import TunnelError
from vmbusify.protocol.package import PackageType
from vmbusify.protocol.window import INITIAL_WINDOW, MAX_CHUNK


class Buffers:
    """A link's buffer: hands out views of its own memory, one at a time, or none."""

    def __init__(self, room: bool = True) -> None:
        self.room = room
        self.given: list[memoryview] = []
        self.returned: list[memoryview] = []

    def buffer(self, n: int) -> memoryview | None:
        if not self.room:
            return None
        view = memoryview(bytearray(n))
        self.given.append(view)
        return view

    def unbuffer(self, view: memoryview) -> None:
        self.returned.append(view)


def make(room: bool = True, **limits: int) -> tuple[StreamTable, Wire, Buffers]:
    wire, bufs = Wire(), Buffers(room)
    t = StreamTable(wire.send, LimitsConfig(**limits),
                    send_now=lambda vmid, pkg: wire.sent.append((vmid, pkg)),
                    buffer=bufs.buffer, unbuffer=bufs.unbuffer)
    return t, wire, bufs


def fill(byte: int) -> Callable[[memoryview], None]:
    def build(view: memoryview) -> None:
        view[:] = bytes([byte]) * len(view)
    return build


def test_the_payload_sent_is_the_buffer_it_was_built_in() -> None:
    t, wire, bufs = make()
    s = t.open("vm1", LOCAL, PEER, MID)
    assert s.write_built(100_000, fill(7))
    (vmid, pkg), = wire.sent
    assert vmid == "vm1" and pkg.type is PackageType.DATA and pkg.stream == s.id
    assert pkg.payload is bufs.given[0]  # not a copy
    assert bytes(pkg.payload) == b"\x07" * 100_000
    assert s.bytes_out == 100_000 and t.budget.vm("vm1").tx == 100_000


def test_nothing_is_done_without_the_credit_or_a_buffer_for_all_of_it() -> None:
    t, wire, bufs = make()
    s = t.open("vm1", LOCAL, PEER, MID)
    for _ in range(INITIAL_WINDOW // MAX_CHUNK - 1):
        assert s.write_built(MAX_CHUNK, fill(1))
    assert s.write_built(MAX_CHUNK - 10, fill(1))
    sent = len(wire.sent)
    assert not s.write_built(100, fill(2))  # 10 bytes of credit
    assert len(wire.sent) == sent and len(bufs.given) == sent
    assert t.budget.vm("vm1").tx == INITIAL_WINDOW - 10  # nothing taken for the refused one
    run(lambda: t.on_package("vm1", window(s, INITIAL_WINDOW - 10)))
    assert s.write_built(100, fill(2))
    assert not s.write_built(MAX_CHUNK + 1, fill(3))  # more than a package
    # The VM's send budget (shared by its streams) short: nothing taken either.
    t2, _wire2, _ = make(buffered_per_vm=50_000)
    s2 = t2.open("vm1", LOCAL, PEER, MID)
    assert not s2.write_built(60_000, fill(4))
    assert t2.budget.vm("vm1").tx == 0


def test_no_buffer_gives_the_budget_back_and_a_failed_build_the_buffer() -> None:
    t, wire, _ = make(room=False)
    s = t.open("vm1", LOCAL, PEER, MID)
    assert not s.write_built(100_000, fill(1))
    assert wire.sent == [] and t.budget.vm("vm1").tx == 0 and s.bytes_out == 0

    t, wire, bufs = make()
    s = t.open("vm1", LOCAL, PEER, MID)

    def broken(view: memoryview) -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        s.write_built(100_000, broken)
    assert bufs.returned == bufs.given and wire.sent == [] and t.budget.vm("vm1").tx == 0
    assert s.write_built(100_000, fill(5))  # the credit is all there


def test_held_bytes_go_first_and_a_table_that_may_wait_is_not_built_for() -> None:
    t, wire, _ = make()
    s = t.open("vm1", LOCAL, PEER, MID)

    async def go() -> None:
        await s.write(b"h" * COALESCE_MIN)  # held for the next loop turn
        assert wire.sent == []
        assert s.write_built(COALESCE_MIN, fill(9))

    run(go)
    assert [bytes(p.payload)[:1] for _, p in wire.sent] == [b"h", b"\x09"]
    plain = StreamTable(Wire().send, LimitsConfig())  # no send_now, no buffer
    assert not plain.open("vm1", LOCAL, PEER, MID).write_built(100_000, fill(1))


def test_a_reset_stream_raises() -> None:
    t, _wire, _ = make()
    s = t.open("vm1", LOCAL, PEER, MID)
    s._abort("gone")
    with pytest.raises(StreamReset):
        s.write_built(100_000, fill(1))


def test_a_send_that_fails_gives_the_buffer_back() -> None:
    """The link closed under the send: the buffer was never placed, so its room goes back
    (else the ring would stay held by a payload that never left)."""
    bufs = Buffers()

    def closed(vmid: str, pkg: object) -> None:
        raise TunnelError("the link to the mux is closed")

    t = StreamTable(Wire().send, LimitsConfig(), send_now=closed, buffer=bufs.buffer,
                    unbuffer=bufs.unbuffer)
    s = t.open("vm1", LOCAL, PEER, MID)
    with pytest.raises(TunnelError):
        s.write_built(100_000, fill(1))
    assert bufs.returned == bufs.given
