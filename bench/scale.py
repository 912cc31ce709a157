#!/usr/bin/env python3
"""Scale benchmark: many VMs on one host.

Two runs:

- ``--vms N`` (needs root): brings the lab up with N VMs (each a namespace with its own guest
  supervisord), waits for all of them, then restarts the host's mux and measures how long
  until every VM is connected again, and the host mux's resident memory with all of them
  connected.
- ``--fake 1000,4000``: one host mux, started by the shipped supervisord
  (``conf/supervisord.conf`` with the shipped ``programs/mux.conf`` alone, under the soft
  open-files limit a systemd service gets, 1024), keeps N idle VMs connected. The VMs are fake
  guests: one process (``bench/fakeguest.py``) serving all N on Unix sockets, each speaking
  the wire protocol as a guest mux does (HELLO, the shared-key AUTH, PING and PONG every
  ``ping_interval``; the largest size again with guests that ping every interval, as 0.1.0
  does). Measured: the mux's CPU (% of one core) and resident memory, per VM
  beside a mux with no VM (the anchor, same run), with the default ``[limits]`` on.

    .venv/bin/python bench/scale.py [--vms 64] [--keep]
    .venv/bin/python bench/scale.py --fake 1000,4000 [--window 30]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmbusify.lab.testing import LabHandle, lab_status, vm_states, vmbusify

GOAL_CONNECT_S = 10.0
GOAL_RSS_MB = 150.0
#: Goals of the fake-guest run (issue 18): idle VMs on one host mux.
GOAL_CPU_PCT = 5.0
GOAL_KB_PER_VM = 64.0
REPO = Path(__file__).resolve().parents[1]
#: The soft open-files limit systemd gives a service by default (DefaultLimitNOFILE=1024:...):
#: what supervisord starts with under packaging/vmbusify-host.service.
SERVICE_SOFT_NOFILE = 1024
#: Start a command with that soft limit (the shell execs it: same process).
AS_A_SERVICE = ["sh", "-c", f'ulimit -Sn {SERVICE_SOFT_NOFILE} && exec "$0" "$@"']


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


def _host_config(run: Path, n: int, key: Path) -> str:
    vms = "".join(f'[[vms]]\nvmid = "vm{k}"\naddress = "unix:{run}/g/{k}.sock"\n'
                  f'key_file = "{key}"\n\n' for k in range(n))
    return (f'role = "host"\nname = "scalehost"\nrun_dir = "{run}/run"\n'
            f'state_dir = "{run}/state"\n\n[host]\nkeep_connected = true\n\n'
            f'[control]\nlisten = "unix:{run}/control/control.sock"\n\n{vms}')



class MuxUnderSupervisord:
    """The shipped supervisord.conf with the shipped mux program alone, in a directory of its
    own (its socket, logs and the mux's ZeroMQ endpoints there), started as a service is."""

    def __init__(self, run: Path, n: int, key: Path) -> None:
        self.run = run
        conf = run / "conf"
        (conf / "programs").mkdir(parents=True)
        shutil.copy(REPO / "conf" / "supervisord.conf", conf / "supervisord.conf")
        shutil.copy(REPO / "conf" / "programs" / "mux.conf", conf / "programs" / "mux.conf")
        for d in ("run", "state", "control"):
            (run / d).mkdir(mode=0o700, exist_ok=True)
        (run / "vmbusify.toml").write_text(_host_config(run, n, key))
        self.conf = conf / "supervisord.conf"
        self.env = dict(os.environ, VMBUSIFY_CONFIG=str(run / "vmbusify.toml"),
                        VMBUSIFY_RUN_DIR=str(run / "run"),
                        VMBUSIFY_BIN=str(Path(sys.executable).parent))
        self.proc = subprocess.Popen(
            [*AS_A_SERVICE, str(Path(sys.executable).parent / "supervisord"), "-n", "-c",
             str(self.conf)],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def mux(self, timeout: float = 30) -> psutil.Process:
        """The running mux (a child of this supervisord)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for child in psutil.Process(self.proc.pid).children():
                if "mux" in " ".join(child.cmdline()):
                    return child
            if self.proc.poll() is not None:
                raise SystemExit(f"supervisord exited ({self.proc.returncode}); see "
                                 f"{self.run}/run/supervisord.log")
            time.sleep(0.05)
        raise SystemExit("the mux did not start under supervisord")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def fake_figures(n: int, window: float, settle: float,
                 always_ping: bool = False) -> dict[str, float]:
    """One host mux under the shipped supervisord holding ``n`` fake idle VMs: seconds until
    all are connected, then its CPU (% of one core) over ``window`` s and its RSS (MB)."""
    run = Path(tempfile.mkdtemp(prefix=f"vmbusify-scale{n}-", dir="/tmp"))
    key = run / "tunnel.key"
    key.write_bytes(os.urandom(32).hex().encode())
    key.chmod(0o600)
    (run / "g").mkdir()
    guests = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "fakeguest.py"), str(run / "g"), str(n),
         str(key), *(["--always-ping"] if always_ping else [])],
        stdout=subprocess.PIPE, text=True)
    sup: MuxUnderSupervisord | None = None
    try:
        assert guests.stdout is not None
        if n and guests.stdout.readline().strip() != "listening":
            raise SystemExit("the fake guests did not start")
        t0 = time.monotonic()
        sup = MuxUnderSupervisord(run, n, key)
        mux = sup.mux()
        connected = 0.0
        while n:
            line = guests.stdout.readline()
            if not line:
                raise SystemExit("the fake guests exited")
            if line.startswith("authenticated ") and int(line.split()[1]) >= n:
                connected = time.monotonic() - t0
                break
            if time.monotonic() - t0 > 600:
                raise SystemExit(f"not all {n} fake VMs connected within 600 s")
        # Keep reading the guests' lines so their pipe never fills.
        drain = subprocess.Popen(["cat"], stdin=guests.stdout, stdout=subprocess.DEVNULL)
        time.sleep(settle)
        c0, w0 = _cpu(mux), time.monotonic()
        time.sleep(window)
        cpu_pct = (_cpu(mux) - c0) / (time.monotonic() - w0) * 100
        mem = mux.memory_full_info()
        soft, _ = mux.rlimit(psutil.RLIMIT_NOFILE)
        fds = mux.num_fds()
        if guests.poll() is not None:
            raise SystemExit("the fake guests exited during the measurement")
        drain.terminate()
        return {"vms": n, "connect_s": connected, "cpu_pct": cpu_pct,
                "rss_mb": mem.rss / 1e6, "uss_mb": mem.uss / 1e6, "nofile": soft, "fds": fds}
    finally:
        if sup is not None:
            sup.stop()
        guests.terminate()
        guests.wait()
        shutil.rmtree(run, ignore_errors=True)


def fake_run(sizes: list[int], window: float, settle: float) -> None:
    """The fake-guest run at each size, beside a mux with no VM (the anchor), printed."""
    base = fake_figures(0, min(window, 10), 2)
    print(f"fake-guest scale: one host mux under the shipped supervisord (started with soft "
          f"RLIMIT_NOFILE {SERVICE_SOFT_NOFILE}), idle VMs, default [limits]; "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"  no VM (anchor): CPU {base['cpu_pct']:.2f} % of a core, RSS "
          f"{base['rss_mb']:.1f} MB, mux open-files limit {base['nofile']:.0f}", flush=True)
    runs = [(n, False) for n in sizes] + [(max(sizes), True)]
    for n, always in runs:
        f = fake_figures(n, window, settle, always)
        per_vm_kb = (f["rss_mb"] - base["rss_mb"]) * 1e3 / n
        who = " (guests of 0.1.0: ping every interval)" if always else ""
        print(f"  {n} VMs{who}: all connected in {f['connect_s']:.1f} s; CPU "
              f"{f['cpu_pct']:.2f} % of a core (goal <= {GOAL_CPU_PCT:g} %); RSS "
              f"{f['rss_mb']:.1f} MB, {per_vm_kb:.1f} KB per VM over the anchor "
              f"(goal <= {GOAL_KB_PER_VM:g} KB); {f['fds']:.0f} fds open, limit "
              f"{f['nofile']:.0f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=64)
    ap.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    ap.add_argument("--fake", default="", help="fake-guest run at these sizes (1000,4000)")
    ap.add_argument("--window", type=float, default=30.0, help="CPU measured over (s)")
    ap.add_argument("--settle", type=float, default=5.0, help="wait after connecting (s)")
    args = ap.parse_args()
    if args.fake:
        fake_run([int(x) for x in args.fake.split(",")], args.window, args.settle)
        return
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
