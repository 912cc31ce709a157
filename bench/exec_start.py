#!/usr/bin/env python3
"""Where `vmbusifyexec true`'s time goes: the client's start, beside ssh, in one run.

    .venv/bin/python bench/exec_start.py [--runs 30] [--lab]

Alternates `vmbusifyexec vm1 true` and `ssh` into a throwaway local sshd (bench/exec.py's),
median wall of each (goal: vmbusifyexec <= 0.10 x ssh) and the client's own CPU time, then
splits it: the remote part (the same exec from a client that is already running: connection,
listener, muxes, executor and back), the interpreter alone (``python -c pass``, and with
``-I -S``: no site, no .pth files), the client's start without a request (imports and reading
the configuration; CPU time, less noisy than wall on a loaded machine), and the imports that
cost most (``python -X importtime``, self time summed per top-level module).
The package's bytecode is compiled first, as an install does (with PYTHONDONTWRITEBYTECODE
set, an edited checkout would otherwise compile every changed module on every start).
By default vm1 is the non-root harness; ``--lab`` uses the running lab's vm1 (root).
"""

from __future__ import annotations

import argparse
import collections
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.exec import LocalSshd, exec_target, in_process_ms, wall
from tests.integration.exec_harness import EXEC

GOAL = 0.10
#: The client's start with no request: what vmbusifyexec imports and reads before it connects.
START = ("import vmbusify.cli.exec as e, vmbusify.control.verify; "
         "from vmbusify.config_file import listener_of; listener_of()")


def median_ms(argv: list[str], env: dict[str, str], runs: int) -> float:
    return statistics.median(wall(argv, env) for _ in range(runs)) * 1e3


def cpu_ms(argv: list[str], env: dict[str, str]) -> float:
    """CPU time (user + system, ms) of one run of ``argv``, output to /dev/null."""
    with open(os.devnull, "r+b") as null:
        proc = subprocess.Popen(argv, env=env, stdin=null, stdout=null)
        _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{argv} failed: {proc.returncode}")
    return (usage.ru_utime + usage.ru_stime) * 1e3


def median_cpu_ms(argv: list[str], env: dict[str, str], runs: int) -> float:
    return statistics.median(cpu_ms(argv, env) for _ in range(runs))


def import_costs(env: dict[str, str], runs: int = 9) -> list[tuple[str, float]]:
    """Self time of the client's imports (ms), summed per top-level package, most first: the
    median of ``runs`` runs (one run on a loaded machine is mostly other processes' noise)."""
    samples: collections.defaultdict[str, list[float]] = collections.defaultdict(list)
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", START], env=env,
                              capture_output=True, text=True, check=True)
        cost: collections.defaultdict[str, float] = collections.defaultdict(float)
        for line in proc.stderr.splitlines():
            parts = line.split("|")
            if len(parts) != 3 or not parts[0].startswith("import time:") or "self" in parts[0]:
                continue
            name = parts[2].strip()
            top = name if name.startswith("vmbusify") else name.split(".")[0]
            cost[top] += int(parts[0].split(":")[1]) / 1e3
        for name, ms in cost.items():
            samples[name].append(ms)
    medians = {name: statistics.median(v + [0.0] * (runs - len(v))) for name, v in samples.items()}
    return sorted(medians.items(), key=lambda kv: -kv[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--lab", action="store_true", help="use the running lab's vm1")
    args = ap.parse_args()
    compileall.compile_dir(str(Path(__file__).resolve().parents[1] / "vmbusify"), quiet=1)
    tmp = Path(tempfile.mkdtemp(prefix="vmbusify-bench-start-"))
    stack = None
    sshd = LocalSshd(tmp)
    try:
        stack, env = exec_target(args.lab, tmp)
        sshd.start()
        ex = [EXEC, "vm1", "--", "true"]
        ssh = sshd.argv("true")
        for _ in range(3):
            wall(ex, env)
            wall(ssh, env)
        t_ex, t_ssh = [], []
        for _ in range(args.runs):
            t_ex.append(wall(ex, env))
            t_ssh.append(wall(ssh, env))
        ex_ms, ssh_ms = statistics.median(t_ex) * 1e3, statistics.median(t_ssh) * 1e3
        ex_cpu = median_cpu_ms(ex, env, args.runs)
        remote, _p90 = in_process_ms(env, args.runs)
        py = [sys.executable]
        bare = median_cpu_ms([*py, "-c", "pass"], env, args.runs)
        isolated = median_cpu_ms([*py, "-I", "-S", "-c", "pass"], env, args.runs)
        start = median_cpu_ms([*py, "-c", START], env, args.runs)
        costs = import_costs(env)
    finally:
        sshd.stop()
        if stack is not None:
            stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"exec start benchmark on {os.cpu_count()} cores, vm1 = "
          f"{'the lab' if args.lab else 'the harness'}, load average {os.getloadavg()[0]:.1f}")
    print(f"  `vmbusifyexec vm1 true`, median wall: {ex_ms:.1f} ms; ssh {ssh_ms:.1f} ms; "
          f"ratio {ex_ms / ssh_ms:.3f} (goal <= {GOAL:.2f})")
    print(f"  its CPU time (user + system): {ex_cpu:.1f} ms; the same exec from a running "
          f"client (the remote part, wall): {remote:.1f} ms")
    print(f"  CPU time of python -c pass: {bare:.1f} ms; python -I -S -c pass: {isolated:.1f} ms")
    print(f"  CPU time of the client's start alone (imports, configuration; no request): "
          f"{start:.1f} ms")
    total = sum(c for _, c in costs)
    print(f"  its imports, self time by top-level module ({total:.1f} ms in all, "
          f"python -X importtime, medians of 9):")
    for name, ms in costs[:10]:
        print(f"    {name:<32} {ms:6.2f} ms")


if __name__ == "__main__":
    main()
