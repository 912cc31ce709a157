"""The address book: who holds an address a VM claims in its HELLO (root in a VM is hostile)."""

from __future__ import annotations

import pytest

from vmbusify.config import Config, VMEntry
from vmbusify.errors import UnknownVMError
from vmbusify.mux.addresses import AddressBook, Refusal


def reasons(book: AddressBook, vmid: str) -> dict[str, str]:
    return {r.ip: r.describe() for r in book.refused(vmid)}


def test_a_lone_claim_is_held_and_found() -> None:
    book = AddressBook()
    assert book.claim("vm1", ["198.19.1.10", "fd00::10"]) == {"vm1"}
    assert book.held("vm1") == ["198.19.1.10", "fd00::10"]
    assert book.owner("198.19.1.10") == "vm1"
    assert book.owner("fd00:0::10") == "vm1"  # any spelling of the address
    assert book.owner("::ffff:198.19.1.10") == "vm1"  # IPv4-mapped is the IPv4 address
    with pytest.raises(UnknownVMError, match=r"no VM reported the address 192\.0\.2\.1"):
        book.owner("192.0.2.1")


@pytest.mark.parametrize("first", ["vm1", "vm2"])
def test_an_address_claimed_by_two_vms_is_held_by_neither(first: str) -> None:
    """Whichever VM claims first (a hostile VM reconnecting first after a host restart),
    once both claim it neither holds it, and the lookup names both instead of guessing."""
    second = "vm2" if first == "vm1" else "vm1"
    book = AddressBook()
    book.claim(first, ["198.19.1.10", f"198.19.9.{first[-1]}"])
    assert book.owner("198.19.1.10") == first
    changed = book.claim(second, ["198.19.1.10"])
    assert changed == {first}  # it lost the address (workers are told); the second never had it
    assert book.held(first) == [f"198.19.9.{first[-1]}"]
    assert book.held(second) == []
    assert reasons(book, first) == {"198.19.1.10": f"conflict with {second}"}
    assert reasons(book, second) == {"198.19.1.10": f"conflict with {first}"}
    with pytest.raises(UnknownVMError, match=r"address conflict: 198\.19\.1\.10 is claimed "
                                             r"by vm1 and vm2"):
        book.owner("198.19.1.10")
    with pytest.raises(UnknownVMError, match="conflict"):
        book.owner("::ffff:198.19.1.10")  # the mapped form finds the same conflict
    assert book.owner(f"198.19.9.{first[-1]}") == first  # the rest is untouched


def test_a_disconnect_releases_the_claims_and_resolves_the_conflict() -> None:
    book = AddressBook()
    book.claim("vm1", ["198.19.1.10"])
    book.claim("evil", ["198.19.1.10", "198.19.66.6"])
    assert book.release("evil") == {"vm1", "evil"}
    assert book.owner("198.19.1.10") == "vm1"
    assert book.held("evil") == [] and book.refused("evil") == []
    with pytest.raises(UnknownVMError, match="no VM reported"):
        book.owner("198.19.66.6")
    assert book.release("evil") == set()  # twice is harmless
    assert book.release("never-seen") == set()


def test_reconnect_takes_the_addresses_again() -> None:
    book = AddressBook()
    book.claim("vm1", ["198.19.1.10"])
    book.release("vm1")
    with pytest.raises(UnknownVMError):
        book.owner("198.19.1.10")
    assert book.claim("vm1", ["198.19.1.10"]) == {"vm1"}
    assert book.owner("198.19.1.10") == "vm1"


def test_a_later_hello_replaces_the_claims() -> None:
    book = AddressBook()
    book.claim("vm1", ["198.19.1.10", "198.19.1.11"])
    book.claim("vm2", ["198.19.1.11"])
    assert book.held("vm1") == ["198.19.1.10"]
    # vm2's next HELLO drops the contested address: vm1 gets it back
    assert book.claim("vm2", ["198.19.2.10"]) == {"vm1", "vm2"}
    assert book.held("vm1") == ["198.19.1.10", "198.19.1.11"]
    assert book.owner("198.19.1.11") == "vm1"
    # vm1's next HELLO has other addresses: the old ones are no longer vm1's
    book.claim("vm1", ["198.19.1.12"])
    with pytest.raises(UnknownVMError, match=r"no VM reported the address 198\.19\.1\.10"):
        book.owner("198.19.1.10")
    assert book.owner("198.19.1.12") == "vm1"
    # an empty HELLO: no addresses at all
    assert book.claim("vm1", []) == {"vm1"}
    assert book.held("vm1") == []
    # a HELLO that changes nothing reports no change
    book.claim("vm2", ["198.19.2.10"])
    assert book.claim("vm2", ["198.19.2.10"]) == set()


def test_configured_ips_limit_what_a_vm_takes_and_reserve_it_from_others() -> None:
    book = AddressBook({"vm1": ["198.19.1.10", "fd00:1::/64"], "vm2": ["198.19.2.0/24"],
                        "free": []})
    book.claim("vm1", ["198.19.1.10", "198.19.1.99", "fd00:1::5"])
    assert book.held("vm1") == ["198.19.1.10", "fd00:1::5"]
    assert reasons(book, "vm1") == {"198.19.1.99": "outside the configured ips"}
    with pytest.raises(UnknownVMError, match="vm1 claimed it but outside the configured ips"):
        book.owner("198.19.1.99")
    # vm2 (restricted to its own /24) cannot take vm1's address, nor cause a conflict on it
    book.claim("vm2", ["198.19.1.10", "198.19.2.10"])
    assert book.held("vm2") == ["198.19.2.10"]
    assert book.owner("198.19.1.10") == "vm1"
    # an unrestricted VM may not take what the configuration gives another VM
    book.claim("free", ["198.19.1.10", "198.19.2.77", "fd00:1::5", "203.0.113.5"])
    assert book.held("free") == ["203.0.113.5"]
    assert reasons(book, "free") == {"198.19.1.10": "configured for vm1",
                                     "198.19.2.77": "configured for vm2",
                                     "fd00:1::5": "configured for vm1"}
    assert book.owner("198.19.1.10") == "vm1" and book.owner("fd00:1::5") == "vm1"
    # an unconfigured vmid (not in the mapping) is unrestricted too
    book.claim("other", ["203.0.113.5"])
    with pytest.raises(UnknownVMError, match="conflict"):
        book.owner("203.0.113.5")


def test_addresses_nobody_can_own_are_refused() -> None:
    book = AddressBook()
    claims = ["127.0.0.1", "::1", "0.0.0.0", "::", "169.254.169.254", "fe80::1%eth0",
              "224.0.0.1", "ff02::1", "255.255.255.255", "::ffff:127.0.0.1", "not-an-ip",
              "198.19.1.10"]
    book.claim("vm1", claims)
    assert book.held("vm1") == ["198.19.1.10"]
    refused = {r.ip: r.why for r in book.refused("vm1")}
    assert refused["not-an-ip"] is Refusal.INVALID
    assert all(why is Refusal.NOT_OWNABLE for ip, why in refused.items() if ip != "not-an-ip")
    assert "127.0.0.1" in refused and "fe80::1" in refused
    with pytest.raises(UnknownVMError, match="not an address a VM can own"):
        book.owner("127.0.0.1")
    with pytest.raises(UnknownVMError, match="not an IP address"):
        book.owner("vm1")


def test_claims_are_deduplicated_and_capped() -> None:
    book = AddressBook()
    book.claim("vm1", ["10.0.0.1", "10.0.0.1", "::ffff:10.0.0.1"])
    assert book.held("vm1") == ["10.0.0.1"]
    book.claim("vm2", [f"10.1.{i // 256}.{i % 256}" for i in range(1000)])
    assert len(book.held("vm2")) == 256


def test_status_shows_held_and_refused_with_why() -> None:
    book = AddressBook.from_config(Config(vms=[VMEntry("vm1", "unix:/x", ips=["10.0.0.0/8"]),
                                               VMEntry("vm2", "unix:/y")]))
    book.claim("vm1", ["10.0.0.1", "10.0.0.2", "192.0.2.1"])
    book.claim("vm2", ["10.0.0.2", "192.0.2.1"])
    assert book.status("vm1") == {
        "ips": ["10.0.0.1", "10.0.0.2"],
        "ips_refused": [{"ip": "192.0.2.1", "why": "outside-config",
                         "reason": "outside the configured ips", "with": []}]}
    assert book.status("vm2") == {
        "ips": ["192.0.2.1"],
        "ips_refused": [{"ip": "10.0.0.2", "why": "reserved", "reason": "configured for vm1",
                         "with": ["vm1"]}]}
    # vm1 and vm2 both claimed 10.0.0.2, but only vm1 may: vm1 holds it
    assert book.owner("10.0.0.2") == "vm1"
    assert book.owner("192.0.2.1") == "vm2"
    assert book.status("nobody") == {"ips": [], "ips_refused": []}
