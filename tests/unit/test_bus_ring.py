"""The shared-memory ring beside the bus (vmbusify/bus/ring.py): its accounting as codecs,
its files, and one end's pair of rings without sockets."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmbusify.bus.frames import (
    PkgRef,
    Reg,
    RegOk,
    Release,
    from_mux,
    from_worker,
)
from vmbusify.bus.lanes import Lane, LaneSender, classify
from vmbusify.bus.ring import (
    GUARD,
    REF,
    RING_MIN_PAYLOAD,
    RING_UNIT,
    Ring,
    RingLink,
    RingSpace,
    RingTake,
    remove_stale,
    ring_names,
    ring_size_from_env,
)
from vmbusify.bus.sockets import LanedDealer
from vmbusify.errors import BusError, RemoteProtocolError
from vmbusify.protocol.package import Package, PackageType

KIB = 1 << 10
SIZE = 1 << 20


# -- the producer's accounting -------------------------------------------------------------

def test_space_reserves_in_order_until_full() -> None:
    space = RingSpace(1000)
    assert space.reserve(400) == 0
    assert space.reserve(400) == 400
    assert space.reserve(300) is None  # 200 left at the end, nothing released
    assert space.head == 800


def test_space_wraps_to_the_beginning_and_skips_the_tail() -> None:
    space = RingSpace(1000)
    assert space.reserve(400) == 0
    assert space.reserve(400) == 400
    space.release(400)
    # 300 do not fit before the end (200 left): they start at the next lap's beginning.
    assert space.reserve(300) == 1000
    assert space.head == 1300
    space.release(800)
    assert space.reserve(500) == 1300
    assert space.reserve(1) is None  # 1800 - 800 = 1000: full


def test_space_refuses_what_can_never_fit_and_a_release_past_its_head() -> None:
    space = RingSpace(1000)
    assert space.reserve(0) is None
    assert space.reserve(1001) is None
    space.reserve(10)
    with pytest.raises(RemoteProtocolError):
        space.release(11)
    space.release(10)
    space.release(5)  # older: ignored
    assert space.released == 10


# -- the consumer's accounting -------------------------------------------------------------

def test_take_checks_every_reference() -> None:
    take = RingTake(1000)
    take.take(0, 400)
    with pytest.raises(RemoteProtocolError):
        take.take(100, 10)  # before what was taken: out of order or stale
    with pytest.raises(RemoteProtocolError):
        take.take(900, 200)  # across the ring's end
    with pytest.raises(RemoteProtocolError):
        take.take(400, 0)
    with pytest.raises(RemoteProtocolError):
        take.take(1000, 500)  # would overwrite 0..400, which is not released
    take.take(400, 600)
    assert take.consumed == 1000


def test_take_releases_in_order_once_views_are_done() -> None:
    take = RingTake(1000, batch=100)
    a = take.take(0, 300)
    b = take.take(300, 300)
    take.finish(b)
    assert take.releasable() == 0  # a still in use
    assert take.due() is None
    take.finish(a)
    assert take.releasable() == 600
    assert take.due() == 600
    assert take.due() is None  # sent already
    c = take.take(700, 50)  # a gap (a payload the producer staged and took back)
    take.finish(c)
    assert take.releasable() == 750  # the gap is free too
    assert take.due() == 750  # 150 >= a batch


def test_take_batches_releases_and_gives_the_rest_when_idle() -> None:
    take = RingTake(1000, batch=500)
    take.finish(take.take(0, 200))
    assert take.due() is None
    assert take.pending
    assert take.due(idle=True) == 200
    assert not take.pending


# -- ring files ----------------------------------------------------------------------------

def test_ring_files_are_private_and_checked(tmp_path: Path) -> None:
    tx, _ = ring_names(os.getpid(), 7)
    ring = Ring.create(tmp_path, tx, RING_UNIT * 2, 7)
    st = os.stat(tmp_path / tx)
    assert st.st_mode & 0o777 == 0o600
    assert st.st_size == RING_UNIT * 2 + GUARD
    with pytest.raises(FileExistsError):
        Ring.create(tmp_path, tx, RING_UNIT * 2, 7)  # O_EXCL
    peer = Ring.open(tmp_path, tx, RING_UNIT * 2, 7)
    ring.write(5, b"hello")
    assert bytes(peer.buffer(5, 5)) == b"hello"
    with pytest.raises(BusError):
        Ring.open(tmp_path, tx, RING_UNIT, 7)  # not the size it says
    with pytest.raises(BusError):
        Ring.open(tmp_path, "../etc/passwd", RING_UNIT, 7)
    with pytest.raises(BusError):
        Ring.open(tmp_path, "ring.1.00000001.tx", RING_UNIT, 1)  # not there
    with pytest.raises(BusError):
        Ring.create(tmp_path, "ring.1.00000001.rx", RING_UNIT + 1, 1)
    os.chmod(tmp_path / tx, 0o644)
    with pytest.raises(BusError):
        Ring.open(tmp_path, tx, RING_UNIT * 2, 7)
    ring.unlink(tmp_path)
    assert not (tmp_path / tx).exists()


def test_stale_ring_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    for name in (*ring_names(pid, 1), *ring_names(os.getpid(), 2), "other"):
        (tmp_path / name).write_bytes(b"")
    assert remove_stale(tmp_path) == 2
    assert sorted(os.listdir(tmp_path)) == sorted([*ring_names(os.getpid(), 2), "other"])


def test_ring_size_from_the_environment() -> None:
    assert ring_size_from_env({}) == 8 << 20
    assert ring_size_from_env({"VMBUSIFY_BUS_RING": "0"}) == 0
    assert ring_size_from_env({"VMBUSIFY_BUS_RING": "4"}) == 4 << 20
    assert ring_size_from_env({"VMBUSIFY_BUS_RING": "many"}) == 0
    assert ring_size_from_env({"VMBUSIFY_BUS_RING": "1000"}) == 0


# -- one end's pair, two ends back to back -------------------------------------------------

class _Loop:
    """call_soon / call_later that run when told."""

    def __init__(self) -> None:
        self.soon: list[Callable[[], Any]] = []
        self.later: list[_Timer] = []

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.soon.append(lambda: fn(*args))

    def call_later(self, _delay: float, fn: Callable[..., Any], *args: Any) -> _Timer:
        timer = _Timer(lambda: fn(*args))
        self.later.append(timer)
        return timer

    def run(self, timers: bool = False) -> None:
        while self.soon:
            self.soon.pop(0)()
        if timers:
            later, self.later = self.later, []
            for t in later:
                if not t.cancelled:
                    t.fn()
            while self.soon:
                self.soon.pop(0)()


class _Timer:
    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def _pair(tmp_path: Path, size: int = SIZE) -> tuple[RingLink, RingLink, _Loop]:
    """A worker's rings and the mux's view of them; releases go straight to the other."""
    tx_name, rx_name = ring_names(os.getpid(), 9)
    loop = _Loop()
    w_tx, w_rx = (Ring.create(tmp_path, n, size, 9) for n in (tx_name, rx_name))
    m_rx, m_tx = (Ring.open(tmp_path, n, size, 9) for n in (tx_name, rx_name))
    links: dict[str, RingLink] = {}

    def to(end: str) -> Callable[[int, int], None]:
        def release(ring_id: int, upto: int) -> None:
            links[end].released(ring_id, upto)
        return release

    worker = RingLink(9, w_tx, w_rx, to("mux"), loop.call_soon, loop.call_later)
    mux = RingLink(9, m_tx, m_rx, to("worker"), loop.call_soon, loop.call_later)
    links.update(worker=worker, mux=mux)
    worker.tx_on = mux.tx_on = True
    return worker, mux, loop


def test_payloads_cross_and_the_ring_is_released_when_views_go(tmp_path: Path) -> None:
    worker, mux, loop = _pair(tmp_path)
    payloads = [os.urandom(300 * KIB) for _ in range(3)]
    refs = [worker.place(p) for p in payloads]
    assert all(refs)
    assert worker.place(os.urandom(300 * KIB)) is None  # 4 x 300 KiB > 1 MiB: inline
    assert worker.inline == 1
    views = [mux.resolve(r) for r in refs if r is not None]
    assert [bytes(v) for v in views] == payloads
    assert views[0].readonly
    first = views.pop(0)
    part = first[10:20]  # a slice keeps the payload in use
    del first
    gc.collect()
    loop.run(timers=True)
    assert worker.space.released == 0
    del part
    views.clear()
    gc.collect()
    loop.run(timers=True)
    assert worker.space.released == 900 * KIB
    assert worker.releases == 1  # one RLS (counted for the mux's status)
    ref = worker.place(os.urandom(300 * KIB))  # room again, from the ring's beginning
    assert ref is not None and REF.unpack(ref)[1] == SIZE


def test_small_payloads_and_a_ring_not_accepted_go_inline(tmp_path: Path) -> None:
    worker, _mux, _loop = _pair(tmp_path)
    assert worker.place(b"x" * (RING_MIN_PAYLOAD - 1)) is None
    worker.tx_on = False
    assert worker.place(b"x" * RING_MIN_PAYLOAD) is None


def test_bad_and_stale_references_are_protocol_errors(tmp_path: Path) -> None:
    worker, mux, _loop = _pair(tmp_path)
    ref = worker.place(b"a" * RING_MIN_PAYLOAD)
    assert ref is not None
    with pytest.raises(RemoteProtocolError):
        mux.resolve(REF.pack(8, 0, RING_MIN_PAYLOAD))  # another ring: an older link
    with pytest.raises(RemoteProtocolError):
        mux.resolve(REF.pack(9, SIZE - 10, 100))  # across the end
    with pytest.raises(RemoteProtocolError):
        mux.resolve(ref[:8])
    view = mux.resolve(ref)
    with pytest.raises(RemoteProtocolError):
        mux.resolve(ref)  # the same again: before what was taken
    del view
    mux.close()
    with pytest.raises(RemoteProtocolError):
        mux.resolve(REF.pack(9, 2 * RING_MIN_PAYLOAD, RING_MIN_PAYLOAD))


def test_a_staged_payload_is_placed_without_a_copy_or_given_back(tmp_path: Path) -> None:
    worker, mux, _loop = _pair(tmp_path)
    n = 100 * KIB
    view = mux.stage(n)
    assert view is not None
    assert mux.stage(n) is None  # one at a time
    assert mux.place(os.urandom(n)) is None  # nothing goes before it: inline
    view[:] = b"s" * n  # the tunnel receives into it
    ref = mux.place(view)
    assert ref is not None
    assert bytes(worker.resolve(ref)) == b"s" * n
    # Staged, then routed elsewhere: the room goes back and the next payload takes it.
    head = mux.space.head
    other = mux.stage(n)
    assert other is not None
    mux.unstage(other)
    assert mux.space.head == head
    data = os.urandom(n)
    ref2 = mux.place(data)
    assert ref2 is not None and REF.unpack(ref2)[1] == head
    assert bytes(worker.resolve(ref2)) == data


def test_releases_are_batched(tmp_path: Path) -> None:
    sent: list[int] = []
    worker, mux, loop = _pair(tmp_path)
    mux._send_release = lambda rid, upto: sent.append(upto)  # type: ignore[method-assign]
    for _ in range(2):
        ref = worker.place(b"x" * (100 * KIB))
        assert ref is not None
        mux.resolve(ref)  # dropped at once
    gc.collect()
    loop.run()
    assert sent == []  # 200 KiB < a quarter of the ring
    loop.run(timers=True)
    assert sent == [200 * KIB]  # idle: all of it
    for _ in range(3):
        ref = worker.place(b"x" * (100 * KIB))
        assert ref is not None
        mux.resolve(ref)
    gc.collect()
    loop.run()
    assert sent == [200 * KIB, 500 * KIB]  # 300 KiB >= 256 KiB: at once


# -- the bus messages ----------------------------------------------------------------------

def test_pkr_rls_and_the_ring_offer_parse_back() -> None:
    pkg = Package(type=PackageType.DATA, entity=5, message_id=3, stream=7, payload=b"x" * 10)
    ref = REF.pack(1, 2, 3)
    msg = PkgRef("vm1", pkg.header(), ref)
    assert from_worker(msg.to_frames()) == msg
    assert from_mux(msg.to_frames()) == msg
    assert msg.length == 3
    assert from_mux(Release(5, 1 << 40).to_frames()) == Release(5, 1 << 40)
    offer = {"id": 3, "size": SIZE, "tx": "ring.1.00000003.tx", "rx": "ring.1.00000003.rx"}
    reg = Reg("w", 1, [5], [[1, 2, 4]], since=1, ring=offer)
    assert from_worker(reg.to_frames()) == reg
    assert Reg.parse(Reg("w", 1, [5], []).to_frames()).ring is None  # an older worker
    assert from_mux(RegOk("host", "m", 3, 3).to_frames()) == RegOk("host", "m", 3, 3)
    assert RegOk.parse(RegOk("host", "m").to_frames()).ring == 0


@pytest.mark.parametrize("frames", [
    [b"PKR", b"vm1", b"h" * 24, b"short"],
    [b"PKR", b"vm1", b"h" * 23, b"r" * 16],
    [b"RLS", b"x" * 11],
    [b"REGOK", b"\x81\xa4ring\xa1x"],
])
def test_malformed_ring_messages_are_refused(frames: list[bytes]) -> None:
    with pytest.raises(RemoteProtocolError):
        from_mux(frames)


def test_a_bad_ring_offer_is_refused() -> None:
    for ring in ({"id": 0, "size": 1, "tx": "a", "rx": "b"}, {"id": 1, "size": 1, "tx": 3},
                 "ring"):
        frames = Reg("w", 1, [], []).to_frames()
        from vmbusify.protocol.serialize import dumps, loads_dict
        body = loads_dict(frames[1], "REG")
        body["ring"] = ring
        with pytest.raises(RemoteProtocolError):
            from_worker([frames[0], dumps(body)])


def test_a_pkr_takes_the_lane_and_order_of_the_pkg_it_stands_for() -> None:
    pkg = Package(type=PackageType.DATA, entity=5, message_id=3, stream=7,
                  payload=b"x" * RING_MIN_PAYLOAD)
    ref = PkgRef("vm1", pkg.header(), REF.pack(1, 0, RING_MIN_PAYLOAD))
    assert classify(ref)[:2] == (Lane.BULK, ("vm1", 7))
    assert classify(Release(1, 5))[0] is Lane.CONTROL
    sender = LaneSender()
    lane, frames = sender.frames(ref)
    assert lane is Lane.BULK and bytes(frames[1]) == b"PKR"


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[list[bytes | memoryview]] = []

    def send(self, frames: list[bytes | memoryview]) -> None:
        self.sent.append(list(frames))

    def close(self, _linger: int = 0) -> None:
        pass


@contextlib.contextmanager
def _recording_dealer(tmp_path: Path) -> Iterator[tuple[LanedDealer, list[_Recorder]]]:
    """A worker's LanedDealer with rings whose two lanes record what is sent (closed after)."""
    dealer = LanedDealer(f"ipc://{tmp_path}/bus.sock", "w", lambda _lane, _f: None,
                         ring_size=SIZE)
    real = dealer._sockets
    lanes = [_Recorder(), _Recorder()]
    dealer._sockets = lanes  # type: ignore[assignment]
    try:
        yield dealer, lanes
    finally:
        dealer._sockets = real
        dealer.close()


def test_a_worker_puts_only_bulk_lane_payloads_in_its_ring(tmp_path: Path) -> None:
    """A REQUEST's payload takes the control lane, which the mux takes first: in the ring it
    would come out of the ring's order. The ring's files go once the mux took them."""
    from vmbusify.bus.frames import Pkg

    async def scenario() -> None:
        with _recording_dealer(tmp_path) as (dealer, lanes):
            rings = dealer.rings
            assert rings is not None and not rings.tx_on
            offer = dealer.ring_offer()
            assert offer is not None and (tmp_path / str(offer["tx"])).exists()
            big = b"b" * RING_MIN_PAYLOAD

            def header(ptype: PackageType) -> bytes:
                return Package(type=ptype, entity=5, message_id=3, stream=7,
                               payload=big).header()

            dealer.send_message(Pkg("vm1", header(PackageType.DATA), big))
            assert not dealer.ring_accepted(0)  # a mux of before the rings: inline
            dealer.send_message(Pkg("vm1", header(PackageType.DATA), big))
            assert not dealer.ring_accepted(rings.id, rings.id)
            assert not (tmp_path / str(offer["tx"])).exists()
            assert not dealer.ring_accepted(0)  # an older REG's answer: still on
            assert rings.tx_on
            dealer.send_message(Pkg("vm1", header(PackageType.REQUEST), big))
            dealer.send_message(Pkg("vm1", header(PackageType.DATA), big))
            kinds = [(lane, bytes(frames[1])) for lane, rec in enumerate(lanes)
                     for frames in rec.sent]
            assert sorted(kinds) == [(0, b"PKG"), (0, b"PKG"), (0, b"PKR"), (1, b"PKG")]
            assert not dealer.ring_accepted(0, rings.id)  # offered, not taken (any more)
            assert not rings.tx_on
        assert not [n for n in os.listdir(tmp_path) if n.startswith("ring.")]

    asyncio.run(scenario())


def test_a_payload_built_in_the_worker_s_ring_goes_as_a_pkr_without_a_copy(
        tmp_path: Path) -> None:
    """``ring_buffer``: a worker builds a payload (the subnet's batch) where the mux reads it;
    sent with that view as its payload it is referenced, not copied. One not sent is given
    back and the next payload takes its room."""
    from vmbusify.bus.frames import Pkg

    async def scenario() -> None:
        with _recording_dealer(tmp_path) as (dealer, lanes):
            rings = dealer.rings
            assert rings is not None
            n = RING_MIN_PAYLOAD + 100
            assert dealer.ring_buffer(n) is None  # the mux has not taken the rings yet
            assert not dealer.ring_accepted(rings.id, rings.id)
            assert dealer.ring_buffer(RING_MIN_PAYLOAD - 1) is None  # inline is cheaper
            unsent = dealer.ring_buffer(n)
            assert unsent is not None
            dealer.ring_unbuffer(unsent)
            view = dealer.ring_buffer(n)
            assert view is not None
            view[:] = b"q" * n
            header = Package(type=PackageType.DATA, entity=5, message_id=3, stream=7,
                             payload=b"q" * n).header()
            dealer.send_message(Pkg("vm1", header, view))
            (frames,) = lanes[0].sent
            assert bytes(frames[1]) == b"PKR" and rings.placed == 1
            _ring, pos, length = REF.unpack(bytes(frames[-1]))
            assert (pos, length) == (0, n)  # where the view was: the room given back reused
            assert bytes(rings.tx.map[:n]) == b"q" * n

    asyncio.run(scenario())


def test_an_idle_ring_gives_its_pages_back(tmp_path: Path) -> None:
    worker, mux, loop = _pair(tmp_path)
    ref = worker.place(b"p" * (300 * KIB))
    assert ref is not None
    blocks = os.stat(tmp_path / worker.tx.name).st_blocks
    mux.resolve(ref)  # dropped at once
    gc.collect()
    loop.run()  # released (a quarter of the ring): the trim is due in TRIM_AFTER
    assert worker.space.released == worker.space.head and worker.trims == 0
    ref = worker.place(b"q" * (300 * KIB))  # used meanwhile: not yet
    assert ref is not None
    mux.resolve(ref)
    gc.collect()
    loop.run()
    assert worker.space.released == worker.space.head
    loop.run(timers=True)
    assert worker.trims == 0
    loop.run(timers=True)
    assert worker.trims == 1
    assert bytes(mux.rx.buffer(0, 4)) == b"\0" * 4  # the pages went: read back as zeros
    assert os.stat(tmp_path / worker.tx.name).st_blocks < blocks
