#!/usr/bin/env python3
"""vmbusifyexec benchmark, side by side with ssh into a local sshd, in one run.

    .venv/bin/python bench/exec.py [--runs 40] [--mib 1024] [--rounds 3] [--lab]

1. latency: `vmbusifyexec vm1 -- true` and `ssh -p PORT USER@127.0.0.1 true`, alternated, median
   wall time of each; goal: vmbusifyexec <= 0.25 x ssh.
2. streaming: `vmbusifyexec vm1 -- head -c 1G /dev/zero | wc -c` (and the same through ssh);
   goal: >= 300 MB/s.
3. fairness: `vmbusifyexec vm1 -- true` while another exec streams /dev/zero at full speed
   over the same tunnel; goal: <= 2 x its idle latency, measured just before in the same
   round (medians over 3 rounds: the machine's speed drifts over minutes). The streaming exec
   is started as from another terminal (its own session), which is how an operator meets
   this; the same figure with the stream started from the benchmark's own session is printed
   beside it.
   The two differ because Linux's autogroup scheduling (on by default) shares the CPU
   between sessions first: in one session the probe competes with the streaming client for
   that session's share. On a machine of two cores the stream keeps both busy, so either
   figure is mostly CPU sharing (see docs/exec.md).
4. the client's start alone: a Python process that imports the client and sends nothing,
   idle and beside the same stream, in the same rounds. On two cores the stream keeps both
   busy and any new process gets a share of a core; what this start loses beside the stream
   is the CPU sharing of this machine, not a wait on VMBusify's path.
5. the remote part, idle and beside the same stream: an exec of `true` from a client already
   running (one Python process looping over the client's Session, timed from just before it
   connects to the STATUS message): connect, upgrade, START through the listener, both
   muxes and the executor, the program's exit, EXIT back, STATUS. This is the part the
   listener, the bus, the tunnel and the executor make (goal: <= 2 x idle; the bus's two
   lanes are for it, docs/protocol.md "The bus: two lanes"); the rest of `vmbusifyexec`'s
   time is a Python process starting.
6. one bus hop alone (this process, no stack): a control message sent right behind a credit
   window of another stream's DATA, until the mux's end takes it, with two lanes and with
   one: the wait the lanes take away, without the CPU sharing of the whole path.
7. the machine alone, idle and beside the same stream, touching nothing of VMBusify: a
   Python loop of a few ms (CPU), and a token passed 40 times round a ring of 4 processes
   that each do ~0.1 ms of work per hop (40 wake-ups in turn, about what the remote part
   makes through the listener, two muxes and the executor). They show what the machine's
   CPU sharing does to any work beside the stream; when the remote part misses its goal,
   the benchmark says so with these figures beside it.

``--fairness-only`` skips 1 and 2 (no sshd). ``--ab`` (harness only) starts a second stack
whose workers run in one bus lane, as before the lanes (``VMBUSIFY_BUS_LANES=0``,
docs/protocol.md "The bus: two lanes"), and measures 3 to 6 on both in alternated rounds:
what the lanes do to the figures, on the same machine at the same minutes.

The sshd is a throwaway: its own config, host key and user key in a temporary directory, on a
free loopback port; the machine's sshd and its configuration are never touched. By default
vm1 is the non-root harness (two muxes over a Unix socket, the real listener and executor);
``--lab`` uses the running lab's vm1 instead (root; honours VMBUSIFY_LAB_INSTANCE).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.exec_harness import EXEC, ExecStack, start_stack
from tests.integration.harness import free_port
from vmbusify.bus.frames import BusKind, CtlRequest, Frames, Pkg
from vmbusify.bus.lanes import LaneReceiver, split_stamp
from vmbusify.bus.link import LANES_ENV
from vmbusify.bus.sockets import BusSocket, LanedDealer
from vmbusify.protocol.package import Package, PackageType
from vmbusify.protocol.window import INITIAL_WINDOW

SSHD = "/usr/sbin/sshd"


class LocalSshd:
    """An sshd on 127.0.0.1:PORT with throwaway keys, for the current user."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.user = getpass.getuser()
        self.key = root / "id_ed25519"
        self.proc: subprocess.Popen[bytes] | None = None
        self._made_privsep = False

    def start(self) -> None:
        for name in ("host_ed25519", "id_ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            str(self.root / name)], check=True)
        (self.root / "authorized_keys").write_text((self.root / "id_ed25519.pub").read_text())
        os.chmod(self.root / "authorized_keys", 0o600)
        config = self.root / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\n"
            f"HostKey {self.root / 'host_ed25519'}\nPidFile {self.root / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "StrictModes no\nPermitRootLogin prohibit-password\n")
        privsep = Path("/run/sshd")  # sshd refuses to start without it (Debian's path)
        if os.geteuid() == 0 and not privsep.exists():
            privsep.mkdir(mode=0o755)
            self._made_privsep = True
        with open(self.root / "sshd.log", "wb") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                                         stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"sshd did not start: {(self.root / 'sshd.log').read_text()}") from None
                time.sleep(0.05)

    def argv(self, *command: str) -> list[str]:
        return ["ssh", "-F", "/dev/null", "-p", str(self.port), "-i", str(self.key),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", f"{self.user}@127.0.0.1",
                *command]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self._made_privsep:
            shutil.rmtree("/run/sshd", ignore_errors=True)


def exec_target(lab: bool, tmp: Path) -> tuple[ExecStack | None, dict[str, str]]:
    """Where `vmbusifyexec vm1` goes: the running lab's host (``lab``), or a host and guest
    stack of its own started under ``tmp`` (returned, for the caller to stop); and the
    environment that points vmbusifyexec at it."""
    if lab:
        from vmbusify.lab.access import command
        return None, command("host", ["true"])[1]
    stack = start_stack(tmp / "stack")
    return stack, stack.env


def wall(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def stream_mbps(prefix: list[str], env: dict[str, str], nbytes: int) -> float:
    start = time.perf_counter()
    out = subprocess.run(
        ["sh", "-c", '"$@" | wc -c', "sh", *prefix, "head", "-c", str(nbytes), "/dev/zero"],
        env=env, check=True, capture_output=True, stdin=subprocess.DEVNULL).stdout
    elapsed = time.perf_counter() - start
    if int(out) != nbytes:
        raise SystemExit(f"stream lost bytes: {int(out)} of {nbytes}")
    return nbytes / elapsed / 1e6


#: Runs `true` through the client's Session N times in one process; prints each wall time.
_IN_PROCESS = """
import sys, time
from vmbusify.cli.exec import Session, parse_args
for _ in range(int(sys.argv[1])):
    t = time.perf_counter()
    assert Session(parse_args(["vm1", "true"])).run() == 0
    print((time.perf_counter() - t) * 1e3, flush=True)
"""


def in_process_ms(env: dict[str, str], runs: int) -> tuple[float, float]:
    """Median and 90th percentile wall (ms) of an exec of `true` from a client that is
    already running."""
    out = subprocess.run([sys.executable, "-c", _IN_PROCESS, str(runs)], env=env, check=True,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout
    samples = [float(x) for x in out.split()]
    return statistics.median(samples), statistics.quantiles(samples, n=10)[-1]


#: A Python loop of fixed work (about 5 ms on this machine idle), timed N times in one process.
_CPU_PROBE = """
import sys, time
for _ in range(int(sys.argv[1])):
    t = time.perf_counter()
    sum(i * i for i in range(60000))
    print((time.perf_counter() - t) * 1e3, flush=True)
"""


#: A token passed 10 times round a ring of 4 processes, each doing ~0.1 ms of Python work
#: per hop (40 wake-ups in turn, each followed by a little work: about what the remote part
#: does through the listener, two muxes and the executor, without any of them), timed N times.
_RING_PROBE = """
import os, signal, sys, time
N = 4
pipes = [os.pipe() for _ in range(N)]
def work():
    sum(i * i for i in range(3000))
children = []
for k in range(1, N):
    pid = os.fork()
    if pid == 0:
        r, w = pipes[k - 1][0], pipes[k][1]
        while os.read(r, 1):
            work()
            os.write(w, b"x")
        os._exit(0)
    children.append(pid)
r, w = pipes[N - 1][0], pipes[0][1]
for _ in range(int(sys.argv[1])):
    t = time.perf_counter()
    for _ in range(10):
        os.write(w, b"x")
        os.read(r, 1)
        work()
    print((time.perf_counter() - t) * 1e3, flush=True)
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
"""


def probe_ms(script: str, env: dict[str, str], runs: int) -> float:
    """Median wall (ms) of a probe that touches nothing of VMBusify (_CPU_PROBE,
    _RING_PROBE)."""
    out = subprocess.run([sys.executable, "-c", script, str(runs)], env=env, check=True,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout
    return statistics.median(float(x) for x in out.split())


#: The client's start without its request: the interpreter and the client's imports.
START_PROBE = [sys.executable, "-c", "import vmbusify.cli.exec"]


class Fairness(NamedTuple):
    """Medians (ms) over the rounds of each round's median: idle, then beside a stream."""

    idle: float
    busy: float
    idle_running_client: float
    busy_running_client: float
    idle_start: float
    busy_start: float
    idle_cpu: float
    busy_cpu: float
    idle_wake: float
    busy_wake: float
    idle_running_client_p90: float
    busy_running_client_p90: float
    #: Cores the listener, both muxes and the executor kept busy while the remote part was
    #: measured beside the stream (0: not known, --lab).
    busy_daemon_cores: float


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system, all threads) the processes ``pids`` used so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def fairness(ex: list[str], env: dict[str, str], runs: int, rounds: int, own_session: bool,
             daemons: list[int] | None = None) -> Fairness:
    """`true` idle, then while another exec streams /dev/zero at full speed, in ``rounds``
    rounds, each with vmbusifyexec and from the running client (``in_process_ms``).

    Idle and busy are measured back to back in every round because this machine's speed
    drifts by 20-40 % over minutes: an idle figure from another minute would weigh more
    than the stream does. ``daemons``: the pids of the listener, both muxes and the
    executor, whose CPU use (in cores) during the busy remote part is noted.
    """
    per_round: list[tuple[float, ...]] = []
    for _ in range(rounds):
        idle = statistics.median(wall([*ex, "true"], env) for _ in range(runs)) * 1e3
        idle_rc, idle_rc90 = in_process_ms(env, runs)
        idle_start = statistics.median(wall(START_PROBE, env) for _ in range(runs)) * 1e3
        idle_cpu = probe_ms(_CPU_PROBE, env, runs)
        idle_wake = probe_ms(_RING_PROBE, env, runs)
        hog = subprocess.Popen([*ex, "cat", "/dev/zero"], env=env, stdout=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL, start_new_session=own_session)
        try:
            time.sleep(1.0)  # let it reach full speed
            busy = statistics.median(wall([*ex, "true"], env) for _ in range(runs)) * 1e3
            cpu0, wall0 = cpu_seconds(daemons or []), time.perf_counter()
            busy_rc, busy_rc90 = in_process_ms(env, runs)
            cores = (cpu_seconds(daemons or []) - cpu0) / (time.perf_counter() - wall0)
            busy_start = statistics.median(wall(START_PROBE, env) for _ in range(runs)) * 1e3
            busy_cpu = probe_ms(_CPU_PROBE, env, runs)
            busy_wake = probe_ms(_RING_PROBE, env, runs)
            if hog.poll() is not None:
                raise SystemExit("the streaming exec ended early: no busy figures")
        finally:
            hog.terminate()
            hog.wait(10)
            time.sleep(0.5)  # let the daemons drain what was in flight
        per_round.append((idle, busy, idle_rc, busy_rc, idle_start, busy_start, idle_cpu,
                          busy_cpu, idle_wake, busy_wake, idle_rc90, busy_rc90, cores))
    return Fairness(*(statistics.median(r[i] for r in per_round)
                      for i in range(len(Fairness._fields))))


async def _hop_ms(endpoint: str, lanes: bool, samples: int) -> list[float]:
    """One bus hop alone, in this process: a worker's end (LanedDealer) hands ZeroMQ a credit
    window of one stream's DATA (1 MiB packages) and then a control message; the mux's end
    (a ROUTER, taking what arrives in the lanes' order as the mux does) notes when the control
    message is taken. Returns the milliseconds from its send to its taking, per sample."""
    taken: asyncio.Queue[tuple[bool, float]] = asyncio.Queue()
    rx: LaneReceiver[Frames] = LaneReceiver()

    def on_router(frames: Frames) -> None:
        stamp, rest = split_stamp(frames[1:])
        rx.push(stamp, rest)
        while (msg := rx.pop()) is not None:
            if bytes(msg[0]) == BusKind.CTL.value:
                taken.put_nowait((True, time.perf_counter()))
            elif bytes(msg[0]) == BusKind.PKG.value and len(msg[3]) < 1 << 20:
                taken.put_nowait((False, 0.0))  # the window's last package

    router = BusSocket.router(endpoint, on_router)
    dealer = LanedDealer(endpoint, "hop", lambda lane, frames: None, lanes=lanes)
    chunk = b"\0" * (1 << 20)
    out = []
    try:
        await asyncio.sleep(0.3)  # both connections up
        for _ in range(samples):
            for i in range(INITIAL_WINDOW >> 20):
                payload = chunk if i < (INITIAL_WINDOW >> 20) - 1 else chunk[:-1]
                dealer.send_message(Pkg.of("vm1", Package(
                    type=PackageType.DATA, entity=9, message_id=1, stream=1, payload=payload)))
            start = time.perf_counter()
            dealer.send_message(CtlRequest(b"1", "status"))
            got: dict[bool, float] = {}
            while len(got) < 2:
                kind, when = await asyncio.wait_for(taken.get(), 30)
                got[kind] = when
            out.append((got[True] - start) * 1e3)
    finally:
        dealer.close()
        router.close()
    return out


def hop(tmp: Path, rounds: int, samples: int = 10) -> dict[str, tuple[float, float]]:
    """``_hop_ms`` with two lanes and with one, alternated: median and 90th percentile."""
    got: dict[str, list[float]] = {"two lanes": [], "one lane": []}
    for r in range(rounds):
        for name in (list(got) if r % 2 == 0 else list(reversed(got))):
            endpoint = f"ipc://{tmp}/hop/{name.replace(' ', '-')}-{r}.sock"
            got[name] += asyncio.run(_hop_ms(endpoint, name == "two lanes", samples))
    return {name: (statistics.median(v), statistics.quantiles(v, n=10)[-1])
            for name, v in got.items()}


def medians(results: list[Fairness]) -> Fairness:
    """Each field's median over ``results`` (rounds)."""
    return Fairness(*(statistics.median(r[i] for r in results)
                      for i in range(len(Fairness._fields))))


def ab(envs: dict[str, dict[str, str]], ex: list[str], runs: int, rounds: int
       ) -> dict[str, Fairness]:
    """``fairness`` (stream from its own session) on each stack, one round each in turn,
    the order swapped every round; medians over the rounds."""
    per: dict[str, list[Fairness]] = {name: [] for name in envs}
    for r in range(rounds):
        for name in (list(envs) if r % 2 == 0 else list(reversed(envs))):
            per[name].append(fairness(ex, envs[name], runs, 1, own_session=True))
    return {name: medians(results) for name, results in per.items()}


def verdict(remote: Fairness) -> str:
    """One line on the remote part's goal; when missed, the machine's evidence beside it."""
    ratio = remote.busy_running_client / remote.idle_running_client
    cpu = remote.busy_cpu / remote.idle_cpu
    ring = remote.busy_wake / remote.idle_wake
    start = remote.busy_start / remote.idle_start
    if ratio <= 2.0:
        return (f"  remote part: {ratio:.2f} x idle beside the stream: goal (<= 2.0) met "
                f"(token round 4 fresh processes: {ring:.2f} x, CPU loop: {cpu:.2f} x)")
    cores = (f"the listener, both muxes and the executor, which carry the stream as well as "
             f"the exec, kept {remote.busy_daemon_cores:.2f} of the {os.cpu_count()} cores "
             f"busy while it was measured; " if remote.busy_daemon_cores else "")
    return (f"  remote part: {ratio:.2f} x idle beside the stream: goal (<= 2.0) NOT shown on "
            f"this machine ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}: "
            f"other work shares them). Evidence, same rounds: {cores}fresh processes touching "
            f"nothing of VMBusify took {ring:.2f} x their idle time for 40 wake-ups with work "
            f"(a token round 4), {cpu:.2f} x for a CPU loop, {start:.2f} x for the client's "
            f"start. The remote part is 40-odd wake-ups in turn of those busy daemons, each "
            f"waiting for a core; the bus's queues are measured apart (one bus hop, below)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=40, help="latency samples of each (default 40)")
    ap.add_argument("--mib", type=int, default=1024, help="bytes to stream, MiB (default 1024)")
    ap.add_argument("--rounds", type=int, default=3, help="fairness rounds (default 3)")
    ap.add_argument("--lab", action="store_true", help="use the running lab's vm1")
    ap.add_argument("--fairness-only", action="store_true",
                    help="only the figures idle and beside a stream (no sshd, no throughput)")
    ap.add_argument("--ab", action="store_true",
                    help="also a stack whose workers run in one bus lane, alternated rounds")
    args = ap.parse_args()
    if args.ab and args.lab:
        ap.error("--ab starts its own stacks: not with --lab")
    one_lane: ExecStack | None = None
    compared: dict[str, Fairness] = {}
    one_hop: dict[str, tuple[float, float]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="vmbusify-bench-exec-"))
    stack = None
    sshd = LocalSshd(tmp)
    ex_ms = ssh_ms = ex_mbps = ssh_mbps = 0.0
    try:
        stack, env = exec_target(args.lab, tmp)
        ex = [EXEC, "vm1", "--"]
        for _ in range(3):  # warm up (page cache, first connections)
            wall([*ex, "true"], env)
        if not args.fairness_only:
            sshd.start()
            ssh = sshd.argv()
            for _ in range(3):
                wall([*ssh, "true"], env)
            t_ex, t_ssh = [], []
            for _ in range(args.runs):
                t_ex.append(wall([*ex, "true"], env))
                t_ssh.append(wall([*ssh, "true"], env))
            ex_ms, ssh_ms = statistics.median(t_ex) * 1e3, statistics.median(t_ssh) * 1e3
            nbytes = args.mib << 20
            ex_mbps = stream_mbps(ex, env, nbytes)
            ssh_mbps = stream_mbps(ssh, env, nbytes)

        n = max(10, args.runs // 2)
        one_hop = hop(tmp, args.rounds)
        if args.ab:
            os.environ[LANES_ENV] = "0"
            try:
                one_lane = start_stack(tmp / "one-lane")
            finally:
                del os.environ[LANES_ENV]
            compared = ab({"two lanes": env, "one lane": one_lane.env}, ex, n, args.rounds)
        daemons = ([stack.control.pid, stack.worker.pid, stack.pair.host.pid,
                    stack.pair.guest.pid] if stack is not None else None)
        apart, together = (fairness(ex, env, n, args.rounds, own_session, daemons)
                           for own_session in (True, False))
    finally:
        sshd.stop()
        for s in (stack, one_lane):
            if s is not None:
                s.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    where = "the lab" if args.lab else "the harness"
    print(f"exec benchmark on {os.cpu_count()} cores, vm1 = {where}"
          f", load average {os.getloadavg()[0]:.1f}")
    if not args.fairness_only:
        print(f"  {'measure':<44} {'vmbusifyexec':>13} {'ssh':>10} {'ratio':>7}  goal")
        print(f"  {'`true`, median wall (ms), ' + str(args.runs) + ' runs each':<44} "
              f"{ex_ms:>13.1f} {ssh_ms:>10.1f} {ex_ms / ssh_ms:>7.2f}  <= 0.25")
        print(f"  {f'head -c {args.mib}M /dev/zero | wc -c (MB/s)':<44} "
              f"{ex_mbps:>13.0f} {ssh_mbps:>10.0f} {ex_mbps / ssh_mbps:>7.2f}  >= 300 MB/s")
    print(f"  fairness, {args.rounds} rounds of idle then beside a streaming exec "
          f"({n} runs each; medians):")
    print(f"  {'measure':<44} {'busy':>13} {'idle':>10} {'ratio':>7}  goal")
    rows = [("`true` from a running client (ms)", apart.busy_running_client,
             apart.idle_running_client, "<= 2.0 x idle (the remote part)"),
            ("  its 90th percentile (ms)", apart.busy_running_client_p90,
             apart.idle_running_client_p90, "(shown, no goal)"),
            ("`true` while another exec streams (ms)", apart.busy, apart.idle,
             "<= 2.0 x idle, as the client's start allows"),
            ("  the same, stream from this session (ms)", together.busy, together.idle,
             "(shown, no goal)"),
            ("  remote part, stream from this session (ms)", together.busy_running_client,
             together.idle_running_client, "(shown, no goal)"),
            ("the client's start alone, no request (ms)", apart.busy_start, apart.idle_start,
             "(shown, no goal)"),
            ("plain CPU work, a Python loop (ms)", apart.busy_cpu, apart.idle_cpu,
             "(shown: the machine's CPU sharing)"),
            ("a token round 4 processes, 40 hops (ms)", apart.busy_wake, apart.idle_wake,
             "(shown: 40 wake-ups with work)")]
    for label, busy, idle, goal in rows:
        print(f"  {label:<44} {busy:>13.1f} {idle:>10.1f} {busy / idle:>7.2f}  {goal}")
    print(verdict(apart))
    print(f"  one bus hop alone, {args.rounds} alternated rounds of 10: a control message sent "
          f"right behind a window ({INITIAL_WINDOW >> 20} MiB) of another stream's DATA, until "
          "the mux's end takes it:")
    for name, (median, p90) in one_hop.items():
        print(f"  {'  ' + name + ', median and p90 (ms)':<44} {median:>13.2f} {p90:>10.2f}")
    if compared:
        print(f"  A/B, {args.rounds} alternated rounds ({n} runs each; medians), stream from its "
              "own session:")
        print(f"  {'measure':<44} {'busy':>13} {'idle':>10} {'ratio':>7}")
        for name, f in compared.items():
            for label, busy, idle in (
                    (f"remote part, {name} (ms)", f.busy_running_client,
                     f.idle_running_client),
                    ("  its 90th percentile (ms)", f.busy_running_client_p90,
                     f.idle_running_client_p90),
                    (f"  `vmbusifyexec true`, {name} (ms)", f.busy, f.idle),
                    ("  the token round 4 processes, same rounds (ms)", f.busy_wake,
                     f.idle_wake)):
                print(f"  {label:<44} {busy:>13.1f} {idle:>10.1f} {busy / idle:>7.2f}")


if __name__ == "__main__":
    main()
