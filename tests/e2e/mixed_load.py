"""Mixed load on a lab VM, and the checks that a lab stack is whole and leaks nothing.

Used by the fault suite (test_faults.py) and the soak test (test_soak.py); imports no pytest.

Load (``Load.start``): three real clients at once, each with a hard deadline so none can hang
a test run:

  exec    ``vmbusifyexec VM -- sh -c 'ticks...'`` from the host: a line every 0.1 s for
          ``seconds``, and a background ``sleep`` holding its stdout (a would-be orphan);
  proxy   ``curl --socks5-hostname`` in the VM, through its proxy client, of a random file
          served in the external namespace, rate-limited so it lasts ``seconds``;
  subnet  the same download, straight to the external address over the virtual subnet.

Every byte is checked (sha256 of what curl wrote, the exact tick lines of the exec).

``StackSnapshot`` records what a stack is made of (supervisord and program pids, their open
fds, its run directory's files, the TUN devices and the nftables ruleset) so a test can
compare the state after a fault with the state before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import psutil

from vmbusify.config import load_config
from vmbusify.lab import netns as ip
from vmbusify.lab.access import command
from vmbusify.lab.layout import EXT_NAME, PREFIX, SUBNET_IF, SUBNET_TABLE
from vmbusify.lab.stack import stack_for, stack_processes, supervisord_process
from vmbusify.lab.testing import BIN, LabHandle, vm_states

#: The programs every stack runs (conf/programs/*.conf).
PROGRAMS = ("mux", "control", "exec", "proxy", "subnet")
#: A port of our own in the external namespace (the lab's web server has 80, other suites
#: use 8080 and 1808x).
WEB_PORT = 18180
#: How fast each download goes (bytes/s): slow enough that a fault lands mid-transfer.
RATE = 16 << 20
#: Seconds a client may take beyond its planned duration: curl's own limit (--max-time).
GRACE = 30.0
#: Seconds past that limit before the test kills a client and calls it hung. A client that
#: gives up by its own limit says so in one line (``curl: (28) Operation timed out``) and is
#: judged by what it said; only one still running this long after its limit hung. (With the
#: kill at the limit itself, the test, which starts its clock first, killed curl a moment
#: before curl's own timeout and called it hung. A guest reboot the host sees back only at
#: its 16 s reconnect leaves the subnet download's server retransmitting 25 s after the
#: loss: done at 31-33 s of the 36 on a loaded machine, and past them on a slower run.)
KILL_AFTER = 15.0


class Client(str, Enum):
    """The three kinds of traffic a user runs."""

    EXEC = "exec"
    PROXY = "proxy"
    SUBNET = "subnet"


def wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.3) -> Any:
    """Poll ``pred`` until it returns something true; AssertionError (with its last error or
    value) after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = pred()
        except Exception as exc:  # noqa: BLE001 (what is awaited may be restarting)
            result, last = None, repr(exc)
        else:
            last = result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s (last: {last!r:.600})")
        time.sleep(every)


# --- the external side ------------------------------------------------------------------------


@dataclass
class WebServer:
    """A threaded HTTP server in the external namespace serving one random file."""

    lab: LabHandle
    root: Path
    size: int
    proc: subprocess.Popen[bytes] | None = None
    sha256: str = ""

    @property
    def url_path(self) -> str:
        return "/big"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        blob = os.urandom(self.size)
        (self.root / "big").write_bytes(blob)
        (self.root / "small").write_bytes(b"ok\n")
        self.sha256 = hashlib.sha256(blob).hexdigest()
        ext = self.lab.layout.external
        self.proc = subprocess.Popen(
            ip.ns_argv(ext.netns, [sys.executable, "-m", "http.server", "--bind", ext.ip,
                                   "--directory", str(self.root), str(WEB_PORT)]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: subprocess.run(
            ip.ns_argv(ext.netns, ["curl", "-sS", "-o", "/dev/null", "--max-time", "2",
                                   f"http://{ext.ip}:{WEB_PORT}/small"]),
            capture_output=True, check=False).returncode == 0, 20, "the external web server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# --- clients ----------------------------------------------------------------------------------


def client_command(target: str, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """argv and environment of a user's command on ``target``: the machine's VMBusify config,
    but not the stack's run directory, by which the lab tells the stack's own processes (and
    kills them as leftovers when it restarts a stack)."""
    full, env = command(target, argv)
    env.pop("VMBUSIFY_RUN_DIR", None)
    return full, env


@dataclass
class Outcome:
    """How one client ended."""

    client: Client
    returncode: int | None
    stdout: str
    stderr: str
    elapsed: float
    #: Killed by us at its deadline, KILL_AFTER past its own limit: the user would have seen
    #: a hang.
    hung: bool
    #: The output is exactly what the client should have produced.
    intact: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.hung and self.intact

    def describe(self) -> str:
        return (f"{self.client.value}: rc={self.returncode} hung={self.hung} "
                f"intact={self.intact} {self.elapsed:.1f}s stderr={self.stderr.strip()[-400:]!r}"
                f" stdout={self.stdout.strip()[-200:]!r}")


@dataclass
class Running:
    client: Client
    proc: subprocess.Popen[str]
    started: float
    deadline: float
    check: Callable[[str], bool]


def exec_script(ticks: int, marker: str) -> str:
    """The exec's program: ``ticks`` numbered lines 0.1 s apart, with a background sleeper
    (``sleep <marker>``) holding stdout that the executor must reap."""
    return (f"sleep {marker} & i=0; while [ $i -lt {ticks} ]; do echo tick $i; "
            "i=$((i+1)); sleep 0.1; done")


def exec_intact(ticks: int) -> Callable[[str], bool]:
    want = "".join(f"tick {i}\n" for i in range(ticks))
    return lambda out: out == want


@dataclass
class Load:
    """The three clients against one VM (see the module docstring)."""

    lab: LabHandle
    web: WebServer
    vmid: str = "vm1"
    #: How long each client runs when nothing breaks.
    seconds: float = 6.0
    #: A random fraction for the exec's background ``sleep``: finds leftovers by cmdline.
    marker: str = field(default_factory=lambda: f"{600 + secrets.randbelow(300)}."
                        f"{secrets.randbelow(10**6):06d}")
    running: list[Running] = field(default_factory=list)

    def _curl(self, via_proxy: bool, path: str | None = None, rate: bool = True,
              max_time: float | None = None) -> list[str]:
        ext = self.lab.layout.external
        gp = load_config(self.lab.layout.vm(self.vmid).config_path).proxy.listen
        url = (f"http://{EXT_NAME}:{WEB_PORT}{path or self.web.url_path}" if via_proxy
               else f"http://{ext.ip}:{WEB_PORT}{path or self.web.url_path}")
        limit = max_time or self.seconds + GRACE
        opts = (f"--socks5-hostname {gp} " if via_proxy else "") + (
            f"--limit-rate {RATE} " if rate else "")
        script = f"set -o pipefail; curl -sS --max-time {limit:g} {opts}{url} | sha256sum"
        return ["bash", "-c", script]

    def start(self) -> None:
        """Start all three clients (returns at once)."""
        ticks = int(self.seconds * 10)
        size_ok = self.web.sha256
        specs: list[tuple[Client, list[str], str, Callable[[str], bool]]] = [
            (Client.EXEC, [str(BIN / "vmbusifyexec"), self.vmid, "--", "sh", "-c",
                           exec_script(ticks, self.marker)], "host", exec_intact(ticks)),
            (Client.PROXY, self._curl(True), self.vmid,
             lambda out: out.split()[:1] == [size_ok]),
            (Client.SUBNET, self._curl(False), self.vmid,
             lambda out: out.split()[:1] == [size_ok]),
        ]
        for client, argv, target, check in specs:
            full, env = client_command(target, argv)
            now = time.monotonic()
            proc = subprocess.Popen(full, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
            self.running.append(Running(client, proc, now,
                                        now + self.seconds + GRACE + KILL_AFTER, check))

    def finish(self) -> dict[Client, Outcome]:
        """Wait for every client (killing one past its deadline); their outcomes."""
        out: dict[Client, Outcome] = {}
        for r in self.running:
            hung = False
            try:
                stdout, stderr = r.proc.communicate(timeout=max(0.1, r.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                hung = True
                try:
                    os.killpg(r.proc.pid, 9)
                except ProcessLookupError:
                    pass
                stdout, stderr = r.proc.communicate()
            out[r.client] = Outcome(r.client, r.proc.returncode, stdout, stderr,
                                    time.monotonic() - r.started, hung,
                                    r.proc.returncode == 0 and r.check(stdout))
        self.running.clear()
        return out

    def sessions(self) -> set[int]:
        """Session ids of the running clients (each runs in a session of its own)."""
        return {r.proc.pid for r in self.running}

    def kill_all(self) -> None:
        """Stop whatever still runs (test teardown)."""
        for r in self.running:
            try:
                os.killpg(r.proc.pid, 9)
            except ProcessLookupError:
                pass
            r.proc.wait()
        self.running.clear()

    # -- one quick round trip of each kind (recovery checks) --

    def round_trip(self, client: Client, timeout: float = 20.0) -> tuple[bool, str]:
        """One short exec / proxied / subnet request; (worked, what went wrong)."""
        if client is Client.EXEC:
            argv, target, want = ([str(BIN / "vmbusifyexec"), self.vmid, "--", "echo", "ok"],
                                  "host", "ok\n")
        else:
            argv = self._curl(client is Client.PROXY, "/small", rate=False, max_time=timeout)
            target, want = self.vmid, hashlib.sha256(b"ok\n").hexdigest()
        full, env = client_command(target, argv)
        try:
            proc = subprocess.run(full, env=env, capture_output=True, text=True, check=False,
                                  timeout=timeout + 5, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False, f"{client.value}: no answer in {timeout + 5:g} s"
        worked = proc.returncode == 0 and proc.stdout.split()[:1] == want.split()
        return worked, f"{client.value}: rc={proc.returncode} {proc.stderr.strip()[-300:]}"

    def leftover_sleepers(self) -> list[int]:
        """Pids of the exec's background sleepers still alive (they must all be reaped)."""
        found = []
        for p in psutil.process_iter(["cmdline"]):
            if p.info["cmdline"] == ["sleep", self.marker]:
                found.append(p.pid)
        return found


@contextmanager
def running_load(load: Load) -> Iterator[Load]:
    """``load`` started; stopped (killed if need be) on the way out."""
    load.start()
    try:
        yield load
    finally:
        load.kill_all()


# --- the state of the stacks ------------------------------------------------------------------


def host_status(lab: LabHandle, target: str = "host") -> dict[str, Any]:
    return json.loads(lab.ctl("status", "--json", target=target, timeout=15).stdout)


def program_states(lab: LabHandle, target: str) -> dict[str, str]:
    """program -> supervisord state (RUNNING, STARTING, BACKOFF...) of ``target``."""
    out = lab.supervisorctl(target, "status")
    states = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            states[parts[0]] = parts[1]
    return states


def tun_devices(netns: str | None) -> list[str]:
    """Names of the TUN devices in ``netns`` (None: the root namespace)."""
    out = subprocess.run(ip.ns_argv(netns, ["ip", "-j", "-d", "link", "show", "type", "tun"]),
                         capture_output=True, text=True, check=False).stdout
    return sorted(d["ifname"] for d in json.loads(out or "[]"))


def nft_ruleset(table: str) -> list[str]:
    """The rules of ``inet table`` as text, one per rule (handles stripped); [] if absent."""
    proc = subprocess.run(["nft", "-j", "list", "table", "inet", table], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        return []
    rules = []
    for item in json.loads(proc.stdout)["nftables"]:
        if "rule" in item:
            rule = dict(item["rule"])
            rule.pop("handle", None)
            rules.append(json.dumps(rule, sort_keys=True))
    return sorted(rules)


def nft_tables() -> list[str]:
    proc = subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, text=True,
                          check=False)
    return sorted(f"{t['table']['family']} {t['table']['name']}"
                  for t in json.loads(proc.stdout or '{"nftables": []}')["nftables"]
                  if "table" in t)


@dataclass
class StackSnapshot:
    """What one stack is made of at one moment."""

    target: str
    supervisord: int | None
    #: program -> (pid, open fds)
    programs: dict[str, tuple[int, int]]
    #: pids of the stack's processes that are neither supervisord nor a program
    strays: list[int]
    #: files in its run directory, logs excepted
    run_files: list[str]
    tun: list[str]

    @staticmethod
    def take(lab: LabHandle, target: str) -> StackSnapshot:
        stack = stack_for(target, lab.layout)
        sup = supervisord_process(stack)
        programs: dict[str, tuple[int, int]] = {}
        for name in PROGRAMS:
            pid = lab.program_pid(target, name)
            if pid:
                try:
                    programs[name] = (pid, psutil.Process(pid).num_fds())
                except psutil.Error:
                    pass
        known = {p for p, _ in programs.values()} | ({sup.pid} if sup else set())
        strays = sorted(p.pid for p in stack_processes(stack) if p.pid not in known)
        run_files = sorted(p.name for p in stack.run_dir.iterdir()
                           if ".log" not in p.name) if stack.run_dir.is_dir() else []
        tun = tun_devices(stack.netns)
        if stack.netns is None:  # the root namespace: other labs' TUN devices are not ours
            tun = [t for t in tun if t.startswith(PREFIX) or t == SUBNET_IF]
        return StackSnapshot(target, sup.pid if sup else None, programs, strays, run_files, tun)


@dataclass
class SystemSnapshot:
    """Every stack of the lab, and the host's nftables."""

    stacks: dict[str, StackSnapshot]
    table_rules: list[str]
    tables: list[str]

    @staticmethod
    def take(lab: LabHandle, targets: list[str]) -> SystemSnapshot:
        table = load_config(lab.layout.host.config_path).subnet.table
        return SystemSnapshot({t: StackSnapshot.take(lab, t) for t in targets},
                              nft_ruleset(table), nft_tables())


#: Open fds a restarted program may have beyond the one it replaced (sockets being set up,
#: a pending client): anything more is a leak.
FD_SLACK = 12


def leaks(before: SystemSnapshot, after: SystemSnapshot) -> list[str]:
    """What ``after`` has that ``before`` did not: stray processes, extra fds, run files,
    TUN devices, nftables tables or rules. Empty when nothing leaked."""
    found = []
    for target, b in before.stacks.items():
        a = after.stacks[target]
        if a.supervisord is None:
            found.append(f"{target}: supervisord not running")
        if set(a.programs) != set(PROGRAMS):
            found.append(f"{target}: programs running {sorted(a.programs)}")
        if a.strays:
            found.append(f"{target}: stray processes {a.strays} "
                         f"{[_cmdline(p) for p in a.strays]}")
        for name, (pid, fds) in a.programs.items():
            base = b.programs.get(name, (0, fds))[1]
            if fds > base + FD_SLACK:
                found.append(f"{target} {name} (pid {pid}): {fds} open fds, {base} before")
        extra = sorted(set(a.run_files) - set(b.run_files))
        if extra:
            found.append(f"{target}: new files in its run directory {extra}")
        if a.tun != b.tun:
            found.append(f"{target}: TUN devices {a.tun}, {b.tun} before")
    if after.table_rules != before.table_rules:
        found.append(f"nftables: {len(after.table_rules)} rules in our table, "
                     f"{len(before.table_rules)} before (or they differ)")
    if after.tables != before.tables:
        new = set(after.tables) - set(before.tables)
        gone = set(before.tables) - set(after.tables)
        # Other engineers' labs add and remove their own tables: judge ours only.
        ours = [t for t in new | gone if t.split()[-1] == SUBNET_TABLE]
        if ours:
            found.append(f"nftables tables changed: new {sorted(new)}, gone {sorted(gone)}")
    return found


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())[:120]
    except psutil.Error:
        return "?"


def whole(lab: LabHandle, targets: list[str], vmids: list[str]) -> bool:
    """Every program of every target RUNNING and every VM connected."""
    for target in targets:
        states = program_states(lab, target)
        if any(states.get(p) != "RUNNING" for p in PROGRAMS):
            return False
    return all(vm_states(host_status(lab)).get(v) == "connected" for v in vmids)


def workers_registered(lab: LabHandle, target: str, want: set[str]) -> bool:
    """``want`` workers registered with ``target``'s mux, each with its current program pid."""
    doc = host_status(lab, target)
    workers = {w["name"]: w.get("pid") for w in doc.get("workers", [])}
    return all(name in workers and workers[name] == lab.program_pid(target, name)
               for name in want)
