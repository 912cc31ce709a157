#!/usr/bin/env python3
"""Subnet benchmark: iperf3 from a lab VM to the external namespace through the virtual subnet,
side by side with two anchors: slirp4netns (what a user would pick instead: a user-space
network, in C) and a plain veth (what the kernel can do: the host to the same external
namespace).

slirp4netns is measured at its best: ``--mtu 65520`` (its largest) on a bare network namespace
this script creates, with no route out (only the tap's own /24) and IPv6 off, iperf3 inside it
to an iperf3 server on the host's 127.0.0.1, reached as slirp's gateway 10.0.2.2. Its DNS
(10.0.2.3) is disabled and its outbound sockets are bound to 127.0.0.1
(``--outbound-addr``), so nothing it does can leave the host's loopback. The namespace and
the process go away on every exit (an exception, Ctrl-C, SIGTERM).

Needs root and a running lab (``vmbusify lab up``; honours VMBUSIFY_LAB_INSTANCE). Rounds
alternate the three paths so all see the same machine load; prints every round, the medians in
Gbit/s and the ratios subnet/slirp4netns and subnet/veth, for VM -> external and (with -R)
external -> VM, and what each user-space network spent: CPU-seconds per GB moved of the
subnet's four processes (the VM's mux and subnet worker, the host's) and of slirp4netns.

Then what the goal asks of the subnet's CPU, path by path: with the machine's cores the bound
(the four processes and iperf3's ends share them), moving 1.5x slirp4netns's median takes
``cores / (1.5 x slirp's GB/s)`` CPU-seconds per GB in all, less what the rest of the machine
spends per GB on the subnet's path (iperf3's two ends, the kernel's forwarding and softirq
work outside the four processes: ``/proc/stat`` less the processes). That budget is printed
beside what the four processes spend, and beside their main threads' kernel time (the TUN
and tunnel reads and writes every byte must make, the forwarding, NAT and TCP work done
inside the TUN writes, the bus's own system calls): when the kernel time alone is over the
budget, no user-space work can reach the goal on this machine.

    .venv/bin/python bench/subnet.py [--seconds 5] [--rounds 3] [--vm vm1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmbusify.config import load_config
from vmbusify.lab import netns as ip
from vmbusify.lab.layout import PREFIX, LabLayout
from vmbusify.lab.stack import program_pid

#: The subnet's processes whose CPU is counted: (stack, program).
SUBNET_PROGRAMS = (("vm", "mux"), ("vm", "subnet"), ("host", "mux"), ("host", "subnet"))

PORT = 5201
#: The goal: subnet / slirp4netns.
GOAL = 1.5
#: slirp4netns's defaults: its network, the gateway that is the host's loopback, and an
#: address for the namespace's end of the tap.
SLIRP_GATEWAY = "10.0.2.2"
SLIRP_ADDR = "10.0.2.100/24"
SLIRP_MTU = 65520


def iperf(netns: str | None, server: str, seconds: int, reverse: bool,
          port: int = PORT) -> float:
    """Gbit/s received in one iperf3 run from ``netns`` (None: the host) to ``server``.

    A run the server turned away (still busy with the last one) is tried again.
    """
    argv = ["iperf3", "-c", server, "-p", str(port), "-t", str(seconds), "-J"]
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


class Usage(NamedTuple):
    """CPU-seconds so far: the counted processes' user and kernel time (all threads), their
    main threads' kernel time, the rest of the path's work (iperf3's two ends and the
    kernel's softirq threads: the machine is shared, so not all it did), and the whole
    machine's busy time (all cores, whoever used them)."""

    user: float
    sys: float
    main_sys: float
    rest: float
    machine: float

    def __sub__(self, other: object) -> Usage:
        assert isinstance(other, Usage)
        return Usage(*(a - b for a, b in zip(self, other, strict=True)))

    def per_gb(self, gb: float) -> Usage:
        return Usage(*(a / gb for a in self))


def _stat_times(path: str) -> tuple[int, int]:
    """(utime, stime) in clock ticks from a /proc stat file; (0, 0) if it is gone."""
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    return int(fields[11]), int(fields[12])


def softirq_threads() -> list[int]:
    """The pids of the kernel's ksoftirqd threads (packets they forward count as the path's)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().startswith("ksoftirqd/"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def usage(pids: list[int], rest: list[int]) -> Usage:
    """The CPU the processes ``pids``, the processes ``rest`` with this script's waited-for
    children (the iperf3 clients), and the machine used so far (see Usage)."""
    tick = os.sysconf("SC_CLK_TCK")
    user = sys_ = main_sys = other = 0
    for pid in pids:
        u, k = _stat_times(f"/proc/{pid}/stat")
        user, sys_ = user + u, sys_ + k
        main_sys += _stat_times(f"/proc/{pid}/task/{pid}/stat")[1]
    for pid in rest:
        other += sum(_stat_times(f"/proc/{pid}/stat"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(cpu[:8]) - cpu[3] - cpu[4]  # all but idle and iowait (guest time is in user)
    return Usage(user / tick, sys_ / tick, main_sys / tick,
                 other / tick + children.ru_utime + children.ru_stime, busy / tick)


class Budget(NamedTuple):
    """What GOAL x slirp4netns asks of the subnet's four processes on one path."""

    target_gbps: float
    rest: float
    budget: float
    spent: float
    kernel: float
    busy_cores: float

    def lines(self, label: str, cores: int) -> list[str]:
        head = (f"{label}: for {GOAL}x slirp4netns the subnet must move {self.target_gbps:.2f} "
                f"Gbit/s; on {cores} cores, with {self.rest:.2f} CPU-s/GB spent on its path "
                f"outside its processes (iperf3's ends, the kernel's forwarding), its four "
                f"processes may spend at most {self.budget:.2f} CPU-s/GB; they spend "
                f"{self.spent:.2f}, {self.kernel:.2f} of it kernel time in their main threads "
                f"(the machine, other work on it included, was {self.busy_cores:.1f} of {cores} "
                f"cores busy)")
        if self.budget <= self.kernel:
            verdict = (f"{label}: not reachable here: the kernel work alone ({self.kernel:.2f}) "
                       f"is over the budget ({self.budget:.2f}), before any user-space work")
        elif self.budget < self.spent:
            cut = self.spent - self.budget
            user = self.spent - self.kernel
            verdict = (f"{label}: needs {cut:.2f} CPU-s/GB less: {cut / user:.0%} of the "
                       f"{user:.2f} spent outside their main threads' kernel time")
        else:
            verdict = f"{label}: within the budget (the cores were not the bound)"
        return [head, verdict]


def budget_for(slirp_gbps: float, subnet: list[tuple[float, Usage, float]],
               cores: int) -> Budget:
    """GOAL x ``slirp_gbps`` as a CPU budget for the subnet, from its runs ``subnet``:
    (Gbit/s, Usage per GB, seconds) each; medians."""
    rest = statistics.median(u.rest for _, u, _ in subnet)
    target = GOAL * slirp_gbps
    budget = cores / (target / 8) - rest
    return Budget(target, rest, budget,
                  statistics.median(u.user + u.sys for _, u, _ in subnet),
                  statistics.median(u.main_sys for _, u, _ in subnet),
                  statistics.median(u.machine * g / 8 for g, u, _ in subnet))


def free_loopback_port() -> int:
    """A TCP port free on the host's 127.0.0.1 now (the machine is shared: not 5201)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class SlirpAnchor(NamedTuple):
    """What ``slirp_anchor`` made: the namespace, the server's port, the processes' ids."""

    netns: str
    port: int
    pids: list[int]


@contextlib.contextmanager
def slirp_anchor(name: str) -> Iterator[SlirpAnchor]:
    """A bare namespace ``name`` behind slirp4netns and an iperf3 server on the host's
    127.0.0.1 (slirp4netns and the server run in the host's namespace); removes all three on
    every exit."""
    if ip.netns_exists(name):  # left by a run killed with SIGKILL
        ip.delete_netns(name)
    port = free_loopback_port()
    procs: list[subprocess.Popen[bytes]] = []
    ip.run(["ip", "netns", "add", name])
    try:
        ip.run(["ip", "netns", "exec", name, "sysctl", "-q", "-w",
                "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])
        procs.append(subprocess.Popen(
            ["slirp4netns", "--mtu", str(SLIRP_MTU), "--disable-dns",
             "--outbound-addr=127.0.0.1", "--netns-type=path", f"/run/netns/{name}", "tap0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while not ip.link_exists("tap0", name):
            if procs[0].poll() is not None or time.monotonic() > deadline:
                raise SystemExit("slirp4netns did not create its tap (is it installed? "
                                 "bin/setup installs it)")
            time.sleep(0.05)
        # No --configure: that would add a default route. The tap's /24 is all it can reach.
        ip.run(["ip", "-n", name, "link", "set", "lo", "up"])
        ip.run(["ip", "-n", name, "link", "set", "tap0", "mtu", str(SLIRP_MTU), "up"])
        ip.run(["ip", "-n", name, "addr", "add", SLIRP_ADDR, "dev", "tap0"])
        procs.append(subprocess.Popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)
        yield SlirpAnchor(name, port, [p.pid for p in procs])
    finally:
        for proc in reversed(procs):
            _terminate(proc)
        ip.delete_netns(name)


def _sigterm_exits(signum: int, frame: object) -> None:
    raise SystemExit(f"bench/subnet.py: signal {signum}")


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
    signal.signal(signal.SIGTERM, _sigterm_exits)
    server = subprocess.Popen(ip.ns_argv(ext.netns, ["iperf3", "-s", "-B", ext.ip, "-p",
                                                     str(PORT)]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict[tuple[str, bool], list[float]] = {}
    cpu: dict[tuple[str, bool], list[float]] = {}
    runs: dict[bool, list[tuple[float, Usage, float]]] = {False: [], True: []}
    cores = os.cpu_count() or 1
    try:
        with slirp_anchor(f"{PREFIX}slirp") as (slirp_ns, slirp_port, slirp_pids):
            counted = {"subnet": subnet_pids(layout, args.vm), "slirp": slirp_pids[:1],
                       "veth": []}
            rest = [server.pid, *softirq_threads()]
            print(f"subnet benchmark on {cores} cores: iperf3 -t {args.seconds}, "
                  f"{args.rounds} rounds; subnet mtu {host.subnet.mtu}, offload "
                  f"{'on' if host.subnet.offload else 'off'}; slirp4netns mtu {SLIRP_MTU}; "
                  f"load {os.getloadavg()[0]:.1f}")
            paths = (("subnet", vm.netns, ext.ip, PORT, args.vm),
                     ("slirp", slirp_ns, SLIRP_GATEWAY, slirp_port, "slirp"),
                     ("veth", None, ext.ip, PORT, "host"))
            for r in range(args.rounds):
                for reverse in (False, True):
                    for path, netns, target, port, src in paths:
                        before = usage(counted[path], rest)
                        g = iperf(netns, target, args.seconds, reverse, port)
                        used = usage(counted[path], rest) - before
                        results.setdefault((path, reverse), []).append(g)
                        way = f"ext -> {src}" if reverse else f"{src} -> ext"
                        per_gb = ""
                        if counted[path] and g > 0:  # GB moved: Gbit/s x seconds / 8
                            each = used.per_gb(g * args.seconds / 8)
                            cpu.setdefault((path, reverse), []).append(each.user + each.sys)
                            per_gb = f", {cpu[(path, reverse)][-1]:5.2f} CPU-s/GB"
                            if path == "subnet":
                                runs[reverse].append((g, each, float(args.seconds)))
                                per_gb += (f" (kernel {each.sys:.2f}, main threads' kernel "
                                           f"{each.main_sys:.2f}; iperf3 and softirq "
                                           f"{each.rest:.2f}, machine {each.machine:.2f})")
                        print(f"  round {r + 1} {path:<6} {way:<13} {g:6.2f} Gbit/s{per_gb}")
    finally:
        _terminate(server)
    for reverse in (False, True):
        ours = statistics.median(results[("subnet", reverse)])
        slirp = statistics.median(results[("slirp", reverse)])
        base = statistics.median(results[("veth", reverse)])
        label = "external -> VM" if reverse else "VM -> external"
        print(f"{label}: subnet {ours:.2f} Gbit/s, slirp4netns {slirp:.2f} Gbit/s, "
              f"ratio {ours / slirp:.3f} (goal >= {GOAL}); plain veth {base:.2f} Gbit/s, "
              f"ratio {ours / base:.3f}")
        print(f"{label}: CPU-seconds per GB, subnet's four processes "
              f"{statistics.median(cpu[('subnet', reverse)]):.2f}, slirp4netns "
              f"{statistics.median(cpu[('slirp', reverse)]):.2f}")
        if runs[reverse]:
            for line in budget_for(slirp, runs[reverse], cores).lines(label, cores):
                print(line)


def subnet_pids(layout: LabLayout, vm: str) -> list[int]:
    """The pids of the subnet's four processes (SUBNET_PROGRAMS) in the lab, or SystemExit."""
    pids = []
    for stack, program in SUBNET_PROGRAMS:
        pid = program_pid(vm if stack == "vm" else "host", program)
        if pid is None:
            raise SystemExit(f"{stack} {program} is not running (is the lab up?)")
        pids.append(pid)
    return pids


if __name__ == "__main__":
    main()
