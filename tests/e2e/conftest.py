"""End-to-end fixtures: the lab (simulated VMs in network namespaces; root only).

``lab_up``  (session) the lab with at least vm1 and vm2: namespaces, links, configs and
            supervisords. It does not wait for the programs: use it to test the lab itself.
``lab``     (session) ``lab_up``, and the host's ``vmbusifyctl status --json`` shows vm1
            and vm2 "connected" (within 60 s). Use it to test VMBusify across the tunnel.

Both yield a ``LabHandle``. A lab already up is reused and left up; a lab the session brought
up (or repaired from a half-up state) is brought down when the session ends. Tests using
either fixture are marked ``lab`` (tests/conftest.py), so they are skipped without root.

Tests here must send packets only to loopback and the lab's own namespaces, and never resolve
names through the machine's real DNS (inside the lab, /etc/hosts and resolv.conf are the lab's).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from vmbusify.lab.testing import LAB_VMS, LabHandle, lab_status, vmbusify


@pytest.fixture(scope="session")
def lab_up() -> Iterator[LabHandle]:
    """The lab with at least ``LAB_VMS`` VMs, up (reused if it already was)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    before = lab_status()
    reuse = before["up"] and len(before["vms"]) >= LAB_VMS
    # Always run `up`: on a lab that is up it changes nothing, on a half-up one it repairs.
    vmbusify("lab", "-q", "up", *([] if reuse else ["--vms", str(LAB_VMS)]))
    handle = LabHandle(status=lab_status(), started=not reuse)
    assert handle.status["up"], handle.status
    try:
        yield handle
    finally:
        if handle.started:
            vmbusify("lab", "-q", "down", check=False)


@pytest.fixture(scope="session")
def lab(lab_up: LabHandle) -> LabHandle:
    """The lab with vm1 and vm2 connected to the host."""
    try:
        lab_up.wait_connected()
    except TimeoutError as exc:
        pytest.fail(str(exc), pytrace=False)
    return lab_up


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run test_lab.py last: its tests take the lab down and up again."""
    items.sort(key=lambda item: item.path.name == "test_lab.py")

