"""The host proxy's egress policy keeps VMs apart, and a denied IPv4 address is denied in every
IPv6 dress. Tested on the policy code only: no packet is sent anywhere (a refused connect is
refused before any socket is made; the one socket test fails socket() itself)."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from pathlib import Path
from typing import Any

import pytest

from vmbusify.config import Config, ProxyConfig, Role, SubnetConfig, VMEntry, load_config
from vmbusify.protocol.proxy import ReplyCode
from vmbusify.workers.proxy import server as server_module
from vmbusify.workers.proxy.policy import EgressPolicy, forms
from vmbusify.workers.proxy.server import ProxyServer
from vmbusify.workers.proxy.stats import ConnStats

REPO = Path(__file__).resolve().parents[2]
EVERYTHING = ProxyConfig(allow=["0.0.0.0/0", "::/0"])  # what packaging/host.toml ships


def host_policy(subnet: SubnetConfig | None = None, vms: list[VMEntry] | None = None,
                cfg: ProxyConfig = EVERYTHING) -> EgressPolicy:
    policy = EgressPolicy.from_config(cfg, Role.HOST, subnet, vms or [])
    # This machine's own addresses are checked first; a lab that is up puts the subnet's
    # gateway (100.77.0.1) among them. These tests are about the rules, not this machine.
    if policy.own_addresses is not None:
        policy.own_addresses = frozenset
    return policy


def v6(raw: bytes) -> str:
    return str(ipaddress.IPv6Address(raw))


def dresses(v4: str) -> dict[str, str]:
    """Every IPv6 form of ``v4``, built here byte by byte (not with the code under test)."""
    b = ipaddress.IPv4Address(v4).packed
    inverted = bytes(x ^ 0xFF for x in b)
    return {
        "mapped": v6(bytes(10) + b"\xff\xff" + b),
        "translated": v6(bytes(8) + b"\xff\xff\0\0" + b),
        "compatible": v6(bytes(12) + b),
        "nat64": v6(b"\x00\x64\xff\x9b" + bytes(8) + b),
        "nat64-local/96": v6(b"\x00\x64\xff\x9b\x00\x01" + bytes(6) + b),
        "nat64-local/64": v6(b"\x00\x64\xff\x9b\x00\x01" + bytes(3) + b + bytes(3)),
        "nat64-local/56": v6(b"\x00\x64\xff\x9b\x00\x01\x00" + b[:1] + b"\0" + b[1:] + bytes(4)),
        "nat64-local/48": v6(b"\x00\x64\xff\x9b\x00\x01" + b[:2] + b"\0" + b[2:] + bytes(5)),
        "6to4": v6(b"\x20\x02" + b + bytes(9) + b"\x01"),
        "teredo-server": v6(b"\x20\x01\x00\x00" + b + bytes(4) + b"\x3f\xff\xfd\xfe"),
        "teredo-client": v6(b"\x20\x01\x00\x00\xc0\x00\x02\x01" + bytes(4) + inverted),
    }


DENIED_V4 = {
    "127.0.0.1": "built-in denial 127.0.0.0/8",
    "169.254.169.254": "built-in denial 169.254.0.0/16",
    "100.77.0.5": "subnet's range 100.77.0.0/24",
}


@pytest.mark.parametrize("v4", sorted(DENIED_V4))
@pytest.mark.parametrize("dress", sorted(dresses("0.0.0.0")))
def test_a_denied_ipv4_address_is_denied_in_every_ipv6_dress(v4: str, dress: str) -> None:
    address = dresses(v4)[dress]
    decision = host_policy().check(address, 80)
    assert not decision.allowed, (address, decision)
    if dress in ("nat64-local/48", "nat64-local/56"):
        return  # refused whatever is inside: their last 32 bits read as 0.0.0.0
    assert DENIED_V4[v4] in decision.reason and v4 in decision.reason
    assert f"inside {ipaddress.ip_address(address)}" in decision.reason or dress == "mapped"


def test_the_dresses_of_an_allowed_address_stay_allowed_under_allow_everything() -> None:
    """Unwrapping must not refuse what is allowed: 198.51.100.7 in any form is fine."""
    p = host_policy()
    for dress, address in dresses("198.51.100.7").items():
        if dress not in ("nat64-local/48", "nat64-local/56"):
            assert p.check(address, 443).allowed, dress


def test_a_gateway_form_needs_both_the_ipv6_and_the_ipv4_allowed() -> None:
    """A NAT64 / 6to4 address is a hop (the gateway) and a destination (the IPv4 inside):
    a policy that allows only some IPv4 destinations cannot be walked around through the
    IPv6 ::/0 rule."""
    p = host_policy(cfg=ProxyConfig(allow=["198.18.0.0/15", "::/0"]))
    assert p.check("198.18.0.2", 80).allowed
    assert p.check("64:ff9b::c612:2", 80).allowed  # 198.18.0.2 via NAT64
    refused = p.check("64:ff9b::a00:1", 80)  # 10.0.0.1 via NAT64
    assert not refused.allowed and "10.0.0.1:80 matches no allow rule" in refused.reason
    assert "inside 64:ff9b::a00:1" in refused.reason
    only_v4 = host_policy(cfg=ProxyConfig(allow=["0.0.0.0/0"]))
    assert only_v4.check("::ffff:198.18.0.2", 80).allowed  # mapped: only the IPv4 counts
    assert not only_v4.check("64:ff9b::c612:2", 80).allowed  # the NAT64 hop is IPv6


def test_forms() -> None:
    ip = ipaddress.ip_address
    assert forms(ip("::ffff:127.0.0.1")) == (ip("127.0.0.1"),)
    assert forms(ip("2002:7f00:1::1")) == (ip("2002:7f00:1::1"), ip("127.0.0.1"))
    assert forms(ip("64:ff9b::7f00:1")) == (ip("64:ff9b::7f00:1"), ip("127.0.0.1"))
    assert forms(ip("2001:db8::1")) == (ip("2001:db8::1"),)
    assert forms(ip("::1")) == (ip("::1"),) and forms(ip("::")) == (ip("::"),)
    assert forms(ip("192.0.2.1")) == (ip("192.0.2.1"),)


@pytest.mark.parametrize("address", ["100.77.0.1", "100.77.0.2", "100.77.0.254",
                                     "fd77:7662:7573::2", "::ffff:100.77.0.2"])
def test_the_subnets_ranges_are_denied_before_any_allow_rule(address: str) -> None:
    decision = host_policy().check(address, 22)
    assert not decision.allowed
    assert "subnet's range" in decision.reason and "allow_vm_to_vm" in decision.reason


def test_the_addresses_the_config_gives_vms_are_denied() -> None:
    vms = [VMEntry("vm1", "vsock:3", ips=["198.19.1.10"]),
           VMEntry("vm2", "vsock:4", ips=["10.9.0.0/16", "2001:db8:2::/48"])]
    p = host_policy(vms=vms)
    for address, who in (("198.19.1.10", "vm1's address 198.19.1.10"),
                         ("10.9.3.4", "vm2's address 10.9.0.0/16"),
                         ("2001:db8:2::9", "vm2's address 2001:db8:2::/48"),
                         ("64:ff9b::a09:304", "vm2's address 10.9.0.0/16")):
        decision = p.check(address, 80)
        assert not decision.allowed and who in decision.reason, decision
    assert p.check("198.19.1.11", 80).allowed  # a VM's *reported* address counts for nothing
    assert p.check("10.10.0.1", 80).allowed


def test_allow_vm_to_vm_is_the_one_switch_that_lifts_it() -> None:
    vms = [VMEntry("vm2", "vsock:4", ips=["198.19.2.10"])]
    p = host_policy(SubnetConfig(allow_vm_to_vm=True), vms)
    assert p.check("100.77.0.2", 22).allowed
    assert p.check("198.19.2.10", 22).allowed
    assert not p.check("127.0.0.1", 22).allowed  # the built-in denials stay
    # default_deny = false lifts the built-in denials, not this one
    p = host_policy(vms=vms, cfg=ProxyConfig(allow=["0.0.0.0/0", "::/0"], default_deny=False))
    assert p.check("127.0.0.1", 22).allowed
    assert not p.check("100.77.0.2", 22).allowed and not p.check("198.19.2.10", 22).allowed
    # a subnet that is off assigns nothing: its range is not a VM's (configured ips still are)
    p = host_policy(SubnetConfig(enabled=False), vms)
    assert p.check("100.77.0.2", 22).allowed and not p.check("198.19.2.10", 22).allowed


def test_a_subnet_elsewhere_moves_the_denial_with_it() -> None:
    p = host_policy(SubnetConfig(cidr="10.200.0.0/16", cidr6=""))
    assert not p.check("10.200.3.4", 80).allowed
    assert p.check("100.77.0.2", 80).allowed and p.check("fd77:7662:7573::2", 80).allowed


def test_a_guest_keeps_its_own_policy() -> None:
    """The VM ranges are the host's business; a guest's proxy server serves the host."""
    p = EgressPolicy.from_config(EVERYTHING, Role.GUEST, SubnetConfig(), [])
    assert p.check("100.77.0.2", 80).allowed and not p.vms


def test_the_shipped_host_config_keeps_vms_apart() -> None:
    """Issue 12 item 8: under packaging/host.toml (allow everything) the host's proxy
    server refuses another VM's subnet address."""
    config = load_config(REPO / "packaging" / "host.toml")
    server = ProxyServer(None, config.proxy, config.role, ConnStats(),  # type: ignore[arg-type]
                         config)

    async def go() -> Any:
        return await server.connect("100.77.0.3", 22, "vm=vm1 stream=1")

    ack, sock = asyncio.run(go())
    assert sock is None and ack.reply is ReplyCode.NOT_ALLOWED
    assert "subnet's range 100.77.0.0/24" in ack.reason
    assert not server.policy.check("64:ff9b::644d:3", 22).allowed  # 100.77.0.3 via NAT64


def test_socket_failing_is_an_answer_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """socket(AF_INET6) on a host without IPv6 (or out of descriptors) is inside the error
    handling: the peer gets a reply, the handler does not raise."""
    real = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: Any, **kw: Any) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(family, *args, **kw)

    monkeypatch.setattr(server_module.socket, "socket", no_ipv6)
    server = ProxyServer(None, EVERYTHING, Role.GUEST, ConnStats())  # type: ignore[arg-type]
    ack, sock = asyncio.run(server.connect("::1", 9, "vm=host stream=3"))
    assert sock is None and ack.reply is ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
    assert "Address family not supported" in ack.reason


def test_a_name_the_resolver_chokes_on_is_refused_not_raised(
        monkeypatch: pytest.MonkeyPatch) -> None:
    server = ProxyServer(None, EVERYTHING, Role.HOST, ConnStats(),  # type: ignore[arg-type]
                         Config(role=Role.HOST))

    async def choke(host: str, port: int, kind: int = 0) -> list[str]:
        raise ValueError("embedded null character")

    monkeypatch.setattr(server.resolver, "resolve", choke)
    ack, sock = asyncio.run(server.connect("a\x00b", 80, "vm=vm1 stream=5"))
    assert sock is None and ack.reply is ReplyCode.HOST_UNREACHABLE
    assert "embedded null" in ack.reason
