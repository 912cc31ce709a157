#!/usr/bin/env python3
"""Noisy neighbour on the tunnel: one VM floods its host's mux with tiny packages (PINGs and
one-way messages nobody routes, from a hand-written hostile guest), another VM's ping round
trip is measured beside its idle figure, for each read budget given.

    .venv/bin/python bench/flood.py [--pings 300] [BUDGET ...]   (default: 64 256 1000000000)

A budget of 1000000000 is the mux without one (every package of a read dispatched at once).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.flood_harness import flood_figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pings", type=int, default=300)
    ap.add_argument("budgets", type=int, nargs="*", default=[64, 256, 1_000_000_000])
    args = ap.parse_args()
    print(f"flood benchmark on {os.cpu_count()} cores, {args.pings} pings each")
    for budget in args.budgets:
        root = Path(tempfile.mkdtemp(prefix="vmbusify-flood-"))
        try:
            f = asyncio.run(flood_figures(root, budget, args.pings))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        vm2 = f.flooder
        print(f"  read_budget {budget}: vm1 ping idle median {f.idle_median:.3f} ms "
              f"(p90 {f.idle_p90:.3f}), while vm2 floods {f.busy_median:.3f} ms "
              f"(p90 {f.busy_p90:.3f}), {f.busy_median / f.idle_median:.1f}x; "
              f"vm2 dropped {sum(vm2.get('dropped', {}).values())}, read_yields "
              f"{vm2.get('read_yields')}, backlog_closes {vm2.get('backlog_closes')}")


if __name__ == "__main__":
    main()
