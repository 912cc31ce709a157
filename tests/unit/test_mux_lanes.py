"""The mux's end of the bus's two lanes (MuxApp in vmbusify/mux/app.py), without ZeroMQ: what
it sends on which of a worker's lanes, and that it hands on a worker's messages in the order
the lanes keep (docs/protocol.md, "The bus: two lanes")."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vmbusify.bus.frames import Frames, Pkg, Reg, RegOk, from_mux
from vmbusify.bus.lanes import CONTROL_SUFFIX, Lane, LaneSender, Stamp, split_stamp
from vmbusify.config import Config, Role
from vmbusify.mux.app import MuxApp
from vmbusify.protocol.package import Package, PackageType

WORKER = b"exec.1.abcd"


class FakeBus:
    """What the mux sends, as (identity, frames)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, list[bytes | memoryview]]] = []

    def send(self, frames: Frames) -> None:
        self.sent.append((bytes(frames[0]), list(frames[1:])))

    def send_to(self, identity: bytes, msg: object) -> None:
        self.sent.append((identity, list(msg.to_frames())))  # type: ignore[attr-defined]

    def close(self) -> None:
        pass


@pytest.fixture
def app() -> Iterator[MuxApp]:
    mux = MuxApp(Config(role=Role.HOST))
    mux._bus = FakeBus()  # type: ignore[assignment]
    yield mux
    mux._bus = None


def worker_sends(app: MuxApp, sender: LaneSender, msg: Reg | Pkg) -> None:
    lane, frames = sender.frames(msg)
    identity = WORKER + CONTROL_SUFFIX if lane is Lane.CONTROL else WORKER
    app._on_bus([identity, *frames])


def sent(app: MuxApp) -> list[tuple[bytes, list[bytes | memoryview]]]:
    bus = app._bus
    assert isinstance(bus, FakeBus)
    out, bus.sent = bus.sent, []
    return out


def test_a_laned_worker_is_answered_on_its_control_lane(app: MuxApp) -> None:
    worker_sends(app, LaneSender(), Reg("exec", 1, [9], [[8, 1, 1]]))
    [(identity, frames)] = sent(app)
    assert identity == WORKER + CONTROL_SUFFIX
    stamp, rest = split_stamp(frames)
    assert stamp == Stamp(Lane.CONTROL, 1, 0)
    assert isinstance(from_mux(rest), RegOk)
    assert app.routes.by_identity(WORKER) is not None  # known by its bulk identity


def test_a_worker_without_lanes_is_answered_as_before(app: MuxApp) -> None:
    app._on_bus([WORKER, *Reg("exec", 1, [9], [[8, 1, 1]]).to_frames()])
    [(identity, frames)] = sent(app)
    assert identity == WORKER
    assert isinstance(from_mux(frames), RegOk)  # no stamp


def test_a_workers_eof_waits_for_its_bytes(app: MuxApp) -> None:
    """The worker's EOF (control) arrives before its last bytes (bulk): the mux hands
    nothing on until the bytes came, then both in order."""
    sender = LaneSender()
    worker_sends(app, sender, Reg("exec", 1, [9], [[8, 1, 1]]))
    sent(app)
    data = Pkg.of("vm1", Package(type=PackageType.DATA, entity=9, message_id=1, stream=4,
                                 payload=b"x" * 10))
    eof = Pkg.of("vm1", Package(type=PackageType.DATA, entity=9, message_id=1, stream=4))
    data_lane, data_frames = sender.frames(data)
    eof_lane, eof_frames = sender.frames(eof)
    assert (data_lane, eof_lane) == (Lane.BULK, Lane.CONTROL)
    handed: list[bytes] = []
    app.from_worker = lambda identity, vmid, header, payload: handed.append(  # type: ignore[method-assign]
        bytes(payload))
    app._on_bus([WORKER + CONTROL_SUFFIX, *eof_frames])
    assert handed == []
    app._on_bus([WORKER, *data_frames])
    assert handed == [b"x" * 10, b""]


def test_a_bad_stamp_is_dropped_and_the_mux_goes_on(app: MuxApp,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    app._on_bus([WORKER, b"\x01short", b"REG", b"x"])
    # A control stamp from a bulk identity.
    app._on_bus([WORKER, Stamp(Lane.CONTROL, 1).to_frame(),
                 *Reg("exec", 1, [9], []).to_frames()])
    assert sent(app) == []
    assert "malformed bus message dropped" in caplog.text
    worker_sends(app, LaneSender(), Reg("exec", 1, [9], [[8, 1, 1]]))
    assert len(sent(app)) == 1


def test_a_gone_workers_lanes_are_forgotten(app: MuxApp) -> None:
    worker_sends(app, LaneSender(), Reg("exec", 1, [9], [[8, 1, 1]]))
    assert WORKER in app.lanes
    info = app.routes.by_identity(WORKER)
    assert info is not None
    app.worker_lost(info, "stopped", orderly=True)
    assert WORKER not in app.lanes


def test_the_mux_sends_only_on_a_lane_it_heard_the_worker_on(app: MuxApp) -> None:
    """ZeroMQ knows a DEALER's identity only once it connected: until the worker's bulk lane
    spoke, its bytes go on the control lane (in that lane's order), never to an identity the
    ROUTER may not know yet (which would fail, and unregister the worker)."""
    sender = LaneSender()
    worker_sends(app, sender, Reg("exec", 1, [9], [[8, 1, 1]]))
    sent(app)
    data = Pkg.of("vm1", Package(type=PackageType.DATA, entity=8, message_id=1, stream=4,
                                 payload=b"y" * 10))
    app._send(WORKER, data)
    [(identity, frames)] = sent(app)
    assert identity == WORKER + CONTROL_SUFFIX
    assert split_stamp(frames)[0] == Stamp(Lane.CONTROL, 2, 0)
    lane, reg = sender.frames(Reg("exec", 1, [9], [[8, 1, 1]]), lane=Lane.BULK)
    assert lane is Lane.BULK
    app._on_bus([WORKER, *reg])  # the worker's bulk connection speaks: now it is used
    sent(app)
    app._send(WORKER, data)
    [(identity, frames)] = sent(app)
    assert identity == WORKER
    # The stream's last message went on the control lane: its bytes on bulk follow it.
    assert split_stamp(frames)[0] == Stamp(Lane.BULK, 1, 2)
