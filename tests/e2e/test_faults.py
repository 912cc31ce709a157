"""Faults on purpose, under load (root; the lab).

While an exec (vmbusifyexec from the host), a proxied download and a download over the
virtual subnet (both by curl inside vm1) run, each test breaks one thing:

* ``kill -9`` of each program (mux, control, exec, proxy, subnet) on the host and in vm1;
* ``kill -9`` of supervisord itself, on the host and in vm1 (its programs live on; the lab
  then plays systemd's ``Restart=on-failure`` by running ``vmbusify lab up``);
* a guest reboot: every process of vm1's stack killed at once, then the stack started again;
* a host stack restart: supervisord shut down cleanly, then started again.

Then it asserts, for each client, what a user sees: a client the fault does not concern
finishes with every byte right; one it does concern either finishes with every byte right
or fails with one clear line (``vmbusifyexec: ...`` exit 255, ``curl: (N) ...``), never a
traceback, never a silent truncation, never a hang (each client has a hard deadline).
Then that everything comes back by itself (programs RUNNING, both VMs connected, workers
registered, a fresh exec, proxy and subnet round trip), and that nothing leaked: no stray
process (nor the exec's background ``sleep``), no file descriptors beyond the baseline's
(with slack), no new run-directory file, TUN device or nftables rule.

Everything is taken from the lab's layout and configs, so any lab instance works.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from functools import partial
from pathlib import Path

import psutil
import pytest

from tests.e2e.mixed_load import (
    Client,
    Load,
    Outcome,
    SystemSnapshot,
    WebServer,
    leaks,
    nft_ruleset,
    running_load,
    tun_devices,
    wait_for,
    whole,
    workers_registered,
)
from vmbusify.config import load_config
from vmbusify.lab import netns as ip
from vmbusify.lab.stack import stack_for, stack_processes, supervisord_process
from vmbusify.lab.testing import LabHandle, vmbusify

VM = "vm1"
TARGETS = ["host", "vm1", "vm2"]
VMIDS = ["vm1", "vm2"]
#: Workers registered with each mux when all is well (the host's exec worker only waits).
WORKERS = {"host": {"control", "proxy", "subnet"}, VM: {"control", "exec", "proxy", "subnet"}}
#: Seconds after the load starts before the fault strikes (every client is mid-transfer).
STRIKE_AFTER = 2.0
#: Seconds everything has to come back.
RECOVERY = 60.0
FILE_SIZE = 96 << 20
ALL = frozenset(Client)
NONE: frozenset[Client] = frozenset()


class Kind(str, Enum):
    """What a fault does."""

    KILL = "kill -9"
    KILL_SUPERVISORD = "kill -9 supervisord"
    REBOOT_GUEST = "guest reboot"
    RESTART_HOST = "host stack restart"


@dataclass(frozen=True)
class Fault:
    """One way of breaking things, and which clients it may break."""

    kind: Kind
    target: str
    program: str = ""
    #: Clients allowed to fail (cleanly). All others must finish intact.
    affects: frozenset[Client] = NONE

    @property
    def id(self) -> str:
        return f"{self.target}-{self.program or self.kind.name.lower().replace('_', '-')}"


FAULTS = [
    # Both muxes carry everything: the tunnel drops, every stream of vm1 is reset.
    Fault(Kind.KILL, "host", "mux", ALL),
    Fault(Kind.KILL, VM, "mux", ALL),
    # The host's command listener carries vmbusifyexec's WebSocket; the guest's serves only
    # local vmbusifyctl. The host's exec worker only waits.
    Fault(Kind.KILL, "host", "control", frozenset({Client.EXEC})),
    Fault(Kind.KILL, VM, "control"),
    Fault(Kind.KILL, "host", "exec"),
    Fault(Kind.KILL, VM, "exec", frozenset({Client.EXEC})),
    Fault(Kind.KILL, "host", "proxy", frozenset({Client.PROXY})),
    Fault(Kind.KILL, VM, "proxy", frozenset({Client.PROXY})),
    Fault(Kind.KILL, "host", "subnet", frozenset({Client.SUBNET})),
    Fault(Kind.KILL, VM, "subnet", frozenset({Client.SUBNET})),
    # supervisord's programs outlive it: nothing the user runs notices.
    Fault(Kind.KILL_SUPERVISORD, "host"),
    Fault(Kind.KILL_SUPERVISORD, VM),
    Fault(Kind.REBOOT_GUEST, VM, affects=ALL),
    Fault(Kind.RESTART_HOST, "host", affects=ALL),
]

#: curl's one-line error: "curl: (56) Recv failure: Connection reset by peer".
CURL_ERROR = re.compile(r"^curl: \(\d+\) \S")


def clean_failure(o: Outcome) -> bool:
    """A failure a user can read: one line saying what went wrong, no traceback."""
    lines = [ln for ln in o.stderr.splitlines() if ln.strip()]
    if not lines or "Traceback" in o.stderr:
        return False
    if o.client is Client.EXEC:
        return o.returncode == 255 and len(lines) == 1 and lines[0].startswith("vmbusifyexec: ")
    # curl's own line; `sha256sum` of the partial output is on stdout, pipefail keeps curl's rc
    return CURL_ERROR.match(lines[-1]) is not None


#: Known limitation, not a pass: a host stack restart stops the subnet worker, which removes
#: its nftables table as a clean stop must; while no NAT chain exists the kernel stops
#: translating, so the server of an in-flight NAT'd download gets a RST from the host and the
#: VM's end waits on a dead connection (as behind any NAT router that restarts). New
#: connections work once the worker is back, which back_to_normal() checks. docs/subnet.md.
LOST_IN_FLIGHT = {(Kind.RESTART_HOST, Client.SUBNET)}


def judge(fault: Fault, outcomes: dict[Client, Outcome]) -> list[str]:
    """What went wrong for the user, as the fault's contract says; [] when all is right."""
    problems = []
    for client, o in outcomes.items():
        if o.hung and (fault.kind, client) in LOST_IN_FLIGHT:
            print(f"known limitation: {o.describe()}")
            continue
        if o.hung:
            problems.append(f"HUNG {o.describe()}")
        elif o.returncode == 0 and not o.intact:
            problems.append(f"SILENTLY TRUNCATED {o.describe()}")
        elif client not in fault.affects and not o.ok:
            problems.append(f"unconcerned client failed: {o.describe()}")
        elif client in fault.affects and not o.ok and not clean_failure(o):
            problems.append(f"unclear failure: {o.describe()}")
    return problems


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web(lab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    server = WebServer(lab, tmp_path_factory.mktemp("faults-www"), FILE_SIZE)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def baseline(lab: LabHandle, web: WebServer) -> SystemSnapshot:
    """The lab's state before any fault, once it is whole and every path works."""
    load = Load(lab, web, VM)
    back_to_normal(lab, load)
    return SystemSnapshot.take(lab, TARGETS)


@pytest.fixture(scope="module")
def log_marks(lab: LabHandle) -> dict[Path, int]:
    """Each program log's size before the faults: what they write after is judged."""
    marks = {}
    for target in TARGETS:
        for name in ("mux", "control", "exec", "proxy", "subnet"):
            log = stack_for(target, lab.layout).run_dir / f"{name}.log"
            marks[log] = log.stat().st_size if log.exists() else 0
    return marks


def back_to_normal(lab: LabHandle, load: Load, timeout: float = RECOVERY) -> float:
    """Wait until everything works again; seconds it took."""
    t0 = time.monotonic()
    wait_for(lambda: whole(lab, TARGETS, VMIDS), timeout, "programs RUNNING, VMs connected")
    for target, names in WORKERS.items():
        wait_for(partial(workers_registered, lab, target, names), timeout,
                 f"{sorted(names)} registered on {target}")
    for client in Client:
        wait_for(partial(round_trip_works, load, client), timeout,
                 f"a fresh {client.value} round trip", every=0.5)
    return time.monotonic() - t0


def round_trip_works(load: Load, client: Client) -> bool:
    """True if one short request of ``client``'s kind works; raises with what went wrong."""
    ok, why = load.round_trip(client)
    if not ok:
        raise AssertionError(why)
    return True


# --- faults ---------------------------------------------------------------------------------


def kill_program(lab: LabHandle, target: str, program: str) -> int:
    pid = lab.program_pid(target, program)
    assert pid, f"{program} is not running on {target}"
    os.kill(pid, signal.SIGKILL)
    return pid


def kill_supervisord(lab: LabHandle, target: str) -> int:
    proc = supervisord_process(stack_for(target, lab.layout))
    assert proc is not None, f"no supervisord on {target}"
    proc.kill()
    proc.wait(10)
    return proc.pid


def ours(pid: int, load: Load) -> bool:
    """Whether ``pid`` is one of the load's clients (they share the stacks' environment)."""
    try:
        return os.getsid(pid) in load.sessions()
    except OSError:
        return False


def reboot_kill(lab: LabHandle, vmid: str, load: Load) -> None:
    """What a VM's sudden power-off does to VMBusify: every process of its stack, and every
    program an exec started there, dies at once (the test's own clients are spared: they
    are the user watching)."""
    stack = stack_for(vmid, lab.layout)
    victims = {p.pid for p in stack_processes(stack)}
    for pid in ip.netns_pids(lab.layout.vm(vmid).netns):
        try:
            if "VMBUSIFY_EXEC_ID" in psutil.Process(pid).environ():
                victims.add(pid)
        except psutil.Error:
            pass
    victims = {pid for pid in victims if not ours(pid, load)}
    # Power-off is one instant: freeze every victim first, then kill them. Killed one by one,
    # a remote shell could outlive its child by a moment and print "Killed", which a relay
    # still alive would forward: output no real power-off lets through.
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in victims:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def stop_host(lab: LabHandle, load: Load) -> None:
    """``systemctl stop``: supervisord shuts its programs down in order and exits."""
    host = stack_for("host", lab.layout)
    sup = supervisord_process(host)
    assert sup is not None, "no supervisord on the host"
    lab.supervisorctl("host", "shutdown")
    sup.wait(60)
    left = [p.pid for p in stack_processes(host) if not ours(p.pid, load)]
    assert not left, f"processes left after the host stack stopped: {left}"
    subnet = load_config(lab.layout.host.config_path).subnet
    assert subnet.ifname not in tun_devices(None), "the host's TUN survived a clean stop"
    assert not nft_ruleset(subnet.table), "the host's nftables table survived a clean stop"


def strike(lab: LabHandle, fault: Fault, load: Load) -> None:
    """Break what ``fault`` says; returns once the damage is done (not repaired)."""
    if fault.kind is Kind.KILL:
        pid = kill_program(lab, fault.target, fault.program)
        # supervisord restarts it on its own: just see that it does (no hand lifted)
        wait_for(lambda: lab.program_pid(fault.target, fault.program) not in (None, pid),
                 RECOVERY, f"supervisord restarted {fault.target}'s {fault.program}")
    elif fault.kind is Kind.KILL_SUPERVISORD:
        kill_supervisord(lab, fault.target)
    elif fault.kind is Kind.REBOOT_GUEST:
        reboot_kill(lab, fault.target, load)
        time.sleep(1.0)  # powered off for a moment
        vmbusify("lab", "-q", "up")  # ... and booted: its supervisord starts the programs
    elif fault.kind is Kind.RESTART_HOST:
        stop_host(lab, load)
        vmbusify("lab", "-q", "up")  # started again (the lab's way; systemctl start for real)


def after_load(lab: LabHandle, fault: Fault) -> None:
    """What happens once the clients are done: systemd's part after supervisord died."""
    if fault.kind is Kind.KILL_SUPERVISORD:
        stack = stack_for(fault.target, lab.layout)
        # Its programs kept serving; systemd (Restart=on-failure) would start supervisord
        # again, which here is `lab up`: leftovers are stopped, a fresh stack starts.
        assert supervisord_process(stack) is None
        assert len(stack_processes(stack)) >= 5, "the orphaned programs should still run"
        vmbusify("lab", "-q", "up")


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.id)
def test_fault(lab: LabHandle, web: WebServer, baseline: SystemSnapshot,
               log_marks: dict[Path, int], fault: Fault) -> None:
    load = Load(lab, web, VM)
    with running_load(load):
        time.sleep(STRIKE_AFTER)
        strike(lab, fault, load)
        outcomes = load.finish()
    after_load(lab, fault)
    problems = judge(fault, outcomes)
    took = back_to_normal(lab, load)
    wait_for(lambda: not load.leftover_sleepers(), 10, "the exec's background sleep reaped")
    found: list[str] = []

    def nothing_leaked() -> bool:
        found[:] = leaks(baseline, SystemSnapshot.take(lab, TARGETS))
        return not found

    try:
        wait_for(nothing_leaked, 15, "no leak")
    except AssertionError:
        problems += [f"LEAK {x}" for x in found]
    print(f"{fault.id}: back in {took:.1f} s; " + "; ".join(
        f"{c.value} rc={o.returncode} {o.elapsed:.1f}s"
        + (f" {o.stderr.strip().splitlines()[-1][:90]!r}" if o.stderr.strip() else "")
        for c, o in outcomes.items()))
    assert not problems, "\n".join(problems)


def test_no_tracebacks_in_the_logs(lab: LabHandle, log_marks: dict[Path, int]) -> None:
    """Every fault above was logged as lines, never a traceback, by every program."""
    found = []
    for log, mark in log_marks.items():
        try:
            text = log.read_bytes()
        except FileNotFoundError:
            continue
        new = text[mark:] if len(text) >= mark else text  # rotated: all of it is new
        i = new.find(b"Traceback (most recent call last)")
        if i >= 0:
            found.append(f"{log}: {new[i:i + 1500].decode(errors='replace')}")
    assert not found, "\n\n".join(found)
