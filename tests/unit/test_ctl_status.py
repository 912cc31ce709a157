"""`vmbusifyctl status` in its human form: what each worker publishes is shown."""

from __future__ import annotations

import time
from typing import Any

from vmbusify.cli.ctl import render_status


def status(workers: list[dict[str, Any]]) -> dict[str, Any]:
    return {"role": "host", "name": "h1", "version": "1", "pid": 10, "started": time.time(),
            "vms": [{"vmid": "vm1", "state": "connected", "rtt_ms": 0.4,
                     "connected_since": time.time(), "bytes_in": 2048, "bytes_out": 10,
                     "ips": ["100.77.0.2"]}],
            "workers": workers, "programs": [{"name": "mux", "state": "RUNNING", "pid": 10}]}


def test_every_worker_counter_is_shown() -> None:
    subnet = {"name": "subnet", "pid": 12, "entities": ["ip-bearer"], "stats": {
        "role": "host", "subnet": "100.77.0.0/24", "no_route": 3, "spoofed": 4,
        "leases": {"vm1": 2},
        "attached": {"vm1": {"frames_in": 7, "bytes_in": 3 << 20}}}}
    proxy = {"name": "proxy", "pid": 11, "entities": ["proxy-server"],
             "stats": {"open": 1, "vms": {"vm1": {"open": 1, "bytes_out": 512}}}}
    guest_subnet = {"name": "gsubnet", "pid": 13, "entities": ["ip-bearer"], "stats": {
        "attached": True, "lease": {"address": "100.77.0.2", "prefixlen": 24}, "bearer": None}}
    text = render_status(status([subnet, proxy, guest_subnet]))
    lines = [line.strip() for line in text.splitlines()]
    assert "subnet 100.77.0.0/24, no_route 3, spoofed 4" in lines
    assert "leases: vm1 2" in lines
    assert "attached vm1: frames_in 7, in 3.0MiB" in lines
    assert "open 1" in lines and "vm1: open 1, out 512B" in lines
    assert "attached True" in lines and "lease: address 100.77.0.2, prefixlen 24" in lines
    assert "role host" not in text  # the endpoint's role is in the title already


def test_a_worker_without_counters_has_its_line_only() -> None:
    text = render_status(status([{"name": "control", "pid": 9, "entities": ["cmd-listener"],
                                  "stats": {}}]))
    workers = text.split("workers:")[1].split("programs:")[0].strip().splitlines()
    assert [w.split()[0] for w in workers] == ["control"]


def test_addresses_not_held_are_shown_with_why() -> None:
    st = status([])
    st["vms"][0]["ips"] = ["100.77.0.2"]
    st["vms"][0]["ips_refused"] = [
        {"ip": "198.19.2.10", "why": "conflict", "reason": "conflict with vm2", "with": ["vm2"]},
        {"ip": "10.9.9.9", "why": "outside-config", "reason": "outside the configured ips",
         "with": []},
        {"ip": "x\x1b[2Jy", "why": "invalid", "reason": "not an IP address", "with": []}]
    lines = [line.strip() for line in render_status(st).splitlines()]
    assert "not held: 198.19.2.10 (conflict with vm2)" in lines
    assert "not held: 10.9.9.9 (outside the configured ips)" in lines
    assert "not held: x\\x1b[2Jy (not an IP address)" in lines  # a peer's text, escaped
    assert any(line.startswith("vm1") and line.endswith("100.77.0.2") for line in lines)


def test_what_the_mux_refused_from_a_vm_is_shown_under_it() -> None:
    st = status([])
    st["vms"][0].update(dropped={"wrong-type": 3, "foreign-entity": 1, "no-route": 0},
                        read_yields=12, backlog_closes=1)
    st["vms"].append({"vmid": "vm2", "state": "connected", "rtt_ms": 0.3,
                      "connected_since": time.time(), "bytes_in": 1, "bytes_out": 1,
                      "ips": [], "dropped": {}, "read_yields": 0, "backlog_closes": 0})
    lines = render_status(st).split("workers:")[0].splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith("vm1 "))
    assert lines[i + 1].strip() == ("dropped foreign-entity 1, wrong-type 3; read budget used "
                                    "up 12 times; closed for backlog 1 time")
    assert lines[i + 2].startswith("vm2 ")  # a VM with nothing refused has its line only
    assert lines[i + 3:] == [""]


def test_a_guests_reason_reaches_the_terminal_escaped(capsys: Any) -> None:
    """A disconnected VM's last error and a failed command's reason may be a guest's text
    (a BYE, an ERROR ACK): no escape sequence or line break of it reaches the terminal."""
    import pytest

    from vmbusify.cli.ctl import _fail

    st = status([])
    st["vms"][0].update(state="disconnected", last_error="peer refused: \x1b]0;owned\x07\nx")
    assert "last error: peer refused: \\x1b]0;owned\\x07\\x0ax" in render_status(st)
    with pytest.raises(SystemExit):
        _fail("vm1: no such program\x1b[2J\nFORGED")
    # no escape sequence reaches the terminal; a line break may (it rewrites nothing)
    assert capsys.readouterr().err == "vmbusifyctl: vm1: no such program\\x1b[2J\nFORGED\n"
