"""A host mux with two VMs: vm1 a real guest mux, vm2 a hostile guest that floods tiny
packages (tests/integration/flood_guest.py). Measures vm1's ping round trip through the
host mux while vm2 floods, beside the idle figure (test_mux_flood.py, bench/flood.py)."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tests.integration.harness import MuxProc, free_port, link_for, wait_state, write_config
from vmbusify.protocol.entities import Entity

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class FloodFigures:
    """Milliseconds of vm1's ping round trip, and what the host mux says about vm2."""

    idle_median: float
    idle_p90: float
    busy_median: float
    busy_p90: float
    pings: int
    flooder: dict[str, Any]
    host_cpu_s: float


def _p90(xs: list[float]) -> float:
    return sorted(xs)[int(len(xs) * 0.9) - 1]


async def flood_figures(root: Path, read_budget: int, pings: int = 200,
                        settle: float = 1.0) -> FloodFigures:
    """Start the three, ping vm1 ``pings`` times idle, start the flood, ping it again."""
    root.mkdir(parents=True, exist_ok=True)
    vm1_sock, vm2_sock, go = root / "vm1.sock", root / "vm2.sock", root / "flood.go"
    tun = "ping_interval = 1.0\ndead_after = 10.0\nbackoff_initial = 0.1\nbackoff_max = 1.0\n"
    guest_cfg = write_config(root / "guest.toml", (
        f'role = "guest"\nname = "guest1"\nrun_dir = "{root}/guest-run"\n'
        f'state_dir = "{root}/guest-state"\n[tunnel]\nlisten = "unix:{vm1_sock}"\n{tun}'
        f'[control]\nlisten = "127.0.0.1:{free_port()}"\n'))
    host_cfg = write_config(root / "host.toml", (
        f'role = "host"\nname = "host"\nrun_dir = "{root}/host-run"\n'
        f'state_dir = "{root}/host-state"\n[tunnel]\n{tun}'
        f'[host]\nkeep_connected = true\n'
        f'[limits]\nread_budget = {read_budget}\n'
        f'[[vms]]\nvmid = "vm1"\naddress = "unix:{vm1_sock}"\n'
        f'[[vms]]\nvmid = "vm2"\naddress = "unix:{vm2_sock}"\n'
        f'[control]\nlisten = "127.0.0.1:{free_port()}"\n'))
    guest = MuxProc("guest", guest_cfg, root / "guest.log")
    host = MuxProc("host", host_cfg, root / "host.log")
    flooder = subprocess.Popen(  # noqa: ASYNC220 - before the host, so its socket is there
        [sys.executable, "-m", "tests.integration.flood_guest", str(vm2_sock), str(go)],
        cwd=ROOT)
    try:
        for _ in range(100):
            if vm2_sock.exists():
                break
            await asyncio.sleep(0.02)
        guest.start()
        host.start()
        link = await link_for(host, "t-flood", [Entity.CMD_LISTENER])
        await wait_state(link, "vm1", "connected")
        await wait_state(link, "vm2", "connected")

        async def rtts(n: int) -> list[float]:
            out = []
            for _ in range(n):
                out.append((await link.control({"cmd": "ping", "vmid": "vm1"}))["rtt_ms"])
                await asyncio.sleep(0.002)
            return out

        await rtts(20)  # warm up
        idle = await rtts(pings)
        hproc = psutil.Process(host.pid)
        go.touch()
        await asyncio.sleep(settle)
        cpu0 = sum(hproc.cpu_times()[:2])
        t0 = time.monotonic()
        busy = await rtts(pings)
        cpu = (sum(hproc.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
        st = await link.control({"cmd": "status"})
        vm2 = next(v for v in st["vms"] if v["vmid"] == "vm2")
        await link.close()
        return FloodFigures(statistics.median(idle), _p90(idle), statistics.median(busy),
                            _p90(busy), pings, vm2, cpu)
    finally:
        flooder.kill()
        flooder.wait(10)
        for m in (host, guest):
            m.kill()
