"""The bus envelope without ZeroMQ: every message round-trips through its frames, a PKG's
payload is never copied, and malformed frames are a RemoteProtocolError, never IndexError."""

from __future__ import annotations

from typing import Any

import pytest

from vmbusify.bus.frames import (
    BusKind,
    CtlReply,
    CtlRequest,
    Evt,
    Frames,
    Pkg,
    Reg,
    RegOk,
    Rereg,
    TunnelEvent,
    Unreg,
    from_mux,
    from_worker,
    vmid_of,
)
from vmbusify.errors import (
    ErrorCode,
    RemoteProtocolError,
    UnknownVMError,
    VMBusifyError,
)
from vmbusify.protocol.package import Package, PackageFlag, PackageType
from vmbusify.protocol.serialize import dumps


def _package(payload: bytes | memoryview = b"abc") -> Package:
    return Package(type=PackageType.DATA, flags=PackageFlag.EOF, entity=3, id=0,
                   message_id=9, stream=77, payload=payload)


@pytest.mark.parametrize("msg", [
    Reg(name="proxy", pid=42, entities=[3, 4], routes=[[4, 1, 2], [4, 2, 4], [5, 1]]),
    Reg(name="proxy", pid=42, entities=[3], routes=[[4, 1, 2]], since=12_345_678_901_234),
    Unreg(),
    CtlRequest(b"17", "ping", {"vmid": "vm1", "timeout": 2.5}),
    Pkg.of("vm1", _package()),
])
def test_what_a_worker_sends_round_trips(msg: Any) -> None:
    frames = msg.to_frames()
    assert frames[0] == msg.KIND.value
    assert from_worker(frames) == msg


@pytest.mark.parametrize("msg", [
    RegOk("host", "c0ffee"),
    Rereg(),
    CtlReply(b"17", True, {"vmid": "vm1", "rtt_ms": 0.2}),
    CtlReply(b"18", False, error="unknown VM 'vm9'", code=ErrorCode.UNKNOWN_VM),
    Evt(TunnelEvent.UP, "vm1", ips=["198.19.1.10"]),
    Evt(TunnelEvent.DOWN, "vm1", reason="peer closed the connection"),
    Evt(TunnelEvent.PEER_LOST, "vm1", entities=[4]),
    Pkg.of("host", _package()),
])
def test_what_the_mux_sends_round_trips(msg: Any) -> None:
    assert from_mux(msg.to_frames()) == msg


def test_a_pkg_carries_its_package_and_never_copies_the_payload() -> None:
    big = memoryview(bytearray(b"z" * (1 << 20)))  # as a received 1 MiB ZeroMQ frame comes
    frames = Pkg.of("vm1", _package(big)).to_frames()
    assert frames[3] is big  # handed on as it is
    parsed = from_worker(frames)
    assert isinstance(parsed, Pkg) and parsed.payload is big
    pkg = parsed.package()
    assert pkg.payload is big
    assert (pkg.type, pkg.flags, pkg.entity, pkg.message_id, pkg.stream) == (
        PackageType.DATA, PackageFlag.EOF, 3, 9, 77)


def test_a_ctl_request_is_the_command_and_its_arguments() -> None:
    req = CtlRequest(b"1", "vmid", {"ip": "198.19.1.10"})
    assert req.body() == {"cmd": "vmid", "ip": "198.19.1.10"}


def test_a_failed_ctl_reply_gives_back_the_error_of_its_code() -> None:
    reply = CtlReply.failure(b"3", UnknownVMError("unknown VM 'vm9'"))
    back = from_mux(reply.to_frames())
    assert isinstance(back, CtlReply) and not back.ok
    exc = back.exception()
    assert type(exc) is UnknownVMError and str(exc) == "unknown VM 'vm9'"
    # a code this release does not know is the base class, and so is none at all
    for body in ({"ok": False, "error": "x", "code": 9999}, {"ok": False, "error": "x"},
                 {"ok": False, "error": "x", "code": "UnknownVMError"}):
        odd = from_mux([BusKind.CTL.value, b"4", dumps(body)])
        assert isinstance(odd, CtlReply)
        assert type(odd.exception()) is VMBusifyError
        assert odd.exception().code is ErrorCode.GENERIC


def test_event_handlers_get_the_fields_of_their_event() -> None:
    assert Evt(TunnelEvent.UP, "vm1", ips=["10.0.0.1"]).info() == {"ips": ["10.0.0.1"]}
    assert Evt(TunnelEvent.DOWN, "vm1", reason="gone").info() == {"reason": "gone"}
    assert Evt(TunnelEvent.PEER_LOST, "vm1", entities=[2]).info() == {"entities": [2]}


HEADER = _package().header()

MALFORMED_FROM_WORKER: list[Frames] = [
    [],
    [b"WHAT"],
    [b"X" * 10_000],
    [BusKind.PKG.value],
    [BusKind.PKG.value, b"vm1"],
    [BusKind.PKG.value, b"vm1", HEADER],
    [BusKind.PKG.value, b"vm1", HEADER, b"", b"extra"],
    [BusKind.PKG.value, b"vm1", HEADER[:10], b""],
    [BusKind.PKG.value, b"\xff\xfe", HEADER, b""],
    [BusKind.PKG.value, b"v" * 1000, HEADER, b""],
    [BusKind.REG.value],
    [BusKind.REG.value, b"\xc1"],
    [BusKind.REG.value, dumps([1, 2])],
    [BusKind.REG.value, dumps({"name": "w", "pid": "1", "entities": [], "routes": []})],
    [BusKind.REG.value, dumps({"name": "w", "pid": 1, "entities": ["a"], "routes": []})],
    [BusKind.REG.value, dumps({"name": "w", "pid": 1, "entities": [], "routes": [3]})],
    [BusKind.REG.value, dumps({"pid": 1, "entities": [], "routes": []})],
    [BusKind.REG.value, dumps({"name": "w", "pid": 1, "entities": [], "routes": [],
                               "since": -1})],
    [BusKind.REG.value, dumps({"name": "w", "pid": 1, "entities": [], "routes": [],
                               "since": "1"})],
    [BusKind.UNREG.value, b"x"],
    [BusKind.CTL.value, b"1"],
    [BusKind.CTL.value, b"1", dumps({"nocmd": 1})],
    [BusKind.CTL.value, b"1" * 1000, dumps({"cmd": "status"})],
    [BusKind.REGOK.value, dumps({"role": "host", "mux_id": "x"})],  # not a worker's
    [BusKind.EVT.value, dumps({"event": "up", "vmid": "vm1"})],  # not a worker's
]

MALFORMED_FROM_MUX: list[Frames] = [
    [],
    [b""],
    [BusKind.REG.value, dumps({"name": "w", "pid": 1, "entities": [], "routes": []})],
    [BusKind.REGOK.value],
    [BusKind.REGOK.value, dumps({"mux_id": 7})],
    [BusKind.REREG.value, b"x"],
    [BusKind.CTL.value, b"1"],
    [BusKind.CTL.value, b"1", b"\xc1"],
    [BusKind.EVT.value],
    [BusKind.EVT.value, dumps({"event": "sideways", "vmid": "vm1"})],
    [BusKind.EVT.value, dumps({"event": "up"})],
    [BusKind.EVT.value, dumps({"event": "up", "vmid": "vm1", "ips": [1]})],
    [BusKind.EVT.value, dumps({"event": "peer-lost", "vmid": "vm1", "entities": ["x"]})],
    [BusKind.PKG.value, b"vm1", HEADER],
]


@pytest.mark.parametrize("frames", MALFORMED_FROM_WORKER)
def test_malformed_messages_from_a_worker_are_protocol_errors(frames: Frames) -> None:
    with pytest.raises(RemoteProtocolError):
        from_worker(frames)


@pytest.mark.parametrize("frames", MALFORMED_FROM_MUX)
def test_malformed_messages_from_the_mux_are_protocol_errors(frames: Frames) -> None:
    with pytest.raises(RemoteProtocolError):
        from_mux(frames)


def test_a_pkg_with_a_bad_header_is_refused_where_it_is_read() -> None:
    bad = from_worker([BusKind.PKG.value, b"vm1", b"\x00" * 24, b""])
    assert isinstance(bad, Pkg)
    with pytest.raises(RemoteProtocolError, match="signature"):
        bad.package()


def test_the_vmid_of_a_message_for_a_log_line() -> None:
    assert vmid_of(Pkg.of("vm1", _package()).to_frames()) == "vm1"
    assert vmid_of([BusKind.PKG.value, b"\xffvm"]) == "\ufffdvm"
    assert vmid_of([b"WHAT", b"vm1"]) == vmid_of([]) == vmid_of([BusKind.PKG.value]) == ""
