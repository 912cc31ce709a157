#!/usr/bin/env python3
"""Scale benchmark: many lab VMs on one host (needs root).

Brings the lab up with N VMs (each a namespace with its own guest supervisord), waits for
all of them, then restarts the host's mux and measures how long until every VM is connected
again, and the host mux's resident memory with all of them connected.

    .venv/bin/python bench/scale.py [--vms 64] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmbusify.lab.testing import LabHandle, lab_status, vm_states, vmbusify

GOAL_CONNECT_S = 10.0
GOAL_RSS_MB = 150.0


def host_status(lab: LabHandle) -> dict[str, Any]:
    return json.loads(lab.ctl("status", "--json").stdout)


def wait_all(lab: LabHandle, vmids: list[str], timeout: float) -> float:
    """Seconds until every VM shows connected (polling the mux status)."""
    t0 = time.monotonic()
    while True:
        proc = lab.ctl("status", "--json", check=False)
        if proc.returncode == 0:
            states = vm_states(json.loads(proc.stdout))
            if all(states.get(v) == "connected" for v in vmids):
                return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"not all {len(vmids)} VMs connected within {timeout:g}s")
        time.sleep(0.1)


def scale_figures(vms: int) -> dict[str, float]:
    """Bring the lab to ``vms`` VMs and measure the host mux's reconnect time and memory."""
    t0 = time.monotonic()
    vmbusify("lab", "-q", "up", "--vms", str(vms), timeout=1800)
    lab = LabHandle(status=lab_status(), started=True)
    vmids = lab.vmids
    first = wait_all(lab, vmids, 600) + (time.monotonic() - t0)
    pid = lab.program_pid("host", "mux")
    assert pid
    t1 = time.monotonic()
    lab.supervisorctl("host", "restart", "mux")
    # wait for the new mux, then for every VM
    while lab.program_pid("host", "mux") in (None, pid):
        time.sleep(0.02)
    wait_all(lab, vmids, 300)
    reconnect = time.monotonic() - t1
    time.sleep(2)
    new_pid = lab.program_pid("host", "mux")
    assert new_pid
    rss = psutil.Process(new_pid).memory_info().rss / 1e6
    return {"vms": len(vmids), "lab_up_s": first, "reconnect_s": reconnect, "rss_mb": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=64)
    ap.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/scale.py needs root (network namespaces)")
    try:
        f = scale_figures(args.vms)
    finally:
        if not args.keep:
            vmbusify("lab", "-q", "down", check=False, timeout=1800)
    print(f"scale benchmark: {f['vms']:.0f} lab VMs on {os.cpu_count()} cores")
    print(f"  lab up until all connected (first start):      {f['lab_up_s']:.1f} s")
    print(f"  host mux restarted until all connected again:  {f['reconnect_s']:.1f} s "
          f"(goal <= {GOAL_CONNECT_S:g} s)")
    print(f"  host mux RSS with all connected:               {f['rss_mb']:.0f} MB "
          f"(goal <= {GOAL_RSS_MB:g} MB)")


if __name__ == "__main__":
    main()
