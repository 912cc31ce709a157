"""vmbusify.client's typed status: what a listener sends, and what a newer, older or broken
one might, read without an exception."""

from __future__ import annotations

import pytest

from vmbusify.client.execution import ExecRequest, argv_of, signal_name
from vmbusify.client.status import Status, VMStatus


def test_a_full_record() -> None:
    vm = VMStatus.from_json({"vmid": "vm1", "state": "connected", "ips": ["198.19.1.10"],
                             "address": "vsock:3", "rtt_ms": 0.5, "connected_since": 1.0e9,
                             "bytes_in": 10, "bytes_out": 20, "hostname": "web",
                             "peer_version": "0.2.0", "last_error": "", "source": "libvirt",
                             "aliases": ["uuid-1"], "connects": 3})
    assert vm.connected and (vm.rtt_ms, vm.bytes_in, vm.bytes_out) == (0.5, 10, 20)
    assert (vm.source, vm.aliases, vm.raw["connects"]) == ("libvirt", ["uuid-1"], 3)


@pytest.mark.parametrize("doc", [{}, {"vmid": 3, "state": None, "ips": "1.2.3.4",
                                      "rtt_ms": "fast", "bytes_in": True, "aliases": [1, "a"]}])
def test_wrong_types_read_as_empty(doc: dict[str, object]) -> None:
    vm = VMStatus.from_json(doc)
    assert (vm.vmid, vm.state, vm.ips, vm.rtt_ms, vm.bytes_in) == ("", "", [], None, 0)
    assert not vm.connected
    assert vm.aliases in ([], ["a"])


def test_status_skips_what_is_not_a_record() -> None:
    st = Status.from_json({"role": "host", "name": "h", "version": "0.2.0", "pid": 9,
                           "vms": [{"vmid": "vm1", "state": "backoff"}, "junk", 7],
                           "workers": "none", "programs": [{"name": "mux"}]})
    assert [vm.vmid for vm in st.vms] == ["vm1"] and st.workers == []
    assert st.vm("vm1").state == "backoff"
    with pytest.raises(KeyError):
        st.vm("vm2")


def test_requests_and_signals() -> None:
    assert argv_of("echo hi") == ["/bin/sh", "-c", "echo hi"]
    assert argv_of(("ls", 1)) == ["ls", "1"]  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        argv_of([])
    assert ExecRequest(["true"]).body() == {"argv": ["true"]}
    assert ExecRequest(["cat"], stdin=True, timeout=3).body() == {
        "argv": ["cat"], "stdin": True, "timeout": 3}
    assert signal_name("int") == signal_name("SIGINT") == signal_name(2) == "INT"
    with pytest.raises(ValueError, match="cannot be forwarded"):
        signal_name("SEGV")
