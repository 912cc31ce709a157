"""The vmbus package codec: round trips, incremental parsing, strict validation, fuzzing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmbusify.errors import LocalProtocolError, RemoteProtocolError
from vmbusify.protocol.package import (
    HEADER_SIZE,
    SIGNATURE,
    Package,
    PackageDecoder,
    PackageFlag,
    PackageType,
)

packages = st.builds(
    Package,
    type=st.sampled_from(list(PackageType)),
    entity=st.integers(0, 0xFFFF),
    message_id=st.integers(0, 0xFFFF),
    id=st.integers(0, 0xFFFFFFFF),
    stream=st.integers(0, 0xFFFFFFFF),
    flags=st.sampled_from([PackageFlag.NONE, PackageFlag.EOF, PackageFlag.RESET,
                           PackageFlag.ERROR]),
    payload=st.binary(max_size=2048),
)


def test_header_is_24_bytes_big_endian() -> None:
    pkg = Package(type=PackageType.REQUEST, entity=3, id=0x01020304, message_id=7, stream=9,
                  payload=b"abc")
    raw = pkg.encode()
    assert len(raw) == HEADER_SIZE + 3
    assert raw[:4] == b"VMBU"
    assert struct.unpack(">I", raw[10:14])[0] == 0x01020304
    assert struct.unpack(">I", raw[20:24])[0] == 3


@given(st.lists(packages, max_size=8), st.integers(1, 64))
def test_round_trip_in_any_chunking(pkgs: list[Package], chunk: int) -> None:
    stream = b"".join(p.encode() for p in pkgs)
    dec = PackageDecoder()
    out: list[Package] = []
    for i in range(0, len(stream), chunk):
        dec.receive_data(stream[i:i + chunk])
        out.extend(dec.packages())
    assert out == pkgs
    assert dec.buffered == 0


def _header(**over: int) -> bytes:
    fields = {"sig": SIGNATURE, "version": 1, "type": 1, "flags": 0, "entity": 0, "id": 0,
              "mid": 0, "stream": 0, "length": 0}
    fields.update(over)
    return struct.pack(">IBBHHIHII", *fields.values())


@pytest.mark.parametrize(("bad", "reason"), [
    (_header(sig=0xDEADBEEF), "bad signature"),
    (_header(version=9), "unsupported protocol version"),
    (_header(type=77), "unknown package type"),
    (_header(flags=0x80), "unknown flag bits"),
    (_header(length=0xFFFFFFFF), "exceeds the maximum"),
])
def test_invalid_headers_are_refused_at_once(bad: bytes, reason: str) -> None:
    dec = PackageDecoder()
    dec.receive_data(bad)
    with pytest.raises(RemoteProtocolError, match=reason):
        dec.next_package()
    # the decoder stays dead and holds nothing
    assert dec.buffered == 0
    with pytest.raises(RemoteProtocolError):
        dec.receive_data(b"more")


def test_four_gib_length_is_refused_before_any_payload() -> None:
    dec = PackageDecoder(max_payload=1 << 20)
    dec.receive_data(_header(length=(1 << 32) - 1))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        dec.next_package()


def test_encoding_out_of_range_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        Package(type=PackageType.MESSAGE, entity=70000, message_id=1).encode()


@settings(max_examples=500)
@given(st.binary(max_size=4096))
def test_fuzzed_bytes_never_crash_and_stay_bounded(data: bytes) -> None:
    dec = PackageDecoder(max_payload=1024)
    try:
        dec.receive_data(data)
        for _ in dec.packages():
            pass
    except RemoteProtocolError:
        return
    # whatever is left cannot exceed one header plus one maximal payload
    assert dec.buffered < HEADER_SIZE + 1024 + 1


@settings(max_examples=300)
@given(packages, st.binary(min_size=1, max_size=64), st.integers(0, 200))
def test_fuzzed_mutations_of_valid_packages(pkg: Package, junk: bytes, pos: int) -> None:
    raw = bytearray(pkg.encode())
    pos = min(pos, len(raw))
    raw[pos:pos + len(junk)] = junk
    dec = PackageDecoder()
    try:
        dec.receive_data(bytes(raw))
        dec.packages()
    except RemoteProtocolError:
        pass


def test_large_payload_is_received_in_place() -> None:
    """Read into the decoder as a BufferedProtocol does: a 1 MiB payload is filled where it
    will be handed on (no copy), and small packages around it come out whole."""
    big = Package(type=PackageType.DATA, entity=3, message_id=7, stream=1,
                  payload=bytes(range(256)) * 4096)
    small = Package(type=PackageType.MESSAGE, entity=3, message_id=8, payload=b"after")
    wire = memoryview(big.encode() + small.encode())
    dec = PackageDecoder(max_payload=1 << 20)
    views = []
    while wire:
        room = dec.get_buffer()
        n = min(len(room), len(wire), 100_000)
        room[:n] = wire[:n]
        views.append(room)
        dec.buffer_updated(n)
        wire = wire[n:]
    first, second = dec.packages()
    assert first == big and second == small
    assert isinstance(first.payload, memoryview) and len(first.payload) == 1 << 20
    # the payload is the very buffer the reads went into
    assert any(v.obj is first.payload.obj for v in views)
    assert dec.buffered == 0


def test_large_payloads_go_into_the_buffers_allocate_makes() -> None:
    """The mux gives the decoder an allocator of ZeroMQ frames (vmbusify.bus.sockets
    frame_buffer): each large payload is received into one buffer of exactly its length made
    by it, and small payloads never ask for one."""
    made: list[memoryview] = []

    def allocate(n: int) -> memoryview:
        made.append(memoryview(bytearray(n)))
        return made[-1]

    pkgs = [Package(type=PackageType.DATA, entity=3, message_id=7, stream=1,
                    payload=bytes([i]) * (300_000 + i)) for i in range(3)]
    pkgs.insert(1, Package(type=PackageType.MESSAGE, entity=3, message_id=8, payload=b"hi"))
    wire = memoryview(b"".join(p.encode() for p in pkgs))
    dec = PackageDecoder(max_payload=1 << 20, allocate=allocate)
    while wire:
        room = dec.get_buffer()
        n = min(len(room), len(wire), 65_000)
        room[:n] = wire[:n]
        dec.buffer_updated(n)
        wire = wire[n:]
    got = dec.packages()
    assert got == pkgs
    assert [len(m) for m in made] == [300_000, 300_001, 300_002]
    big = [p.payload for p in got if len(p.payload) > 2]
    assert [v.obj for v in big if isinstance(v, memoryview)] == [m.obj for m in made]


def test_packages_before_a_bad_header_are_delivered_first() -> None:
    good = Package(type=PackageType.MESSAGE, entity=1, message_id=2, payload=b"ok")
    dec = PackageDecoder()
    dec.receive_data(good.encode() + _header(sig=0xDEADBEEF))
    assert dec.next_package() == good
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        dec.next_package()
