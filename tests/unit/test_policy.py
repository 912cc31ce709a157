"""The proxy server's egress policy, tested on the policy code: no packet is sent anywhere."""

from __future__ import annotations

import pytest

from vmbusify.config import ProxyConfig, Role
from vmbusify.errors import ConfigError
from vmbusify.system import interface_addresses
from vmbusify.workers.proxy.policy import EgressPolicy, OwnAddresses, parse_rule
from vmbusify.workers.proxy.resolve import parse_hosts


def policy(role: Role = Role.HOST, **kw: object) -> EgressPolicy:
    return EgressPolicy.from_config(ProxyConfig(**kw), role)  # type: ignore[arg-type]


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.1.2.3", "::1", "0.0.0.0", "::",
    "169.254.169.254", "169.254.0.1", "fd00:ec2::254", "fe80::1", "fe80::1%eth0",
    # the same addresses written as IPv4-mapped / IPv4-compatible IPv6
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:a9fe:a9fe", "::127.0.0.1",
    "::ffff:0.0.0.0",
])
def test_host_refuses_its_loopback_and_metadata_by_default(address: str) -> None:
    decision = policy().check(address, 80)
    assert not decision.allowed
    assert "built-in" in decision.reason


def test_guest_may_reach_its_own_loopback_but_not_metadata() -> None:
    guest = policy(Role.GUEST)
    assert guest.check("127.0.0.1", 22).allowed
    assert guest.check("::1", 22).allowed
    assert not guest.check("169.254.169.254", 80).allowed
    assert not guest.check("::ffff:169.254.169.254", 80).allowed
    assert not guest.check("fd00:ec2::254", 80).allowed


def test_host_refuses_its_own_interface_addresses() -> None:
    """A VM must not reach the host's own services through the proxy (the subnet's firewall
    refuses them too): every address of the host's interfaces is a built-in denial."""
    import ipaddress

    own = {ipaddress.ip_address("192.0.2.7"), ipaddress.ip_address("2001:db8::7")}
    p = policy(allow=["0.0.0.0/0", "::/0"])
    p.own_addresses = OwnAddresses(lambda: own)
    for address in ("192.0.2.7", "::ffff:192.0.2.7", "2001:db8::7"):
        decision = p.check(address, 22)
        assert not decision.allowed and "address of this host" in decision.reason
    assert p.check("192.0.2.8", 22).allowed


def test_own_addresses_are_the_real_interfaces_and_only_a_host_default() -> None:
    import ipaddress

    assert ipaddress.ip_address("127.0.0.1") in interface_addresses()
    assert policy().own_addresses is not None
    assert policy(default_deny=False).own_addresses is None
    assert policy(Role.GUEST).own_addresses is None  # a guest may reach its own services


def test_own_addresses_are_read_again_only_after_their_ttl() -> None:
    import ipaddress

    reads: list[int] = []

    def read() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        reads.append(1)
        return {ipaddress.ip_address(f"192.0.2.{len(reads)}")}

    cached = OwnAddresses(read, ttl=3600)
    assert cached() == cached() == {ipaddress.ip_address("192.0.2.1")}
    assert len(reads) == 1
    fresh = OwnAddresses(read, ttl=0)
    assert fresh() != fresh()  # an interface that came or went is seen at once


def test_default_deny_can_be_lifted() -> None:
    assert policy(default_deny=False).check("127.0.0.1", 80).allowed


def test_allow_and_deny_with_ports_deny_wins() -> None:
    p = policy(allow=["198.18.0.0/24", "[2001:db8::/32]:443"],
               deny=["198.18.0.66", "198.18.0.0/24:25,6000-6010"])
    assert p.check("198.18.0.2", 80).allowed
    assert p.check("::ffff:198.18.0.2", 80).allowed  # mapped form judged as IPv4
    assert not p.check("198.18.0.66", 80).allowed      # deny wins over allow
    assert not p.check("198.18.0.2", 25).allowed
    assert not p.check("198.18.0.2", 6005).allowed
    assert p.check("198.18.0.2", 6011).allowed
    assert p.check("2001:db8::1", 443).allowed
    assert not p.check("2001:db8::1", 80).allowed
    assert not p.check("198.51.100.1", 80).allowed      # no allow rule matches
    assert not p.check("not-an-ip", 80).allowed


@pytest.mark.parametrize("text", ["10.0.0.0/33", "10.0.0.0/8:", "10.0.0.0/8:70000",
                                  "10.0.0.0/8:9-1", "[::1/128", "[::1]x", "nonsense"])
def test_bad_rules_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_rule(text)


def test_rule_forms() -> None:
    assert parse_rule("10.1.2.3").network.prefixlen == 32
    assert parse_rule("fd00::/8").ports == ()
    assert parse_rule("[fd00::/8]:22,80-81").ports == ((22, 22), (80, 81))
    assert parse_rule("10.0.0.0/8:53").ports == ((53, 53),)


def test_hosts_file_parsing() -> None:
    names = parse_hosts("# lab\n127.0.0.1\tlocalhost\n::1 localhost ip6-localhost\n"
                        "198.18.0.2 external.lab  # the outside\nbogus line\n"
                        "not-an-ip name\n")
    assert names["localhost"] == ["127.0.0.1", "::1"]
    assert names["external.lab"] == ["198.18.0.2"]
    assert "name" not in names
