"""ip-bearer messages and frames (vmbusify.protocol.subnet): no sockets, no root."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmbusify.errors import LocalProtocolError, RemoteProtocolError
from vmbusify.protocol.subnet import (
    MAX_FRAME,
    PLAIN_VNET_HDR,
    VNET_HDR_SIZE,
    Attach,
    FrameDecoder,
    Lease,
    encode_frames,
    iter_frames,
    packet_addresses,
    packet_destination,
)


def ipv4_frame(src: str, dst: str, payload: bytes = b"x" * 20) -> bytes:
    total = 20 + len(payload)
    header = struct.pack(">BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 17, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return PLAIN_VNET_HDR + header + payload


def ipv6_frame(src: str, dst: str, payload: bytes = b"y" * 8) -> bytes:
    header = struct.pack(">IHBB16s16s", 6 << 28, len(payload), 17, 64,
                         ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
    return PLAIN_VNET_HDR + header + payload


def lease_body(**over: object) -> dict[str, object]:
    body: dict[str, object] = {
        "vmid": "vm1", "address": "100.77.0.2", "prefixlen": 24, "gateway": "100.77.0.1",
        "mtu": 65000, "metric": 65000, "dns": ["100.77.0.1"], "address6": "fd77::2",
        "prefixlen6": 64, "gateway6": "fd77::1"}
    body.update(over)
    return body


def test_batch_round_trip_keeps_every_frame_and_its_boundaries() -> None:
    frames = [ipv4_frame("100.77.0.2", "198.18.0.2"), ipv6_frame("fd77::2", "fd77::1"),
              PLAIN_VNET_HDR + b"\x45" + bytes(65534)]
    batch = encode_frames(frames)
    assert [bytes(f) for f in iter_frames(batch)] == frames


@given(st.lists(st.binary(min_size=VNET_HDR_SIZE + 1, max_size=3000), max_size=20),
       st.lists(st.integers(min_value=1, max_value=5000), max_size=50))
def test_decoder_reassembles_frames_split_anywhere(frames: list[bytes], cuts: list[int]) -> None:
    batch = encode_frames(frames)
    decoder, out, pos = FrameDecoder(), [], 0
    for cut in [*cuts, len(batch)]:
        out += [bytes(f) for f in decoder.feed(batch[pos:pos + cut])]
        pos += cut
        if pos >= len(batch):
            break
    out += [bytes(f) for f in decoder.feed(batch[pos:])]
    assert out == frames
    assert decoder.buffered == 0


def test_decoder_refuses_a_hostile_length_before_buffering_it() -> None:
    decoder = FrameDecoder()
    with pytest.raises(RemoteProtocolError, match="frame of"):
        decoder.feed(struct.pack(">I", MAX_FRAME + 1) + b"\x00" * 16)
    with pytest.raises(RemoteProtocolError, match="frame of 3 bytes"):
        FrameDecoder().feed(struct.pack(">I", 3) + b"abc")


def test_batch_cut_inside_a_frame_is_an_error() -> None:
    batch = encode_frames([ipv4_frame("1.2.3.4", "5.6.7.8")])
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        list(iter_frames(batch[:-1]))


def test_encoder_refuses_frames_out_of_range() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frames([PLAIN_VNET_HDR])
    with pytest.raises(LocalProtocolError):
        encode_frames([bytes(MAX_FRAME + 1)])


def test_addresses_of_ipv4_and_ipv6_packets() -> None:
    f4 = ipv4_frame("100.77.0.2", "198.18.0.2")
    assert packet_addresses(f4) == (ipaddress.IPv4Address("100.77.0.2").packed,
                                    ipaddress.IPv4Address("198.18.0.2").packed)
    assert packet_destination(memoryview(f4)) == ipaddress.IPv4Address("198.18.0.2").packed
    f6 = ipv6_frame("fd77::2", "fd77::1")
    assert packet_addresses(f6) == (ipaddress.IPv6Address("fd77::2").packed,
                                    ipaddress.IPv6Address("fd77::1").packed)
    assert packet_addresses(PLAIN_VNET_HDR + b"\x45" + bytes(5)) is None  # too short
    assert packet_destination(PLAIN_VNET_HDR + b"\x20" + bytes(60)) is None  # version 2


def test_lease_round_trip() -> None:
    lease = Lease.from_body(lease_body())
    assert Lease.from_body(lease.to_body()) == lease
    assert Lease.from_body(lease_body(address6="", prefixlen6=0, gateway6="")).address6 == ""


@pytest.mark.parametrize(("bad", "reason"), [
    ({"address": "not-an-ip"}, "not-an-ip"),
    ({"gateway": "10.0.0.1"}, "gateway outside"),
    ({"mtu": 100}, "mtu"),
    ({"prefixlen": True}, "prefixlen"),
    ({"dns": ["x"]}, "does not appear"),
    ({"gateway6": "fe80::1"}, "IPv6 gateway outside"),
])
def test_bad_lease_is_a_remote_protocol_error(bad: dict[str, object], reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        Lease.from_body(lease_body(**bad))
    with pytest.raises(RemoteProtocolError):
        Lease.from_body([1, 2])


def test_attach_body() -> None:
    assert Attach.from_body(Attach("g", False).to_body()) == Attach("g", False)
    with pytest.raises(RemoteProtocolError):
        Attach.from_body({"offload": "yes"})
