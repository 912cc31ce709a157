#!/usr/bin/env python3
"""Subnet benchmark: iperf3 from a lab VM to the external namespace through the virtual subnet,
side by side with iperf3 over a plain veth (the host to the same external namespace).

Needs root and a running lab (``vmbusify lab up``; honours VMBUSIFY_LAB_INSTANCE). Rounds
alternate the two paths so both see the same machine load; prints every round, the medians in
Gbit/s and the ratio subnet/veth, for VM -> external and (with -R) external -> VM.

    .venv/bin/python bench/subnet.py [--seconds 5] [--rounds 3] [--vm vm1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmbusify.config import load_config
from vmbusify.lab import netns as ip
from vmbusify.lab.layout import LabLayout

PORT = 5201


def iperf(netns: str | None, server: str, seconds: int, reverse: bool) -> float:
    """Gbit/s received in one iperf3 run from ``netns`` (None: the host) to ``server``.

    A run the server turned away (still busy with the last one) is tried again.
    """
    argv = ["iperf3", "-c", server, "-p", str(PORT), "-t", str(seconds), "-J"]
    error = ""
    for _ in range(3):
        proc = subprocess.run(ip.ns_argv(netns, argv + (["-R"] if reverse else [])),
                              capture_output=True, text=True, timeout=seconds + 60, check=False)
        doc: object = None
        try:
            doc = json.loads(proc.stdout)
            return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e9  # type: ignore[index]
        except (ValueError, KeyError, TypeError):
            error = str(doc.get("error") if isinstance(doc, dict) else proc.stderr)[:300]
            time.sleep(1)
    raise SystemExit(f"iperf3 failed three times: {error}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vm", default="vm1")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/subnet.py needs root and a running lab (vmbusify lab up)")
    layout = LabLayout()
    ext, vm = layout.external, layout.vm(args.vm)
    if not ip.netns_exists(vm.netns) or not ip.netns_exists(ext.netns):
        raise SystemExit(f"no lab at {layout.root}: run `vmbusify lab up` first")
    host = load_config(layout.host.config_path)
    subnet_dev = f"dev {load_config(vm.config_path).subnet.ifname}"
    deadline = time.monotonic() + 20  # a lab just brought up may still be attaching
    while subnet_dev not in ip.run(ip.ns_argv(vm.netns, ["ip", "route", "get", ext.ip]),
                                   check=False).stdout:
        if time.monotonic() > deadline:
            raise SystemExit(f"{args.vm} has no subnet route to {ext.ip} after 20 s "
                             "(is the subnet worker up?)")
        time.sleep(0.5)
    server = subprocess.Popen(ip.ns_argv(ext.netns, ["iperf3", "-s", "-B", ext.ip, "-p",
                                                     str(PORT)]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    results: dict[tuple[str, bool], list[float]] = {}
    try:
        print(f"subnet benchmark on {os.cpu_count()} cores: iperf3 -t {args.seconds}, "
              f"{args.rounds} rounds; subnet mtu {host.subnet.mtu}, offload "
              f"{'on' if host.subnet.offload else 'off'}; load {os.getloadavg()[0]:.1f}")
        for r in range(args.rounds):
            for reverse in (False, True):
                for path, netns in (("subnet", vm.netns), ("veth", None)):
                    g = iperf(netns, ext.ip, args.seconds, reverse)
                    results.setdefault((path, reverse), []).append(g)
                    src = args.vm if path == "subnet" else "host"
                    way = f"ext -> {src}" if reverse else f"{src} -> ext"
                    print(f"  round {r + 1} {path:<6} {way:<12} {g:6.2f} Gbit/s")
    finally:
        server.terminate()
        server.wait()
    for reverse in (False, True):
        ours = statistics.median(results[("subnet", reverse)])
        base = statistics.median(results[("veth", reverse)])
        label = "external -> VM" if reverse else "VM -> external"
        print(f"{label}: subnet {ours:.2f} Gbit/s, plain veth {base:.2f} Gbit/s, "
              f"ratio {ours / base:.3f}" + ("" if reverse else "  (goal >= 3 Gbit/s)"))


if __name__ == "__main__":
    main()
