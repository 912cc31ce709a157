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
5. the same two latencies without the interpreter's start: an exec of `true` from a client
   already running (one Python process looping over the client's Session): connect,
   upgrade, START through both muxes, the program's exit, STATUS. This is the part the
   listener, the tunnel and the executor make; the rest of `vmbusifyexec`'s time is a
   Python process starting.

The sshd is a throwaway: its own config, host key and user key in a temporary directory, on a
free loopback port; the machine's sshd and its configuration are never touched. By default
vm1 is the non-root harness (two muxes over a Unix socket, the real listener and executor);
``--lab`` uses the running lab's vm1 instead (root; honours VMBUSIFY_LAB_INSTANCE).
"""

from __future__ import annotations

import argparse
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

from tests.integration.exec_harness import EXEC, start_stack
from tests.integration.harness import free_port

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


def in_process_ms(env: dict[str, str], runs: int) -> float:
    """Median wall (ms) of an exec of `true` from a client that is already running."""
    out = subprocess.run([sys.executable, "-c", _IN_PROCESS, str(runs)], env=env, check=True,
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


def fairness(ex: list[str], env: dict[str, str], runs: int, rounds: int, own_session: bool
             ) -> Fairness:
    """`true` idle, then while another exec streams /dev/zero at full speed, in ``rounds``
    rounds, each with vmbusifyexec and from the running client (``in_process_ms``).

    Idle and busy are measured back to back in every round because this machine's speed
    drifts by 20-40 % over minutes: an idle figure from another minute would weigh more
    than the stream does.
    """
    per_round: list[tuple[float, ...]] = []
    for _ in range(rounds):
        idle = statistics.median(wall([*ex, "true"], env) for _ in range(runs)) * 1e3
        idle_rc = in_process_ms(env, runs)
        idle_start = statistics.median(wall(START_PROBE, env) for _ in range(runs)) * 1e3
        hog = subprocess.Popen([*ex, "cat", "/dev/zero"], env=env, stdout=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL, start_new_session=own_session)
        try:
            time.sleep(1.0)  # let it reach full speed
            busy = statistics.median(wall([*ex, "true"], env) for _ in range(runs)) * 1e3
            busy_rc = in_process_ms(env, runs)
            busy_start = statistics.median(wall(START_PROBE, env) for _ in range(runs)) * 1e3
        finally:
            hog.terminate()
            hog.wait(10)
            time.sleep(0.5)  # let the daemons drain what was in flight
        per_round.append((idle, busy, idle_rc, busy_rc, idle_start, busy_start))
    return Fairness(*(statistics.median(r[i] for r in per_round)
                      for i in range(len(Fairness._fields))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=40, help="latency samples of each (default 40)")
    ap.add_argument("--mib", type=int, default=1024, help="bytes to stream, MiB (default 1024)")
    ap.add_argument("--rounds", type=int, default=3, help="fairness rounds (default 3)")
    ap.add_argument("--lab", action="store_true", help="use the running lab's vm1")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vmbusify-bench-exec-"))
    stack = None
    sshd = LocalSshd(tmp)
    try:
        if args.lab:
            from vmbusify.lab.access import command
            env = command("host", ["true"])[1]
        else:
            stack = start_stack(tmp / "stack")
            env = stack.env
        sshd.start()
        ex = [EXEC, "vm1", "--"]
        ssh = sshd.argv()
        for _ in range(3):  # warm both up (page cache, first connections)
            wall([*ex, "true"], env)
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
        apart, together = (fairness(ex, env, n, args.rounds, own_session)
                           for own_session in (True, False))
    finally:
        sshd.stop()
        if stack is not None:
            stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    where = "the lab" if args.lab else "the harness"
    print(f"exec benchmark on {os.cpu_count()} cores, vm1 = {where}"
          f", load average {os.getloadavg()[0]:.1f}")
    print(f"  {'measure':<44} {'vmbusifyexec':>13} {'ssh':>10} {'ratio':>7}  goal")
    print(f"  {'`true`, median wall (ms), ' + str(args.runs) + ' runs each':<44} "
          f"{ex_ms:>13.1f} {ssh_ms:>10.1f} {ex_ms / ssh_ms:>7.2f}  <= 0.25")
    print(f"  {f'head -c {args.mib}M /dev/zero | wc -c (MB/s)':<44} "
          f"{ex_mbps:>13.0f} {ssh_mbps:>10.0f} {ex_mbps / ssh_mbps:>7.2f}  >= 300 MB/s")
    print(f"  fairness, {args.rounds} rounds of idle then beside a streaming exec "
          f"({n} runs each; medians):")
    print(f"  {'measure':<44} {'busy':>13} {'idle':>10} {'ratio':>7}  goal")
    rows = [("`true` while another exec streams (ms)", apart.busy, apart.idle,
             "<= 2.0 x idle"),
            ("  the same, stream from this session (ms)", together.busy, together.idle,
             "(shown, no goal)"),
            ("`true` from a running client (ms)", apart.busy_running_client,
             apart.idle_running_client, "(shown, no goal)"),
            ("the client's start alone, no request (ms)", apart.busy_start, apart.idle_start,
             "(shown, no goal)")]
    for label, busy, idle, goal in rows:
        print(f"  {label:<44} {busy:>13.1f} {idle:>10.1f} {busy / idle:>7.2f}  {goal}")


if __name__ == "__main__":
    main()
