"""End-to-end fixtures: the lab (simulated VMs in network namespaces; root only).

``lab_up``  (session) the lab with at least vm1 and vm2: namespaces, links, configs and
            supervisords. It does not wait for the programs: use it to test the lab itself.
``lab``     (session) ``lab_up``, and the host's ``vmbusifyctl status --json`` shows vm1
            and vm2 "connected" (within 60 s). Use it to test VMBusify across the tunnel.

Both yield a ``LabHandle``. Test sessions that use the lab take turns (a lock in /run/lock).
A lab already up is reused and left up; a lab the session brought
up (or repaired from a half-up state) is brought down when the session ends. Tests using
either fixture are marked ``lab`` (tests/conftest.py), so they are skipped without root.

Tests here must send packets only to loopback and the lab's own namespaces, and never resolve
names through the machine's real DNS (inside the lab, /etc/hosts and resolv.conf are the lab's).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmbusify.lab.layout import INSTANCE
from vmbusify.lab.testing import LAB_VMS, LabHandle, lab_status, vmbusify

#: Held for a whole session that uses the lab, so two test sessions on one machine (two
#: checkouts, or a developer and CI) take turns instead of taking the lab down under each other.
SESSION_LOCK = Path(f"/run/lock/vmbusify-lab-tests{'-' + INSTANCE if INSTANCE else ''}.lock")
SESSION_LOCK_WAIT = 900.0


@pytest.fixture(scope="session")
def _lab_session_lock() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    SESSION_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(SESSION_LOCK, "a") as fh:
        deadline = time.monotonic() + SESSION_LOCK_WAIT
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    pytest.fail(f"another test session held {SESSION_LOCK} for "
                                f"{SESSION_LOCK_WAIT:g} s", pytrace=False)
                time.sleep(1.0)
        yield


@pytest.fixture(scope="session")
def lab_up(_lab_session_lock: None) -> Iterator[LabHandle]:
    """The lab with at least ``LAB_VMS`` VMs, up (reused if it already was)."""
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
        lab_up.wait_connected([f"vm{k}" for k in range(1, LAB_VMS + 1)])
    except TimeoutError as exc:
        pytest.fail(str(exc), pytrace=False)
    return lab_up


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run test_lab.py last: its tests take the lab down and up again."""
    items.sort(key=lambda item: item.path.name == "test_lab.py")

