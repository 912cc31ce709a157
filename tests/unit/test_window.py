"""Credit windows and the fair out-queue."""

from __future__ import annotations

import pytest

from vmbusify.errors import FlowControlError, RemoteProtocolError
from vmbusify.mux.scheduler import OutQueue
from vmbusify.protocol.window import (
    INITIAL_WINDOW,
    MAX_CHUNK,
    ReceiveWindow,
    SendWindow,
    decode_increment,
    encode_increment,
)


def test_sender_never_exceeds_its_window() -> None:
    w = SendWindow(1000)
    assert w.take(600) == 600
    assert w.take(600) == 400
    assert w.take(1) == 0
    w.grant(300)
    assert w.take(1000) == 300


def test_chunks_are_capped() -> None:
    assert SendWindow(10 * MAX_CHUNK).take(10 * MAX_CHUNK) == MAX_CHUNK


def test_receiver_grants_after_a_quarter_window_consumed() -> None:
    r = ReceiveWindow(1000)
    r.on_data(1000)
    with pytest.raises(FlowControlError):
        r.on_data(1)
    assert r.on_consumed(200) == 0
    assert r.on_consumed(100) == 300
    r.on_data(300)
    with pytest.raises(FlowControlError):
        r.on_data(1)


def test_increment_codec() -> None:
    assert decode_increment(encode_increment(12345)) == 12345
    with pytest.raises(FlowControlError, match="of 0"):
        decode_increment(b"\x00\x00\x00\x00")
    with pytest.raises(RemoteProtocolError):
        decode_increment(b"\x01")


def test_credit_never_exceeds_the_window() -> None:
    """An honest receiver returns at most what was sent: more is a peer making us queue."""
    w = SendWindow(1000)
    assert w.take(600) == 600
    assert w.unacked == 600
    w.grant(600)  # everything back: exactly the window again
    assert w.available == 1000 and w.unacked == 0
    with pytest.raises(FlowControlError, match="past the window"):
        w.grant(1)
    assert w.available == 1000  # a refused grant changes nothing
    w.take(100)
    with pytest.raises(FlowControlError):
        w.grant(101)
    with pytest.raises(FlowControlError):
        w.grant(0)
    w.grant(100)
    assert w.available == 1000


def test_a_peer_granting_itself_gigabytes_is_refused() -> None:
    w = SendWindow(INITIAL_WINDOW)
    w.take(MAX_CHUNK)
    with pytest.raises(FlowControlError):
        w.grant(decode_increment(encode_increment(0xFFFFFFFF)))


def test_sendable_does_not_take() -> None:
    w = SendWindow(3 * MAX_CHUNK)
    assert w.sendable(10 * MAX_CHUNK) == MAX_CHUNK
    assert w.sendable(5) == 5
    assert w.available == 3 * MAX_CHUNK


def test_out_queue_control_first_then_round_robin() -> None:
    q = OutQueue()
    for i in range(3):
        q.put_stream((3, 1), (b"a", str(i).encode()))
    q.put_stream((3, 2), (b"b", b"0"))
    q.put_control((b"c", b""))
    order = [q.pop() for _ in range(5)]
    assert order[0] == (b"c", b"")
    assert order[1:] == [(b"a", b"0"), (b"b", b"0"), (b"a", b"1"), (b"a", b"2")]
    assert q.pop() is None
    assert q.bytes_queued == 0
