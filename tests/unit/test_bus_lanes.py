"""The bus's two lanes (vmbusify/bus/lanes.py), without ZeroMQ: what goes on which lane, and
that a receiver takes control first yet keeps every stream in the order it was sent."""

from __future__ import annotations

import random

import pytest

from vmbusify.bus.frames import CtlRequest, Evt, Pkg, Reg, RegOk, TunnelEvent, Unreg
from vmbusify.bus.lanes import (
    STAMP_SIZE,
    Lane,
    LaneReceiver,
    LaneSender,
    Stamp,
    classify,
    split_stamp,
)
from vmbusify.errors import RemoteProtocolError
from vmbusify.protocol.package import Package, PackageFlag, PackageType


def pkg(ptype: PackageType, stream: int = 0, payload: bytes = b"",
        flags: PackageFlag = PackageFlag.NONE, vmid: str = "vm1") -> Pkg:
    return Pkg.of(vmid, Package(type=ptype, entity=5, message_id=1, stream=stream,
                                flags=flags, payload=payload))


def test_only_stream_bytes_take_the_bulk_lane() -> None:
    assert classify(pkg(PackageType.DATA, 3, b"x")) == (Lane.BULK, ("vm1", 3), False)
    # EOF with no bytes, RESET (even with a reason), WINDOW, requests, ACKs, messages:
    for p in (pkg(PackageType.DATA, 3, flags=PackageFlag.EOF),
              pkg(PackageType.DATA, 3, b"why", PackageFlag.RESET),
              pkg(PackageType.WINDOW, 3, b"\0\0\0\1"),
              pkg(PackageType.REQUEST, 3, b"\x80"), pkg(PackageType.ACK, 3, b"\x80")):
        assert classify(p) == (Lane.CONTROL, ("vm1", 3), False)
    # Bytes that end a stream are still bytes: they keep their place behind the others.
    assert classify(pkg(PackageType.DATA, 3, b"x", PackageFlag.EOF))[0] is Lane.BULK
    # Stream 0 (EXIT, tunnel-wide messages) belongs to no stream.
    assert classify(pkg(PackageType.MESSAGE, 0, b"\x80")) == (Lane.CONTROL, None, False)
    assert classify(Reg("w", 1, [], [])) == (Lane.CONTROL, None, False)
    assert classify(CtlRequest(b"1", "status")) == (Lane.CONTROL, None, False)
    assert classify(RegOk("host", "m")) == (Lane.CONTROL, None, False)
    # A worker stopping and a tunnel event follow everything sent before them.
    assert classify(Unreg()) == (Lane.CONTROL, None, True)
    assert classify(Evt(TunnelEvent.DOWN, "vm1", reason="x")) == (Lane.CONTROL, None, True)


def test_the_sender_names_what_each_message_must_follow() -> None:
    s = LaneSender()
    assert s.stamp(Lane.CONTROL, "A") == Stamp(Lane.CONTROL, 1, 0)  # A's open
    assert s.stamp(Lane.BULK, "A") == Stamp(Lane.BULK, 1, 1)  # A's bytes follow its open
    assert s.stamp(Lane.BULK, "A") == Stamp(Lane.BULK, 2, 0)  # same lane: FIFO is enough
    assert s.stamp(Lane.CONTROL, "B") == Stamp(Lane.CONTROL, 2, 0)  # B owes A nothing
    assert s.stamp(Lane.CONTROL, None) == Stamp(Lane.CONTROL, 3, 0)  # stream 0
    assert s.stamp(Lane.CONTROL, "A") == Stamp(Lane.CONTROL, 4, 2)  # A's EOF after its bytes
    assert s.stamp(Lane.CONTROL, None, barrier=True) == Stamp(Lane.CONTROL, 5, 2)


def test_a_sender_that_forgets_a_stream_stays_on_the_safe_side() -> None:
    s = LaneSender(max_streams=2)
    s.stamp(Lane.BULK, "A")  # bulk 1
    s.stamp(Lane.BULK, "B")  # bulk 2
    s.stamp(Lane.BULK, "C")  # bulk 3; A is forgotten
    # A's EOF cannot name A's bytes any more: it follows the newest forgotten (bulk 1).
    assert s.stamp(Lane.CONTROL, "A").dep == 1


def test_stamps_round_trip_and_bad_ones_are_refused() -> None:
    st = Stamp(Lane.CONTROL, 7, 3)
    frame = st.to_frame()
    assert len(frame) == STAMP_SIZE and Stamp.is_stamp(frame)
    assert split_stamp([frame, b"PKG"]) == (st, [b"PKG"])
    assert split_stamp([b"REG", b"x"]) == (None, [b"REG", b"x"])  # a worker of before
    for bad in (frame[:-1], b"\x01\x07" + frame[2:], b"\x01\x00" + b"\0" * 16):
        with pytest.raises(RemoteProtocolError):
            Stamp.parse(bad)


def deliver(sent: list[tuple[Stamp, str]], arrival: list[int]) -> list[str]:
    """What a receiver hands on when the stamped messages arrive in ``arrival`` order
    (indexes into ``sent``), popping after each arrival."""
    rx: LaneReceiver[str] = LaneReceiver()
    out: list[str] = []
    for i in arrival:
        rx.push(*sent[i])
        while (item := rx.pop()) is not None:
            out.append(item)
    assert len(rx) == 0
    return out


def test_control_of_another_stream_passes_queued_bytes() -> None:
    s = LaneSender()
    sent = [(s.stamp(Lane.BULK, "hog"), f"hog-{i}") for i in range(8)]
    sent += [(s.stamp(Lane.CONTROL, "probe"), "probe-start"),
             (s.stamp(Lane.CONTROL, None), "probe-exit")]
    rx: LaneReceiver[str] = LaneReceiver()
    for st, item in sent:  # all arrived before the receiver takes any
        rx.push(st, item)
    order = [rx.pop() for _ in range(len(sent))]
    assert order[:2] == ["probe-start", "probe-exit"]
    assert order[2:] == [f"hog-{i}" for i in range(8)]


def test_eof_never_overtakes_its_own_bytes() -> None:
    s = LaneSender()
    sent = [(s.stamp(Lane.BULK, "hog"), "hog-0"),
            (s.stamp(Lane.BULK, "out"), "out-bytes"),
            (s.stamp(Lane.BULK, "hog"), "hog-1"),
            (s.stamp(Lane.CONTROL, "out"), "out-eof"),
            (s.stamp(Lane.CONTROL, None), "exit")]
    rx: LaneReceiver[str] = LaneReceiver()
    rx.push(*sent[3])  # the control lane is faster: EOF and EXIT arrive first
    rx.push(*sent[4])
    assert rx.pop() is None  # EOF waits for the stream's bytes; EXIT waits behind it
    rx.push(*sent[0])
    assert rx.pop() == "hog-0"
    assert rx.pop() is None
    rx.push(*sent[1])
    assert [rx.pop(), rx.pop(), rx.pop()] == ["out-bytes", "out-eof", "exit"]
    rx.push(*sent[2])
    assert rx.pop() == "hog-1"


def test_bytes_never_overtake_the_open_of_their_stream() -> None:
    s = LaneSender()
    sent = [(s.stamp(Lane.CONTROL, "A"), "A-open"), (s.stamp(Lane.BULK, "A"), "A-bytes")]
    assert deliver(sent, [1, 0]) == ["A-open", "A-bytes"]


@pytest.mark.parametrize("seed", range(30))
def test_any_arrival_keeps_each_stream_in_order(seed: int) -> None:
    """Random traffic of several streams and stream 0, arriving in any interleaving of the
    two lanes (each lane in order): every stream is handed on in the order it was sent."""
    rng = random.Random(seed)
    s = LaneSender(max_streams=rng.choice([2, 4096]))
    sent: list[tuple[Stamp, str]] = []
    for i in range(200):
        key = rng.choice(["A", "B", "C", None])
        lane = Lane.BULK if key is not None and rng.random() < 0.6 else Lane.CONTROL
        barrier = key is None and rng.random() < 0.05
        sent.append((s.stamp(lane, key, barrier), f"{key}:{i}:{int(barrier)}"))
    lanes = {lane: [i for i, (st, _) in enumerate(sent) if st.lane is lane] for lane in Lane}
    arrival = []
    while lanes[Lane.BULK] or lanes[Lane.CONTROL]:
        lane = rng.choice([la for la in Lane if lanes[la]])
        arrival.append(lanes[lane].pop(0))
    out = deliver(sent, arrival)
    assert sorted(out) == sorted(item for _, item in sent)
    position = {item: n for n, item in enumerate(out)}
    for key in "ABC":
        mine = [item for _, item in sent if item.startswith(f"{key}:")]
        assert [position[m] for m in mine] == sorted(position[m] for m in mine), key
    for n, (_, item) in enumerate(sent):  # a barrier follows everything sent before it
        if item.endswith(":1"):
            assert all(position[other] < position[item] for _, other in sent[:n])


def test_unstamped_messages_are_taken_as_they_come() -> None:
    rx: LaneReceiver[str] = LaneReceiver()
    for item in ("a", "b", "c"):
        rx.push(None, item)
    assert [rx.pop(), rx.pop(), rx.pop(), rx.pop()] == ["a", "b", "c", None]


def test_a_far_end_that_numbers_again_is_followed() -> None:
    """The worker (or mux) restarted: numbers start at 1 again; nothing waits for ever."""
    rx: LaneReceiver[str] = LaneReceiver()
    rx.push(Stamp(Lane.BULK, 1), "old-1")
    rx.push(Stamp(Lane.CONTROL, 1, 5), "old-eof")  # waits for bulk 5, which never comes
    assert rx.pop() == "old-1" and rx.pop() is None
    rx.push(Stamp(Lane.CONTROL, 1), "new-reg")  # a new numbering
    assert [rx.pop(), rx.pop(), rx.pop()] == ["old-eof", "new-reg", None]
    assert rx.restarts == 1


def test_a_receiver_that_joins_late_numbers_from_what_it_sees() -> None:
    rx: LaneReceiver[str] = LaneReceiver()
    rx.push(Stamp(Lane.BULK, 900), "b900")  # a worker that was there before this mux
    rx.push(Stamp(Lane.CONTROL, 40, 899), "c40")
    assert [rx.pop(), rx.pop()] == ["c40", "b900"]


def test_a_wait_for_a_message_that_is_not_coming_expires() -> None:
    rx: LaneReceiver[str] = LaneReceiver()
    rx.push(Stamp(Lane.BULK, 1), "b1", now=0.0)
    assert rx.pop() == "b1"
    rx.push(Stamp(Lane.CONTROL, 1, 2), "c1", now=10.0)  # bulk 2 went to a dead process
    assert rx.pop() is None
    assert rx.expire(now=11.0, hold_max=2.0) == 0
    assert rx.expire(now=12.5, hold_max=2.0) == 1
    assert rx.pop() == "c1" and rx.expired == 1
