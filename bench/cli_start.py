"""Start-up time of vmbusifyctl: the wall time of ``--help``/``--version`` and ``status``
(against a running command listener), and what ``import vmbusify.cli.ctl`` costs
(``python -X importtime``), for one or more checkouts in the same run, interleaved, each
beside the anchor ``python -c pass`` measured in the same run (docs/cli.md "Start-up time").

    VMBUSIFY_CONFIG=/run/vmbusify-lab/host/vmbusify.toml \\
        .venv/bin/python bench/cli_start.py [--runs 30] CHECKOUT [CHECKOUT...]

Each checkout's code is run with this Python (``PYTHONPATH=CHECKOUT``, from / so that the
current directory shadows nothing), so only the code
differs. Medians in milliseconds; "x anchor" is the median over the anchor's.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import time

MAIN = "import sys; from vmbusify.cli.ctl import main; sys.argv[0] = 'vmbusifyctl'; main()"


def wall(argv: list[str], env: dict[str, str]) -> float:
    """Seconds one run of ``argv`` takes (NaN if it fails: a release without the option)."""
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, check=False, stdout=subprocess.DEVNULL, cwd="/",
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start if done.returncode == 0 else float("nan")


def import_ms(env: dict[str, str]) -> tuple[float, bool, bool]:
    """(cumulative ms of importing vmbusify.cli.ctl, asyncio loaded, msgpack loaded)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import vmbusify.cli.ctl"],
                         env=env, check=True, capture_output=True, text=True,
                         cwd="/").stderr
    total = 0.0
    for line in out.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| vmbusify\.cli\.ctl$", line)
        if m:
            total = int(m.group(1)) / 1000
    names = {line.rsplit("|", 1)[-1].strip() for line in out.splitlines()}
    return total, "asyncio" in names, "msgpack" in names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs="+")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    envs = {c: {**os.environ, "PYTHONPATH": os.path.abspath(c)} for c in args.checkouts}
    cases = {"help": ["--help"], "version": ["--version"], "status": ["status"]}
    times: dict[tuple[str, str], list[float]] = {}
    anchor: list[float] = []
    imports: dict[str, list[float]] = {c: [] for c in args.checkouts}
    loaded: dict[str, tuple[bool, bool]] = {}
    for _ in range(args.runs):
        anchor.append(wall([sys.executable, "-c", "pass"], dict(os.environ)))
        for checkout, env in envs.items():
            for case, extra in cases.items():
                times.setdefault((checkout, case), []).append(
                    wall([sys.executable, "-c", MAIN, *extra], env))
            ms, asyncio_loaded, msgpack_loaded = import_ms(env)
            imports[checkout].append(ms)
            loaded[checkout] = (asyncio_loaded, msgpack_loaded)
    a = statistics.median(anchor) * 1000
    print(f"anchor: python -c pass  {a:.1f} ms (median of {args.runs})")
    print(f"{'checkout':<28} {'case':<10} {'ms':>7} {'x anchor':>9}")
    for checkout in args.checkouts:
        for case in cases:
            ms = statistics.median(times[(checkout, case)]) * 1000
            if math.isnan(ms):  # it failed
                print(f"{checkout:<28} {case:<10} {'n/a':>7}")
                continue
            print(f"{checkout:<28} {case:<10} {ms:7.1f} {ms / a:9.2f}")
        ms = statistics.median(imports[checkout])
        asyncio_loaded, msgpack_loaded = loaded[checkout]
        print(f"{checkout:<28} {'import':<10} {ms:7.1f} {'':>9}  (asyncio "
              f"{'loaded' if asyncio_loaded else 'not loaded'}, msgpack "
              f"{'loaded' if msgpack_loaded else 'not loaded'})")


if __name__ == "__main__":
    main()
