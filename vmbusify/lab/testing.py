"""Helpers for tests that drive the lab (used by tests/e2e; importable by any test).

``vmbusify(*args)`` runs this venv's CLI, ``lab_status()`` parses ``lab status --json``, and a
``LabHandle`` is what the e2e ``lab`` / ``lab_up`` fixtures yield: the lab's status and ways to
run commands on its machines; ``write_big_file`` and ``sha256_of`` make and check the files
copies move (tests/e2e and bench/files.py). Nothing here imports pytest.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmbusify.errors import LabError
from vmbusify.lab.access import run_on
from vmbusify.lab.layout import LabLayout
from vmbusify.lab.stack import program_pid, supervisorctl

#: The venv's bin directory (pytest runs from the venv).
BIN = Path(sys.executable).parent
LAB_VMS = 2
CONNECT_TIMEOUT = 60.0


def vmbusify(
    *args: str, check: bool = True, timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run the ``vmbusify`` CLI of this venv and capture its output."""
    proc = subprocess.run([str(BIN / "vmbusify"), *args], check=False, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise LabError(f"vmbusify {' '.join(args)} exited {proc.returncode}: "
                       f"{proc.stdout}{proc.stderr}".strip())
    return proc


def lab_status() -> dict[str, Any]:
    """``vmbusify lab status --json``, parsed."""
    return json.loads(vmbusify("lab", "status", "--json").stdout)


def vm_states(doc: Any) -> dict[str, str]:
    """vmid -> state from a ``vmbusifyctl status --json`` document.

    Finds the ``"vms"`` list of ``{"vmid", "state", ...}`` records wherever it is nested (the
    mux's status may sit under a key of the command listener's answer).
    """
    if isinstance(doc, dict):
        vms = doc.get("vms")
        if isinstance(vms, list) and all(isinstance(v, dict) and "vmid" in v for v in vms):
            return {str(v["vmid"]): str(v.get("state")) for v in vms}
        for value in doc.values():
            found = vm_states(value)
            if found:
                return found
    return {}


def sha256_of(path: Path) -> str:
    """The sha256 (hex) of a file, read a MiB at a time (a copy's check in tests and bench)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(1 << 20):
            digest.update(data)
    return digest.hexdigest()


def write_big_file(path: Path, size: int) -> None:
    """A file of ``size`` bytes (whole MiB) of random data, no two MiB blocks alike (a copy
    that swapped or repeated blocks would not pass a checksum), made at the speed of writing:
    one random MiB, each block stamped with its number."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.writelines(block[:16] + i.to_bytes(8, "big") + block[24:] for i in range(size >> 20))


@dataclass
class LabHandle:
    """The running lab, as a test sees it."""

    #: ``vmbusify lab status --json`` when the fixture set up.
    status: dict[str, Any]
    #: Whether this session brought the lab up (and so brings it down at the end).
    started: bool
    layout: LabLayout = field(default_factory=LabLayout)

    @property
    def vmids(self) -> list[str]:
        return [vm["vmid"] for vm in self.status["vms"]]

    def refresh(self) -> dict[str, Any]:
        """Read ``lab status --json`` again."""
        self.status = lab_status()
        return self.status

    def run_in_vm(
        self, vmid: str, argv: Sequence[str], *, check: bool = True,
        input: str | None = None, timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside VM ``vmid`` (its namespace and VMBusify environment)."""
        return run_on(vmid, argv, check=check, input=input, timeout=timeout)

    def run_on_host(self, argv: Sequence[str], *, check: bool = True, input: str | None = None,
                    timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on the host (root namespace, the host's VMBUSIFY_CONFIG)."""
        return run_on("host", argv, check=check, input=input, timeout=timeout)

    def ctl(self, *args: str, check: bool = True, timeout: float = 30.0,
            target: str = "host") -> subprocess.CompletedProcess[str]:
        """``vmbusifyctl ARGS`` on ``target`` (default the host)."""
        return run_on(target, [str(BIN / "vmbusifyctl"), *args], check=check, timeout=timeout)

    def supervisorctl(self, target: str, *args: str) -> str:
        """``supervisorctl ARGS`` for "host" or "vmK"; its output (exit status not checked)."""
        return supervisorctl(target, *args, check=False)

    def program_pid(self, target: str, program: str) -> int | None:
        """The pid of ``program`` ("mux", "control", ...) on ``target``, None if not running."""
        return program_pid(target, program)

    def wait_connected(self, vmids: Sequence[str] | None = None,
                       timeout: float = CONNECT_TIMEOUT) -> dict[str, Any]:
        """Poll the host's ``vmbusifyctl status --json`` until ``vmids`` (default: every lab
        VM) are "connected"; the last status document. TimeoutError after ``timeout``."""
        want = list(vmids or self.vmids)
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            proc = self.ctl("status", "--json", check=False)
            if proc.returncode == 0:
                try:
                    doc = json.loads(proc.stdout)
                except ValueError:
                    last = f"not JSON: {proc.stdout[:500]!r}"
                else:
                    states = vm_states(doc)
                    if all(states.get(v) == "connected" for v in want):
                        return doc
                    last = f"states {states}"
            else:
                last = f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-500:]}"
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{', '.join(want)} not connected after {timeout:g} s "
                                   f"(vmbusifyctl status --json: {last}); logs in "
                                   f"{self.layout.root}/*/run/")
            time.sleep(0.5)
