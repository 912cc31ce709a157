"""The mux's end of a worker's shared-memory rings (MuxApp, vmbusify/bus/ring.py), without
ZeroMQ: it maps what a REG offers, receives a tunnel's payload straight into the worker's
ring, and no tunnel's slow payload holds the ring for the others."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_mux_lanes import WORKER, FakeBus, sent, worker_sends
from vmbusify.bus.frames import Pkg, PkgRef, Reg, RegOk, RouteKind, from_mux
from vmbusify.bus.lanes import Lane, LaneSender, split_stamp
from vmbusify.bus.ring import REF, Ring, ring_names
from vmbusify.config import Config, Role
from vmbusify.mux.app import MuxApp
from vmbusify.mux.switch import WorkerGone
from vmbusify.protocol.package import (
    MAX_PAYLOAD_LIMIT,
    Header,
    Package,
    PackageDecoder,
    PackageFlag,
    PackageType,
    decode_header,
)

SIZE = 1 << 20
N = 200 << 10


class FakeTunnel:
    """What the mux asks of a tunnel whose payload it staged: its decoder's buffer."""

    def __init__(self) -> None:
        self.decoder = PackageDecoder(MAX_PAYLOAD_LIMIT)
        self.receiving: memoryview | None = None

    def move_payload(self, view: memoryview) -> bool:
        if self.receiving is not view:
            return False
        self.receiving = memoryview(bytearray(len(view)))
        return True


@pytest.fixture
def app(tmp_path: Path) -> Iterator[MuxApp]:
    mux = MuxApp(Config(role=Role.HOST, run_dir=str(tmp_path)))
    mux._bus = FakeBus()  # type: ignore[assignment]
    yield mux
    mux._bus = None


def _header(n: int = N) -> Header:
    return decode_header(_raw(n), MAX_PAYLOAD_LIMIT)


def _raw(n: int = N, ptype: PackageType = PackageType.DATA) -> bytes:
    """The 24-byte header of a package of ``n`` bytes to the worker's route."""
    return Package(type=ptype, entity=5, message_id=3, stream=7, payload=b"x" * n).header()


def _register(app: MuxApp, tmp_path: Path) -> Ring:
    """A worker with rings registers; returns the ring it reads (the mux writes)."""
    tx_name, rx_name = ring_names(os.getpid(), 5)
    Ring.create(tmp_path, tx_name, SIZE, 5)
    rx = Ring.create(tmp_path, rx_name, SIZE, 5)
    offer = {"id": 5, "size": SIZE, "tx": tx_name, "rx": rx_name}
    reg = Reg("w", os.getpid(), [9], [[5, 3, int(RouteKind.STREAM | RouteKind.REQUEST)]],
              ring=offer)
    sender = LaneSender()
    worker_sends(app, sender, reg)
    # The first REG comes on both lanes (the mux sends on a lane once it heard it).
    _lane, frames = sender.frames(reg, lane=Lane.BULK)
    app._on_bus([WORKER, *frames])
    for _, frames in sent(app):
        assert from_mux(split_stamp(frames)[1]) == RegOk("host", app.mux_id, 5, 5)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("ring.")]  # unlinked
    return rx


def _delivered(app: MuxApp) -> PkgRef | Pkg:
    [(_, frames)] = sent(app)
    msg = from_mux(split_stamp(frames)[1])
    assert type(msg) in (Pkg, PkgRef)
    return msg  # type: ignore[return-value]


def test_a_payload_received_into_the_ring_goes_on_as_a_reference(app: MuxApp,
                                                                  tmp_path: Path) -> None:
    async def scenario() -> None:
        rx = _register(app, tmp_path)
        tunnel = FakeTunnel()
        view = app._stage(tunnel, _header())  # type: ignore[arg-type]
        assert view is not None
        view[:] = b"r" * N
        app._send(WORKER, Pkg("vm1", _raw(), view))
        msg = _delivered(app)
        assert type(msg) is PkgRef
        _ring, pos, n = REF.unpack(msg.ref)
        assert bytes(rx.buffer(pos, n)) == b"r" * N
        # A package from a peer: a small one, or one for no single worker, is not staged.
        assert app._stage(tunnel, _header(1000)) is None  # type: ignore[arg-type]

    asyncio.run(scenario())


def test_a_slow_tunnel_does_not_hold_the_ring_for_the_others(app: MuxApp,
                                                              tmp_path: Path) -> None:
    async def scenario() -> None:
        rx = _register(app, tmp_path)
        slow, fast = FakeTunnel(), FakeTunnel()
        slow.receiving = app._stage(slow, _header())  # type: ignore[arg-type]
        assert slow.receiving is not None
        held = slow.receiving
        # Another tunnel's payload for the same worker: the slow one goes on in a buffer of
        # its own and gives the ring back.
        fast.receiving = app._stage(fast, _header())  # type: ignore[arg-type]
        assert fast.receiving is not None and slow.receiving is not held
        fast.receiving[:] = b"f" * N
        app._send(WORKER, Pkg("vm1", _raw(), fast.receiving))
        msg = _delivered(app)
        assert type(msg) is PkgRef
        assert REF.unpack(msg.ref)[1] == 0  # the slow one's room
        assert bytes(rx.buffer(0, N)) == b"f" * N
        # Staged and received whole but not yet handed on: what is due meanwhile goes inline.
        view = app._stage(fast, _header())  # type: ignore[arg-type]
        assert view is not None
        fast.receiving = None
        app._send(WORKER, Pkg("vm1", _raw(), b"i" * N))
        assert type(_delivered(app)) is Pkg
        app._send(WORKER, Pkg("vm1", _raw(), view))
        assert type(_delivered(app)) is PkgRef

    asyncio.run(scenario())


def test_a_tunnel_that_ends_mid_payload_gives_the_room_back(app: MuxApp,
                                                            tmp_path: Path) -> None:
    async def scenario() -> None:
        _register(app, tmp_path)
        tunnel = FakeTunnel()
        assert app._stage(tunnel, _header()) is not None  # type: ignore[arg-type]
        app._unstage(tunnel)  # type: ignore[arg-type]
        app._send(WORKER, Pkg("vm1", _raw(), b"n" * N))
        msg = _delivered(app)
        assert type(msg) is PkgRef and REF.unpack(msg.ref)[1] == 0

    asyncio.run(scenario())


def test_the_decoder_moves_a_payload_being_received() -> None:
    pkg = Package(type=PackageType.DATA, entity=5, message_id=3, payload=bytes(range(256)) * 800)
    wire = pkg.encode()
    buffers: list[memoryview] = []

    def allocate(n: int) -> memoryview:
        buffers.append(memoryview(bytearray(n)))
        return buffers[-1]

    dec = PackageDecoder(MAX_PAYLOAD_LIMIT, allocate)
    dec.receive_data(wire[:100_000])
    assert dec.receiving is not None and dec.receiving.length == len(pkg.payload)
    assert not dec.move_body(memoryview(bytearray(10)), allocate)
    assert dec.move_body(buffers[0], allocate)
    dec.receive_data(wire[100_000:])
    got = dec.next_package()
    assert got is not None and bytes(got.payload) == pkg.payload
    assert got.payload is buffers[1]



def test_only_bulk_lane_payloads_go_through_the_ring(app: MuxApp, tmp_path: Path) -> None:
    """A REQUEST's payload takes the control lane, which the worker takes first: in the ring
    it would come out of the ring's order. And a RESET is not staged."""
    async def scenario() -> None:
        _register(app, tmp_path)
        app._send(WORKER, Pkg("vm1", _raw(N, PackageType.REQUEST), b"q" * N))
        assert type(_delivered(app)) is Pkg
        reset = Package(type=PackageType.DATA, flags=PackageFlag.RESET, entity=5,
                        message_id=3, stream=7, payload=b"r" * N)
        head = decode_header(reset.header(), MAX_PAYLOAD_LIMIT)
        assert app._stage(FakeTunnel(), head) is None  # type: ignore[arg-type]
        app._send(WORKER, Pkg("vm1", reset.header(), b"r" * N))
        assert type(_delivered(app)) is Pkg
        app._send(WORKER, Pkg("vm1", _raw(), b"d" * N))
        assert type(_delivered(app)) is PkgRef

    asyncio.run(scenario())


def test_a_worker_forgotten_for_silence_keeps_its_rings(app: MuxApp, tmp_path: Path) -> None:
    """A worker the mux took for dead (silent) and that comes back keeps the rings it
    mapped (their files are gone): its payloads in them are still read; a worker that said
    goodbye, or never came back, has them unmapped."""
    async def scenario() -> None:
        _register(app, tmp_path)
        info = app.routes.by_identity(WORKER)
        assert info is not None
        app.execute([WorkerGone(info, "silent")])
        assert WORKER not in app.lanes and WORKER in app._orphans
        # It is back: its next message (a PKR in the ring it wrote) is read.
        lanes_ring = app._orphans[WORKER][0]
        lanes_ring.rx.write(0, b"w" * N)  # as the worker wrote its ring
        sender = LaneSender()
        ref = PkgRef("vm1", _raw(), REF.pack(5, 0, N))
        _lane, frames = sender.frames(ref)
        app._on_bus([WORKER, *frames])
        assert app.lanes[WORKER].rings is lanes_ring
        app._expire_orphans(1e12)
        assert not lanes_ring.closed
        # Gone again, for good: unmapped once ORPHAN_RINGS_KEEP has passed.
        info = app.routes.by_identity(WORKER)
        if info is not None:
            app.execute([WorkerGone(info, "silent")])
        else:
            app._let_go(app.lanes.pop(WORKER), keep=True)
        app._expire_orphans(0.0)
        assert not lanes_ring.closed
        app._expire_orphans(1e12)
        assert lanes_ring.closed and not app._orphans

    asyncio.run(scenario())
