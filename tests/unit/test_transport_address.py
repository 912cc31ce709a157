"""Transport addresses: parsing, canonical rendering and the Hyper-V service GUID mapping."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmbusify.config import DEFAULT_TUNNEL_PORT
from vmbusify.errors import AddressError, TransportError
from vmbusify.transport import (
    HV_GUID_CHILDREN,
    HV_GUID_LOOPBACK,
    HV_GUID_PARENT,
    HV_GUID_WILDCARD,
    VMADDR_CID_ANY,
    FirecrackerAddress,
    HypervAddress,
    TcpAddress,
    TransportKind,
    UnixAddress,
    VsockAddress,
    as_address,
    parse_address,
    service_guid,
)

VMID = "5d8e6f0a-1c2b-4d3e-9f40-0123456789ab"

GOOD = [
    # (text, parsed, canonical)
    ("vsock:3", VsockAddress(3, DEFAULT_TUNNEL_PORT), "vsock:3:6541"),
    ("vsock:3:1024", VsockAddress(3, 1024), "vsock:3:1024"),
    ("vsock:any", VsockAddress(VMADDR_CID_ANY), "vsock:any:6541"),
    ("vsock:any:6541", VsockAddress(VMADDR_CID_ANY, 6541), "vsock:any:6541"),
    ("vsock:host:7000", VsockAddress(2, 7000), "vsock:host:7000"),
    ("vsock:2:7000", VsockAddress(2, 7000), "vsock:host:7000"),
    ("VSOCK:ANY", VsockAddress(VMADDR_CID_ANY), "vsock:any:6541"),
    ("vsock:4294967294:4294967294", VsockAddress(0xFFFFFFFE, 0xFFFFFFFE),
     "vsock:4294967294:4294967294"),
    (f"hyperv:{VMID}", HypervAddress(VMID.upper()), f"hyperv:{VMID.upper()}:6541"),
    (f"hyperv:{VMID}:80", HypervAddress(VMID.upper(), 80), f"hyperv:{VMID.upper()}:80"),
    ("hyperv:wildcard", HypervAddress(HV_GUID_WILDCARD), "hyperv:wildcard:6541"),
    ("hyperv:children:9", HypervAddress(HV_GUID_CHILDREN, 9), "hyperv:children:9"),
    ("hyperv:loopback", HypervAddress(HV_GUID_LOOPBACK), "hyperv:loopback:6541"),
    ("hyperv:Parent", HypervAddress(HV_GUID_PARENT), "hyperv:parent:6541"),
    (f"hyperv:{HV_GUID_PARENT.lower()}", HypervAddress(HV_GUID_PARENT), "hyperv:parent:6541"),
    ("fc:/srv/vm1/v.sock", FirecrackerAddress("/srv/vm1/v.sock"), "fc:/srv/vm1/v.sock:6541"),
    ("fc:/srv/vm1/v.sock:52", FirecrackerAddress("/srv/vm1/v.sock", 52),
     "fc:/srv/vm1/v.sock:52"),
    ("unix:/run/vmbusify/t.sock", UnixAddress("/run/vmbusify/t.sock"),
     "unix:/run/vmbusify/t.sock"),
    ("unix:/tmp/with:colon", UnixAddress("/tmp/with:colon"), "unix:/tmp/with:colon"),
    ("tcp:127.0.0.1:6541", TcpAddress("127.0.0.1", 6541), "tcp:127.0.0.1:6541"),
    ("tcp:LocalHost:1", TcpAddress("localhost", 1), "tcp:localhost:1"),
    ("tcp:[::1]:65535", TcpAddress("::1", 65535), "tcp:[::1]:65535"),
    ("tcp:[0:0:0:0:0:0:0:1]:80", TcpAddress("::1", 80), "tcp:[::1]:80"),
    ("tcp:[fe80::1%lo]:22", TcpAddress("fe80::1%lo", 22), "tcp:[fe80::1%lo]:22"),
]


@pytest.mark.parametrize(("text", "parsed", "canonical"), GOOD, ids=[g[0] for g in GOOD])
def test_good_addresses_parse_and_render(text: str, parsed: object, canonical: str) -> None:
    address = parse_address(text)
    assert address == parsed
    assert str(address) == canonical
    assert parse_address(canonical) == address


def test_kinds() -> None:
    assert parse_address("vsock:3").kind is TransportKind.VSOCK
    assert parse_address("hyperv:parent").kind is TransportKind.HYPERV
    assert parse_address("fc:/v.sock").kind is TransportKind.FC
    assert parse_address("unix:/u").kind is TransportKind.UNIX
    assert parse_address("tcp:127.0.0.1:1").kind is TransportKind.TCP
    assert [k.value for k in TransportKind] == ["vsock", "hyperv", "fc", "unix", "tcp", "vport"]


BAD = [
    # (text, a fragment the one-line message must contain)
    ("", "missing a scheme"),
    ("3", "missing a scheme"),
    ("vsok:3", "unknown scheme 'vsok'"),
    (" vsock:3", "whitespace"),
    ("vsock:3 ", "whitespace"),
    ("vsock:3\n", "control characters"),
    ("vsock:", "needs a CID"),
    ("vsock:0", "CID 0"),
    ("vsock:1", "CID 1"),
    ("vsock:-3", "CID '-3'"),
    ("vsock:+3", "CID '+3'"),
    ("vsock:three", "CID 'three'"),
    ("vsock:4294967295", "write 'any'"),
    ("vsock:4294967296", "CID 4294967296"),
    ("vsock:3:", "vsock port ''"),
    ("vsock:3:0", "vsock port 0"),
    ("vsock:3:4294967295", "VMADDR_PORT_ANY"),
    ("vsock:3:99999999999", "vsock port 99999999999"),
    ("vsock:3:" + "9" * 5000, "out of range"),
    ("vsock:3:x", "vsock port 'x'"),
    ("vsock:3:6541:x", "trailing ':x' after the port"),
    ("vsock:3:6541/", "vsock port '6541/'"),
    ("hyperv:", "VM id ''"),
    ("hyperv:vm1", "VM id 'vm1'"),
    (f"hyperv:{{{VMID}}}", "is not a GUID"),
    (f"hyperv:{VMID}x", "is not a GUID"),
    (f"hyperv:{VMID}:0", "hyperv port 0"),
    (f"hyperv:{VMID}:80:1", "trailing ':1' after the port"),
    ("fc:", "needs a socket path"),
    ("fc:v.sock", "must be absolute"),
    ("fc:/v.sock:", "fc port ''"),
    ("fc:/v.sock:52x", "fc port '52x'"),
    ("fc:/a:b:52", "must not contain ':'"),
    ("fc:/" + "a" * 120, "longer than 107 bytes"),
    ("unix:", "needs a socket path"),
    ("unix:relative.sock", "must be absolute"),
    ("tcp:", "needs a port"),
    ("tcp:127.0.0.1", "needs a port"),
    ("tcp:127.0.0.1:", "tcp port ''"),
    ("tcp:127.0.0.1:0", "tcp port 0"),
    ("tcp:127.0.0.1:65536", "tcp port 65536"),
    ("tcp:127.0.0.1:80:1", "trailing ':1' after the port"),
    ("tcp:::1", "need brackets"),
    ("tcp:::1:80", "need brackets"),
    ("tcp:[::1]", "needs a port"),
    ("tcp:[::1:80", "closing ']'"),
    ("tcp:[::1]80", "trailing '80'"),
    ("tcp:[127.0.0.1]:80", "not an IPv6 address"),
    ("tcp:[nothost]:80", "not an IPv6 address"),
    ("tcp:10.1:80", "not a valid IPv4 address"),
    ("tcp:under_score:80", "'under_score'"),
    ("tcp:-lead:80", "'-lead'"),
    ("tcp::80", "needs a host"),
]


@pytest.mark.parametrize(("text", "fragment"), BAD, ids=[b[0][:40] for b in BAD])
def test_bad_addresses_name_the_bad_part(text: str, fragment: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_address(text)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
    assert message.startswith("address ")
    assert len(message) < 400


def test_address_error_is_a_transport_error() -> None:
    with pytest.raises(TransportError):
        parse_address("nope")


def test_non_string_is_rejected() -> None:
    with pytest.raises(AddressError, match="must be a string"):
        parse_address(3)  # type: ignore[arg-type]


def test_constructors_validate_too() -> None:
    with pytest.raises(AddressError, match="CID 1"):
        VsockAddress(1, 5)
    with pytest.raises(AddressError, match="port 0"):
        VsockAddress(3, 0)
    with pytest.raises(AddressError, match="integer"):
        VsockAddress(True, 5)
    with pytest.raises(AddressError, match="not a GUID"):
        HypervAddress("vm1")
    with pytest.raises(AddressError, match="absolute"):
        UnixAddress("x")
    with pytest.raises(AddressError, match="tcp port 70000"):
        TcpAddress("127.0.0.1", 70000)
    with pytest.raises(AddressError, match="valid IPv6"):
        TcpAddress("[::1]", 80)


def test_addresses_are_frozen_and_hashable() -> None:
    address = parse_address("vsock:3")
    assert isinstance(address, VsockAddress)
    with pytest.raises(dataclasses.FrozenInstanceError):
        address.port = 1  # type: ignore[misc]
    assert len({parse_address("vsock:3"), parse_address("vsock:3:6541")}) == 1
    # Equal GUIDs in either case are the same address.
    assert HypervAddress(VMID) == HypervAddress(VMID.upper())


def test_as_address() -> None:
    address = VsockAddress(7)
    assert as_address(address) is address
    assert as_address("vsock:7") == address
    with pytest.raises(AddressError, match="not an address"):
        as_address(7)  # type: ignore[arg-type]


def test_sockaddrs() -> None:
    assert VsockAddress(3, 6541).sockaddr == (3, 6541)
    hv = HypervAddress(VMID, 6541)
    assert hv.sockaddr == (VMID.upper(), "0000198D-FACB-11E6-BD58-64006A7986D3")
    assert FirecrackerAddress("/srv/v.sock", 52).listen_path == "/srv/v.sock_52"


# -- the Hyper-V service GUID ------------------------------------------------------------

def _reference_guid(port: int) -> str:
    """The mapping built another way: the port is the GUID's first 32-bit field."""
    template = uuid.UUID("00000000-FACB-11E6-BD58-64006A7986D3")
    return str(uuid.UUID(int=template.int | (port << 96))).upper()


def test_service_guid_of_the_tunnel_port() -> None:
    assert DEFAULT_TUNNEL_PORT == 6541
    assert service_guid(6541) == "0000198D-FACB-11E6-BD58-64006A7986D3"
    address = parse_address("hyperv:parent")
    assert isinstance(address, HypervAddress)
    assert address.service_id == service_guid(6541)


@pytest.mark.parametrize("port", [0, 1, 22, 1024, 6541, 65535, 0x40000000, 0xFFFFFFFF])
def test_service_guid_matches_reference(port: int) -> None:
    assert service_guid(port) == _reference_guid(port)
    assert uuid.UUID(service_guid(port)).fields[0] == port


@pytest.mark.parametrize("port", [-1, 1 << 32, "80", 1.0, True])
def test_service_guid_rejects_non_ports(port: object) -> None:
    with pytest.raises(AddressError):
        service_guid(port)  # type: ignore[arg-type]


# -- properties --------------------------------------------------------------------------

@given(cid=st.integers(2, 0xFFFFFFFF), port=st.integers(1, 0xFFFFFFFE))
def test_vsock_round_trip(cid: int, port: int) -> None:
    address = VsockAddress(cid, port)
    assert parse_address(str(address)) == address


@given(vmid=st.uuids(), port=st.integers(1, 0xFFFFFFFE))
def test_hyperv_round_trip(vmid: uuid.UUID, port: int) -> None:
    address = HypervAddress(str(vmid), port)
    assert parse_address(str(address)) == address


@given(host=st.ip_addresses(), port=st.integers(1, 65535))
def test_tcp_round_trip(host: object, port: int) -> None:
    address = TcpAddress(str(host), port)
    assert parse_address(str(address)) == address


@given(text=st.text(max_size=60) | st.from_regex(
    r"(vsock|hyperv|fc|unix|tcp):[\[\]0-9a-fA-F:./_-]{0,50}", fullmatch=True))
def test_any_text_parses_canonically_or_raises_address_error(text: str) -> None:
    try:
        address = parse_address(text)
    except AddressError as exc:
        error = str(exc)
    else:
        assert parse_address(str(address)) == address
        return
    assert "\n" not in error
