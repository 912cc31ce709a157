"""The Python API (vmbusify.client) against the lab: the status of its VMs, an exec in a VM's
namespace, and a forward to a service on a VM's own loopback (docs/api.md)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.test_proxy_lab import NOBODY, PY, spawn
from vmbusify.client import Client
from vmbusify.errors import ControlError
from vmbusify.lab.testing import LabHandle

VM = "vm1"


def test_status_and_exec_in_the_lab(lab: LabHandle) -> None:
    client = Client(lab.layout.host.config_path)
    st = client.status()
    assert {"vm1", "vm2"} <= {vm.vmid for vm in st.vms if vm.connected}
    assert lab.layout.vm(VM).sdn_ip in st.vm(VM).ips
    assert st.vm(VM).source == "config"  # listed in the host's config, not discovered
    out = client.run(VM, ["ip", "-o", "-4", "addr", "show", "sdn0"], check=True).stdout
    assert f"inet {lab.layout.vm(VM).sdn_ip}/".encode() in out
    assert client.vmid_of(lab.layout.vm(VM).sdn_ip) == VM


def test_forward_reaches_a_service_on_the_vms_loopback(lab: LabHandle, tmp_path: Path) -> None:
    (tmp_path / "hello").write_text("forwarded by the API\n")
    svc = spawn(lab.layout.vm(VM).netns, [PY, "-m", "http.server", "--bind", "127.0.0.1",
                                          "--directory", str(tmp_path), "18093"],
                ("127.0.0.1", 18093))
    said: list[str] = []
    client = Client(lab.layout.host.config_path)
    try:
        with client.forward(VM, 18093, report=said.append) as fwd:
            assert fwd.port > 0
            for _ in range(2):  # two connections through one forward
                out = subprocess.run(["curl", "-sS", "--max-time", "10",
                                      f"http://127.0.0.1:{fwd.port}/hello"],
                                     capture_output=True, text=True, check=False)
                assert out.stdout == "forwarded by the API\n", out.stderr
            # Another local user is refused, and the refusal is reported once.
            out = subprocess.run([*NOBODY, "curl", "-sS", "--max-time", "10",
                                  f"http://127.0.0.1:{fwd.port}/hello"], capture_output=True,
                                 text=True, check=False)
            assert out.returncode != 0 and "forwarded" not in out.stdout
            assert len(said) == 1 and "refused a connection from uid 65534" in said[0], said
            # A connection still open when the forward stops is closed, not left behind.
            held = socket.create_connection(("127.0.0.1", fwd.port), timeout=10)
            held.sendall(b"GET /hello HTTP/1.1\r\n")  # half a request: the server waits
            time.sleep(0.5)
        with held:
            assert held.recv(100) == b""
        with socket.socket() as probe:  # closed: nothing listens there any more
            assert probe.connect_ex(("127.0.0.1", fwd.port)) != 0
    finally:
        svc.stop()


def test_forward_refuses_a_bad_port_at_once(lab: LabHandle) -> None:
    client = Client(lab.layout.host.config_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ControlError, match=f"cannot listen on 127.0.0.1:{port}"):
            client.forward(VM, 22, port=port)
