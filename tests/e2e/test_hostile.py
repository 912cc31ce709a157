"""Root in one VM is hostile (issue 12): attacks on the host over the wire, while another VM
is used.

vm1 is the hostile VM: its guest mux is stopped and ``HostilePeer`` (hostile_peer.py: the wire
protocol from docs/protocol.md with struct and msgpack, none of vmbusify's classes) takes its
tunnel socket. vm2 is the honest VM. During and after every attack vm2 must keep all three
services (checked as a user would: exit code and output, the bytes curl got):

  exec    ``vmbusifyexec vm2 -- echo MARKER`` on the host;
  proxy   ``curl --socks5-hostname`` inside vm2 through its proxy (so the host's proxy server)
          to the external namespace's web server;
  subnet  a plain ``curl`` inside vm2 to the same server, over the virtual subnet.

And every host program stays bounded. The bound asserted, per host program (mux, control,
exec, proxy, subnet; pids from supervisord, RSS from psutil, sampled every 0.2 s)::

    RSS <= 1.2 * (idle baseline + caps)
    caps = [limits] tunnel_backlog + 2 * [limits] buffered_per_vm

(the caps from the host's own config: the hostile VM's tunnel backlog and its buffered bytes,
and the honest VM's buffered bytes; 64 + 2 * 24 MiB with the defaults, so the idle baseline
plus 112 MiB plus 20 %). After the hostile VM is gone, what it made the host hold must be
given back: RSS <= 1.2 * baseline + 32 MiB (the heap glibc keeps for reuse,
vmbusify/runtime.py's trim threshold) within 20 s. So that a test against a host without the
caps cannot take the machine's memory, an attack stops at once when a program passes its
bound by 256 MiB (the test then fails on the bound).

The idle baseline is each program's RSS when first seen idle in this module (a program an
attack left bloated is restarted before the next test, and a restarted program is measured
anew). Each test restores vm1 (harness closed, its guest mux started, both VMs connected
again) whatever happens; every loop has a count and a deadline; the whole file takes about
three minutes.

The attacks (issue 12), one test each: (a) packages of the wrong type, direction or stream;
(b) PROXY-OPEN as a MESSAGE to a blackhole; (c) ~4 GiB of credit, never read; (d) 200
streams never read; (e) a control flood; (f) a HELLO claiming vm2's addresses; (g)
PROXY-OPEN to vm2, the host and disguised loopback; (h) control characters in guest text.
``test_harness_encodes_what_the_project_decodes`` (no lab) checks the harness itself.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import psutil
import pytest

from tests.e2e import hostile_peer as hp
from tests.e2e.hostile_peer import HostilePeer, open_ack
from tests.e2e.mixed_load import wait_for
from vmbusify.config import LimitsConfig, load_config
from vmbusify.errors import LabError
from vmbusify.lab import netns as ip
from vmbusify.lab.access import run_on
from vmbusify.lab.external import WEB_GREETING
from vmbusify.lab.layout import EXT_NAME, SUBNET_CIDR, SUBNET_CIDR6
from vmbusify.lab.stack import program_pid, supervisorctl
from vmbusify.lab.testing import BIN, LabHandle

HOSTILE, HONEST = "vm1", "vm2"
#: The host programs whose memory is watched.
PROGRAMS = ("mux", "control", "exec", "proxy", "subnet")
#: Ports of our own: in the external namespace a flood service and a blackhole (other suites
#: use 80, 8080, 1808x, 18180), in the honest VM a web server.
FLOOD_PORT, BLACKHOLE_PORT, HONEST_PORT = 18270, 18271, 18272
#: The guest's proxy (the guest config's default listen address, inside each VM).
GUEST_PROXY = "127.0.0.1:6542"
HONEST_PAGE = "served by the honest vm\n"
MiB = 1 << 20
#: Past its bound by this much, an attack is stopped at once (protects the shared machine).
ABORT_MARGIN = 256 * MiB
#: What glibc keeps on the heap for reuse after a burst (vmbusify/runtime.py).
KEPT_HEAP = 32 * MiB
#: A proxied or subnet curl of the greeting page from vm2 must take at most this long.
FAST = 2.0


# --- the bound --------------------------------------------------------------------------------


def caps(limits: LimitsConfig) -> int:
    """What the configured caps let one process hold for the hostile VM and the honest one."""
    return limits.tunnel_backlog + 2 * limits.buffered_per_vm


def rss_bound(baseline: int, limits: LimitsConfig) -> int:
    """The most a host program may hold during an attack (see the module docstring)."""
    return int(1.2 * (baseline + caps(limits)))


def given_back_bound(baseline: int) -> int:
    """The most a host program may keep once the hostile VM is gone."""
    return int(1.2 * baseline) + KEPT_HEAP


def host_pids() -> dict[str, int]:
    pids = {}
    for name in PROGRAMS:
        pid = program_pid("host", name)
        assert pid is not None, f"host program {name} is not running"
        pids[name] = pid
    return pids


def idle_baseline(env: Env, pids: dict[str, int]) -> dict[str, int]:
    """Each program's RSS when first seen idle in this module (so memory an earlier attack
    left behind does not raise the baseline of the next; a restarted program is new)."""
    now = rss_of(pids)
    return {name: env.baselines.setdefault(pid, now[name]) for name, pid in pids.items()}


def rss_of(pids: dict[str, int]) -> dict[str, int]:
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            out[name] = 0
    return out


def mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


class RssWatch:
    """Samples the host programs' RSS in a thread; ``over`` is set past bound + ABORT_MARGIN."""

    def __init__(self, env: Env) -> None:
        self.limits = env.limits
        self.pids = host_pids()
        self.baseline = idle_baseline(env, self.pids)
        self.bound = {n: rss_bound(b, self.limits) for n, b in self.baseline.items()}
        self.peak = dict(self.baseline)
        self.over = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-watch")

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        deadline = time.monotonic() + 600
        while not self._stop.wait(0.2) and time.monotonic() < deadline:
            for name, rss in rss_of(self.pids).items():
                self.peak[name] = max(self.peak[name], rss)
                if rss > self.bound[name] + ABORT_MARGIN:
                    self.over.set()

    def report(self) -> str:
        return "; ".join(f"{n} {mib(self.baseline[n])} -> peak {mib(self.peak[n])} "
                         f"(bound {mib(self.bound[n])})" for n in PROGRAMS)

    def check(self) -> None:
        """Assert every program stayed within its bound and was not restarted."""
        print(f"host RSS: {self.report()}")
        over = [n for n in PROGRAMS if self.peak[n] > self.bound[n]]
        assert not over, (f"host programs past their bound 1.2 * (idle baseline + "
                          f"{mib(caps(self.limits))} of caps): {', '.join(over)}: "
                          f"{self.report()}")
        now = host_pids()
        assert now == self.pids, f"host programs restarted during the attack: {self.pids} -> {now}"

    def check_given_back(self, timeout: float = 20.0) -> None:
        """Within ``timeout``, every program is back under given_back_bound(baseline)."""
        deadline = time.monotonic() + timeout
        while True:
            now = rss_of(self.pids)
            high = {n: r for n, r in now.items() if r > given_back_bound(self.baseline[n])}
            if not high or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        print("host RSS after the hostile VM left: " + "; ".join(
            f"{n} {mib(now[n])} (baseline {mib(self.baseline[n])})" for n in PROGRAMS))
        assert not high, (f"memory not given back within {timeout:g} s after the hostile VM "
                          "left (bound 1.2 * baseline + 32 MiB): " + "; ".join(
                              f"{n} {mib(r)}, baseline {mib(self.baseline[n])}"
                              for n, r in high.items()))


# --- the honest VM ------------------------------------------------------------------------------


@dataclass
class Check:
    kind: str
    ok: bool
    seconds: float
    detail: str = ""


def _timed(kind: str, argv: list[str], target: str, want: str, timeout: float = 20.0) -> Check:
    t0 = time.monotonic()
    try:
        proc = run_on(target, argv, check=False, timeout=timeout)
    except (subprocess.TimeoutExpired, LabError):
        return Check(kind, False, time.monotonic() - t0, f"no answer within {timeout:g} s")
    dt = time.monotonic() - t0
    if proc.returncode != 0 or proc.stdout != want:
        return Check(kind, False, dt, f"exit {proc.returncode}, stdout {proc.stdout[:200]!r}, "
                                      f"stderr {proc.stderr.strip()[-300:]!r}")
    return Check(kind, True, dt)


def honest_exec() -> Check:
    marker = f"honest-{secrets.token_hex(4)}"
    return _timed("exec", [str(BIN / "vmbusifyexec"), HONEST, "--", "echo", marker], "host",
                  marker + "\n")


def honest_proxy(lab: LabHandle) -> Check:
    return _timed("proxy", ["curl", "-sS", "--max-time", "10", "--socks5-hostname", GUEST_PROXY,
                            f"http://{EXT_NAME}/"], HONEST, WEB_GREETING)


def honest_subnet(lab: LabHandle) -> Check:
    return _timed("subnet", ["curl", "-sS", "--max-time", "10", f"http://{EXT_NAME}/"], HONEST,
                  WEB_GREETING)


def honest_round(lab: LabHandle) -> list[Check]:
    return [honest_exec(), honest_proxy(lab), honest_subnet(lab)]


def assert_honest(checks: list[Check], when: str) -> None:
    print(f"honest {HONEST} {when}: " + ", ".join(
        f"{c.kind} {'ok' if c.ok else 'FAILED'} {c.seconds:.2f}s" for c in checks))
    bad = [c for c in checks if not c.ok]
    assert not bad, f"{HONEST} lost a service {when}: " + "; ".join(
        f"{c.kind}: {c.detail}" for c in bad)
    slow = [c for c in checks if c.kind != "exec" and c.seconds > FAST]
    assert not slow, f"{HONEST}'s traffic slowed down {when} (goal {FAST:g} s): " + "; ".join(
        f"{c.kind} took {c.seconds:.1f} s" for c in slow)


class HonestLoad:
    """vm2 used (exec, proxy, subnet in turn) in a thread while an attack runs."""

    def __init__(self, lab: LabHandle, rounds: int = 20, deadline: float = 120.0) -> None:
        self.lab = lab
        self.rounds = rounds
        self.deadline = deadline
        self.checks: list[Check] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="honest-load")

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        end = time.monotonic() + self.deadline
        for _ in range(self.rounds):
            if self._stop.is_set() or time.monotonic() > end:
                return
            self.checks += honest_round(self.lab)
            self._stop.wait(0.3)


# --- the lab around the attacks ----------------------------------------------------------------


@dataclass
class Env:
    """What the attacks need to know about the lab."""

    lab: LabHandle
    limits: LimitsConfig
    ext_ip: str
    host_ext_ip: str
    honest_ips: list[str]
    hostile_path: Path
    log_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    #: pid -> RSS of each host program when first seen idle (see idle_baseline).
    baselines: dict[int, int] = field(default_factory=dict)


FLOOD_SERVER = r"""
import asyncio, sys
host, port, life = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
CHUNK = bytes(1 << 20)
async def serve(reader, writer):
    try:
        while True:
            writer.write(CHUNK)
            await writer.drain()
    except Exception:
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(serve, host, port, backlog=1024)
    async with server:
        await asyncio.sleep(life)
asyncio.run(main())
"""

BLACKHOLE_RULES = """table inet hostile {
  chain input { type filter hook input priority -10; policy accept; tcp dport %d drop; }
}
"""


def on_subnet(address: str) -> bool:
    """Whether ``address`` is on the lab's virtual subnet (IPv4 or IPv6)."""
    ip_ = ipaddress.ip_address(address)
    return any(ip_ in ipaddress.ip_network(n) for n in (SUBNET_CIDR, SUBNET_CIDR6))


def _status_ips(lab: LabHandle, vmid: str) -> list[str]:
    doc = json.loads(lab.ctl("status", "--json").stdout)
    for vm in doc.get("vms", []):
        if vm.get("vmid") == vmid:
            return [str(a) for a in vm.get("ips", [])]
    raise AssertionError(f"{vmid} not in the host's status")


def _port_answers(netns: str | None, url: str) -> bool:
    return subprocess.run(ip.ns_argv(netns, ["curl", "-sS", "-o", "/dev/null", "--max-time",
                                             "2", url]),
                          capture_output=True, check=False).returncode == 0


@pytest.fixture(scope="module")
def env(lab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """The lab, a flood service and a blackhole port in the external namespace, and a web
    server in the honest VM; all removed at the end."""
    layout = lab.layout
    ext = layout.external
    config = load_config(layout.host.config_path)
    honest_ips = wait_for(lambda: [a for a in _status_ips(lab, HONEST) if on_subnet(a)]
                          and _status_ips(lab, HONEST), 30, f"{HONEST}'s subnet address")
    e = Env(lab, config.limits, ext.ip, ext.host_ip, honest_ips, layout.vm(HOSTILE).tunnel_path,
            layout.host.run_dir)
    www = tmp_path_factory.mktemp("honest-www")
    (www / "index.html").write_text(HONEST_PAGE)
    try:
        e.procs.append(subprocess.Popen(
            ip.ns_argv(ext.netns, [sys.executable, "-c", FLOOD_SERVER, ext.ip, str(FLOOD_PORT),
                                   "900"]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        e.procs.append(subprocess.Popen(
            ip.ns_argv(layout.vm(HONEST).netns,
                       [sys.executable, "-m", "http.server", "--bind", "::", "--directory",
                        str(www), str(HONEST_PORT)]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        subprocess.run(ip.ns_argv(ext.netns, ["nft", "-f", "-"]), check=True,
                       input=(BLACKHOLE_RULES % BLACKHOLE_PORT).encode(), capture_output=True)
        wait_for(lambda: _port_answers(layout.vm(HONEST).netns,
                                       f"http://127.0.0.1:{HONEST_PORT}/"),
                 20, "the honest VM's web server")
        idle_baseline(e, host_pids())
        yield e
    finally:
        for p in e.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        subprocess.run(ip.ns_argv(ext.netns, ["nft", "delete", "table", "inet", "hostile"]),
                       check=False, capture_output=True)


def _mux(vmid: str, action: str) -> None:
    supervisorctl(vmid, action, "mux", check=False)


@contextlib.contextmanager
def hostile_vm(env: Env, *, ips: list[str] | None = None, hostname: str = HOSTILE,
               give_credit: bool = True, host_must_accept: bool = True
               ) -> Iterator[HostilePeer]:
    """vm1's guest mux stopped and a HostilePeer in its place, connected to the host (with
    ``host_must_accept`` False, the host may turn the HELLO down); at the end the harness
    closed, the mux started again and both VMs connected."""
    lab = env.lab
    peer = HostilePeer(env.hostile_path, ips=ips if ips is not None else [],
                       hostname=hostname, give_credit=give_credit,
                       key_file=env.lab.layout.vm(HOSTILE).key_path)
    try:
        _mux(HOSTILE, "stop")
        peer.listen()
        peer.wait_connected(30)
        if host_must_accept:
            lab.wait_connected([HOSTILE, HONEST], timeout=30)
        idle_baseline(env, host_pids())
        yield peer
        if peer.send_errors:
            print(f"the host hung up on {HOSTILE}: {peer.send_errors[:3]}")
    finally:
        peer.close()
        _mux(HOSTILE, "start")
        lab.wait_connected([HOSTILE, HONEST], timeout=60)
        repair_host(env)


def repair_host(env: Env) -> None:
    """If the attack left the host broken for the honest VM (a worker whose loop died, on a
    host without the fixes), restart the host's programs so the next test starts clean."""
    broken = [c.kind for c in honest_round(env.lab) if not c.ok]
    pids = host_pids()
    baseline = idle_baseline(env, pids)
    kept = [f"{n} {mib(r)}" for n, r in rss_of(pids).items()
            if r > given_back_bound(baseline[n])]
    if not broken and not kept:
        return
    print(f"the attack left {HONEST} without {broken} and the host holding {kept}: "
          "restarting the host's programs for the next test")
    supervisorctl("host", "restart", "all", check=False)
    env.lab.wait_connected([HOSTILE, HONEST], timeout=60)
    wait_for(lambda: all(c.ok for c in honest_round(env.lab)), 60,
             f"{HONEST}'s services after restarting the host's programs")


# --- the harness itself ---------------------------------------------------------------------


def test_harness_encodes_what_the_project_decodes() -> None:
    """The harness's own encoder (struct + msgpack) against the project's decoder: the same
    header fields and bodies come out, so a finding is about the host, not the harness."""
    from vmbusify.protocol.package import PackageDecoder, PackageFlag, PackageType
    from vmbusify.protocol.serialize import loads
    from vmbusify.protocol.tunnel import Hello

    wire = (hp.pack(hp.MESSAGE, hp.TUNNEL, hp.HELLO, hp.body({
                "role": "guest", "hostname": "h", "software_version": "0",
                "protocol_version": hp.VERSION, "ips": ["198.19.1.10"]}))
            + hp.pack(hp.REQUEST, hp.PROXY_CLIENT, hp.PROXY_OPEN,
                      hp.body({"host": "a", "port": 80, "cmd": 1}), pid=7, stream=9)
            + hp.pack(hp.WINDOW, hp.PROXY_CLIENT, hp.PROXY_DATA, hp.window(1 << 20), stream=9)
            + hp.pack(hp.DATA, hp.PROXY_CLIENT, hp.PROXY_DATA, b"bye", stream=9, flags=hp.RESET))
    decoder = PackageDecoder()
    decoder.receive_data(wire)
    hello, open_, credit, reset = decoder.packages()
    assert Hello.from_payload(hello.payload).ips == ["198.19.1.10"]
    assert (open_.type, open_.entity, open_.message_id, open_.id, open_.stream) == (
        PackageType.REQUEST, hp.PROXY_CLIENT, hp.PROXY_OPEN, 7, 9)
    assert loads(open_.payload) == {"host": "a", "port": 80, "cmd": 1}
    assert credit.type is PackageType.WINDOW and bytes(credit.payload) == (1 << 20).to_bytes(4)
    assert reset.flags is PackageFlag.RESET and bytes(reset.payload) == b"bye"


# --- a. wrong types, directions and streams -----------------------------------------------------


BODIES: list[bytes] = [
    hp.body({}), hp.body({"stream": 424242}), hp.body(None), hp.body([1, 2, 3]),
    hp.body("text"), b"\xc1", b"", hp.body({"argv": ["id"], "host": "x", "port": 1}),
]


def wrong_packages() -> list[bytes]:
    """Every application message id of every entity (and unknown ones) as MESSAGE and as
    REQUEST, with bodies of every shape; DATA and WINDOW on streams never opened; a guest
    sending as the host-only cmd-listener."""
    out: list[bytes] = []
    entities = [*hp.APPLICATION_MESSAGES, 6, 0xFFFF]
    for entity in entities:
        ids = sorted({*hp.APPLICATION_MESSAGES.get(entity, ()), 0, 7, 0xFFFF})
        for mid in ids:
            for payload in BODIES:
                for ptype in (hp.MESSAGE, hp.REQUEST):
                    out.append(hp.pack(ptype, entity, mid, payload, pid=len(out) + 1,
                                       stream=(len(out) % 3) and 900_000 + len(out)))
            for flags in (0, hp.EOF, hp.RESET):
                out.append(hp.pack(hp.DATA, entity, mid, b"z" * 1000, stream=800_000 + mid,
                                   flags=flags))
            out.append(hp.pack(hp.WINDOW, entity, mid, hp.window(1 << 30), stream=800_000 + mid))
    # the host-only entity, as a host would use it: start an exec on "the host's listener"
    out.append(hp.pack(hp.REQUEST, hp.CMD_LISTENER, hp.EXEC_START,
                       hp.body({"argv": ["id"], "side_stream": 0}), pid=10 ** 6, stream=77))
    out.append(hp.pack(hp.MESSAGE, hp.CMD_LISTENER, hp.EXEC_KILL, hp.body({}), stream=77))
    return out


@pytest.mark.lab
def test_wrong_types_directions_and_streams(env: Env) -> None:
    """The subnet's KEEPALIVE as a one-way MESSAGE (it killed the host subnet worker's receive
    loop), every other message id as MESSAGE and as REQUEST, DATA/WINDOW on streams never
    opened, the host-only cmd-listener: vm2 keeps exec, proxy and subnet; memory bounded."""
    with hostile_vm(env) as peer, RssWatch(env) as watch:
        assert_honest(honest_round(env.lab), "before the attack")
        with HonestLoad(env.lab, rounds=6, deadline=60) as load:
            peer.message(hp.IP_BEARER, hp.BEARER_KEEPALIVE, {"stream": 1})
            packages = wrong_packages()
            for i in range(0, len(packages), 50):
                peer.send(b"".join(packages[i:i + 50]))
                time.sleep(0.01)
            peer.message(hp.IP_BEARER, hp.BEARER_KEEPALIVE, {"stream": 1})
            time.sleep(8)
        print(f"sent {len(packages) + 2} wrong packages")
        assert_honest(load.checks, "during the attack")
        assert load.checks, "no honest check ran during the attack"
        assert_honest(honest_round(env.lab), "after the attack")
        watch.check()


# --- b. PROXY-OPEN as a MESSAGE, to a blackhole -------------------------------------------------


@pytest.mark.lab
def test_open_as_message_to_a_blackhole(env: Env) -> None:
    """PROXY-OPENs sent as one-way MESSAGEs (and as REQUESTs) to a port that never answers: the
    host's proxy must not stall for vm2 (it ran the connect inline, 0.04 s -> 14.8 s)."""
    with hostile_vm(env) as peer, RssWatch(env) as watch:
        quiet = [honest_proxy(env.lab) for _ in range(3)]
        assert_honest(quiet, "before the attack")
        target = {"host": env.ext_ip, "port": BLACKHOLE_PORT, "cmd": 1}
        for k in range(40):
            peer.message(hp.PROXY_CLIENT, hp.PROXY_OPEN, target, stream=1000 + k)
        for k in range(40):
            peer.request(hp.PROXY_CLIENT, hp.PROXY_OPEN, target, stream=2000 + k)
        time.sleep(0.5)
        during = [honest_proxy(env.lab) for _ in range(4)]
        q = statistics.median(c.seconds for c in quiet)
        print(f"proxied curl from {HONEST}: quiet {q:.3f} s, during the attack "
              + ", ".join(f"{c.seconds:.3f}" for c in during) + " s")
        assert_honest(during, "while 80 PROXY-OPENs to a blackhole were pending")
        assert_honest(honest_round(env.lab), "after the attack")
        watch.check()


# --- c. 4 GiB of credit, never read ------------------------------------------------------------


@pytest.mark.lab
def test_huge_credit_never_read(env: Env) -> None:
    """A stream from a service that floods, ~4 GiB of credit granted, never read: the host
    queues no more than its caps, and gives the memory back once the VM is gone."""
    with hostile_vm(env, give_credit=False) as peer, RssWatch(env) as watch:
        code, why = open_ack(peer.open_proxy(env.ext_ip, FLOOD_PORT, stream=31))
        assert code == 0, f"harness: PROXY-OPEN to the flood service failed: {code} {why}"
        peer.stop_reading()
        peer.grant(hp.PROXY_CLIENT, hp.PROXY_DATA, 31, 0xFFFFFFFF - hp.INITIAL_WINDOW - 1)
        with HonestLoad(env.lab, rounds=4, deadline=40) as load:
            end = time.monotonic() + 15
            while time.monotonic() < end and not watch.over.is_set():
                time.sleep(0.2)
        peer.hang_up()
        watch.check()
        assert_honest(load.checks, "during the attack")
        watch.check_given_back()
        assert_honest(honest_round(env.lab), "after the attack")


# --- d. many streams, never read ---------------------------------------------------------------


@pytest.mark.lab
def test_many_streams_never_read(env: Env) -> None:
    """200 streams from a service that floods, each within its 8 MiB window, never read: the
    host stays within its caps, and past them new opens are refused with a reason."""
    n = 200
    with hostile_vm(env, give_credit=False) as peer, RssWatch(env) as watch:
        peer.stop_reading()
        rids = {}
        for k in range(n):
            rids[k] = peer.request(hp.PROXY_CLIENT, hp.PROXY_OPEN,
                                   {"host": env.ext_ip, "port": FLOOD_PORT, "cmd": 1},
                                   stream=5000 + k)
            if watch.over.is_set():
                break
            time.sleep(0.02)
        with HonestLoad(env.lab, rounds=4, deadline=40) as load:
            end = time.monotonic() + 15
            while time.monotonic() < end and not watch.over.is_set():
                time.sleep(0.2)
        over = watch.over.is_set()
        if over:
            peer.hang_up()
        else:
            peer.resume_reading()  # the ACKs first (control before DATA), then the floods
        deadline = time.monotonic() + (0 if over else 20)  # one deadline for all the ACKs
        answers = {k: open_ack(peer.wait_ack(rid, deadline - time.monotonic()))
                   for k, rid in rids.items()}
        watch.check()
        assert_honest(load.checks, "during the attack")
        opened = sum(1 for c, _ in answers.values() if c == 0)
        refused = {k: (c, why) for k, (c, why) in answers.items() if c not in (0, None)}
        print(f"{len(rids)} opens: {opened} accepted, {len(refused)} refused, "
              f"{len(rids) - opened - len(refused)} unanswered; first refusals: "
              + "; ".join(f"{c} {why!r}" for c, why in list(refused.values())[:3]))
        assert refused, f"no open was refused: {opened} streams of 8 MiB each accepted"
        blank = [k for k, (_, why) in refused.items() if not why.strip()]
        assert not blank, f"opens refused without a reason: {blank[:5]}"
        peer.hang_up()
        watch.check_given_back()
        assert_honest(honest_round(env.lab), "after the attack")


# --- e. a flood of control packages -------------------------------------------------------------


def _ping_ms() -> float:
    proc = run_on("host", [str(BIN / "vmbusifyctl"), "ping", HONEST], check=False, timeout=20)
    m = re.search(r"rtt ([0-9.]+) ms", proc.stdout)
    assert proc.returncode == 0 and m, f"vmbusifyctl ping {HONEST}: {proc.stdout}{proc.stderr}"
    return float(m.group(1))


def _figures(n: int = 5) -> tuple[float, float]:
    """Median exec latency (s) and host ping to the honest VM (ms)."""
    execs, pings = [], []
    for _ in range(n):
        c = honest_exec()
        assert c.ok, f"exec on {HONEST} failed: {c.detail}"
        execs.append(c.seconds)
        pings.append(_ping_ms())
    return statistics.median(execs), statistics.median(pings)


#: Flooded figures may be this many times the quiet ones (plus the slack below, for the jitter
#: of a shared machine): generous beside the 1.5x goal, for a two-core machine on which the
#: flooding harness itself takes a core.
FLOOD_RATIO = 3.0
#: Packages a second of the flood: each costs the host a decode, a route and an answer; the
#: rate is capped so that the harness's own CPU (which a real VM would not take from the
#: host) stays small beside the host's.
FLOOD_RATE = 20_000
#: The ping's slack: a median of 5 host->vm2 round trips (0.3-0.4 ms quiet) came out at
#: 0.35-7.9 ms flooded in runs minutes apart at load 3-12 (with `requests_per_vm` 512 and
#: 4096 alike), so 5 ms made the test fail on the machine's load, not on the mux; 12 ms still
#: fails a VM whose tunnel waits behind the flood (hundreds of ms, or no answer).
EXEC_SLACK, PING_SLACK_MS = 0.1, 12.0
#: Lines the flood may add to the host's logs: a few kinds of bad package, each at most
#: [limits] log_lines_per_minute (10) lines and then one with a count.
FLOOD_LOG_LINES = 200


@pytest.mark.lab
def test_control_flood(env: Env) -> None:
    """PINGs, bad REQUESTs and packages for no handler, FLOOD_RATE a second: vm2's exec
    latency and the host's ping to vm2 stay near their quiet figures, and the host's logs get
    a few lines with counts, not a line per package."""
    with hostile_vm(env) as peer, RssWatch(env) as watch:
        quiet_exec, quiet_ping = _figures()
        stop = threading.Event()
        sent = [0]
        kinds = [
            lambda k: hp.pack(hp.MESSAGE, hp.TUNNEL, hp.PING, hp.body({"nonce": k})),
            lambda k: hp.pack(hp.REQUEST, hp.PROXY_CLIENT, hp.PROXY_OPEN, b"\xc1", pid=k + 1,
                              stream=k),
            lambda k: hp.pack(hp.REQUEST, 6, 99, hp.body({}), pid=k + 1),
            lambda k: hp.pack(hp.MESSAGE, hp.PROXY_SERVER, 99, hp.body({})),
        ]
        batch = b"".join(kinds[k % len(kinds)](k) for k in range(500))

        def flood() -> None:
            sent[0] = hp.flood(peer, batch, 500, rate=FLOOD_RATE, stop=stop, seconds=60)

        logs_before = _log_sizes(env.log_dir)
        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        try:
            time.sleep(1)
            flood_exec, flood_ping = _figures()
        finally:
            stop.set()
            flooder.join(10)
        time.sleep(1)
        lines = _new_log_lines(env.log_dir, logs_before)
        print(f"control flood: {sent[0]} packages sent at up to {FLOOD_RATE}/s; {HONEST} exec "
              f"{quiet_exec:.3f} s quiet, {flood_exec:.3f} s flooded "
              f"({flood_exec / quiet_exec:.2f}x); ping {quiet_ping:.3f} ms quiet, "
              f"{flood_ping:.3f} ms flooded ({flood_ping / quiet_ping:.2f}x); "
              f"{len(lines)} new host log lines")
        assert flood_exec <= FLOOD_RATIO * quiet_exec + EXEC_SLACK, (
            f"exec on {HONEST} went from {quiet_exec:.3f} s to {flood_exec:.3f} s")
        assert flood_ping <= FLOOD_RATIO * quiet_ping + PING_SLACK_MS, (
            f"ping to {HONEST} went from {quiet_ping:.3f} ms to {flood_ping:.3f} ms")
        assert len(lines) <= FLOOD_LOG_LINES, (
            f"{sent[0]} bad packages wrote {len(lines)} lines to the host's logs (at most "
            f"{FLOOD_LOG_LINES}), e.g. {lines[len(lines) // 2][:200]!r}")
        assert_honest(honest_round(env.lab), "after the flood")
        watch.check()


# --- f. a HELLO claiming the honest VM's addresses ---------------------------------------------


@pytest.mark.lab
def test_hello_claiming_the_honest_address(env: Env) -> None:
    """vm1 says in its HELLO it has vm2's addresses: `vmbusifyctl vmid` does not answer vm1,
    and neither the host proxy nor exec by address sends anything to vm1."""
    sdn = next(a for a in env.honest_ips if a.startswith("198.19."))
    sub = next(a for a in env.honest_ips if on_subnet(a) and "." in a)
    problems: list[str] = []
    with (hostile_vm(env, ips=list(env.honest_ips), hostname=HONEST) as peer,
          RssWatch(env) as watch, HonestLoad(env.lab, rounds=3, deadline=40) as load):
        time.sleep(1)
        for addr in (sdn, sub):
            proc = env.lab.ctl("vmid", addr, check=False)
            print(f"vmbusifyctl vmid {addr}: exit {proc.returncode}, "
                  f"{(proc.stdout + proc.stderr).strip()!r}")
            err = proc.stderr.strip()
            if proc.stdout.strip() == HOSTILE:
                problems.append(f"`vmbusifyctl vmid {addr}` answers {HOSTILE}, which only "
                                "claimed the address")
            elif proc.returncode == 0 and proc.stdout.strip() != HONEST:
                problems.append(f"`vmbusifyctl vmid {addr}` answers {proc.stdout.strip()!r}")
            elif proc.returncode != 0 and not (err.startswith("vmbusifyctl:") and addr in err):
                problems.append(f"`vmbusifyctl vmid {addr}`: not a clear error: {err!r}")
        # the host proxy and exec, by that address
        url = f"http://{sdn}:{HONEST_PORT}/"
        proxy = run_on("host", ["curl", "-sS", "--max-time", "10", "--socks5-hostname",
                                env.lab.layout.host.proxy, url], check=False, timeout=30)
        try:
            ex = run_on("host", [str(BIN / "vmbusifyexec"), sdn, "--", "echo", "by-address"],
                        check=False, timeout=20)
            ex_out = f"exit {ex.returncode}, {(ex.stdout + ex.stderr).strip()!r}"
            if ex.returncode == 0 and ex.stdout != "by-address\n":
                problems.append(f"vmbusifyexec {sdn}: {ex_out}")
        except (subprocess.TimeoutExpired, LabError):
            ex_out = "hung for 20 s"
            problems.append(f"vmbusifyexec {sdn} hung for 20 s")
        print(f"host proxy to {url}: exit {proxy.returncode} {proxy.stdout[:100]!r}"
              f"{proxy.stderr.strip()!r}; vmbusifyexec {sdn}: {ex_out}")
        if proxy.returncode == 0 and proxy.stdout != HONEST_PAGE:
            problems.append(f"the host proxy to {url} got {proxy.stdout[:100]!r}")
        got = [r for r in peer.requests if r.entity in (hp.PROXY_CLIENT, hp.CMD_LISTENER)]
        if got:
            problems.append(f"the host sent {HOSTILE} what was meant for {HONEST}'s address: "
                            + "; ".join(f"entity {r.entity} message {r.message_id} "
                                        f"{r.decoded()!r:.200}" for r in got))
    assert not problems, "\n".join(problems)
    watch.check()
    assert_honest(load.checks, "during the attack")


# --- g. PROXY-OPEN to other VMs, the host, loopback in disguise ---------------------------------


NAT64_LOOPBACK = "64:ff9b::7f00:1"
SIXTOFOUR_LOOPBACK = "2002:7f00:1::1"


@contextlib.contextmanager
def widened_host_policy(env: Env) -> Iterator[None]:
    """The host proxy's allow list widened as an operator allowing everything would (to the
    subnet's ranges and, behind unreachable routes so nothing leaves the machine, the NAT64
    and 6to4 forms of 127.0.0.1): then only the built-in denials can refuse those targets."""
    path = env.lab.layout.host.config_path
    original = path.read_text()
    routes = [(NAT64_LOOPBACK + "/128"), "2002:7f00:1::/48"]
    extra = [SUBNET_CIDR, SUBNET_CIDR6, *routes]
    try:
        for r in routes:
            subprocess.run(["ip", "-6", "route", "add", "unreachable", r], check=True,
                           capture_output=True)
        m = re.search(r'^allow = \[(.*)\]$', original, re.MULTILINE)
        assert m, f"no proxy allow list in {path}"
        wide = original.replace(m.group(0), "allow = [" + m.group(1) + "".join(
            f', "{r}"' for r in extra) + "]")
        path.write_text(wide)
        supervisorctl("host", "restart", "proxy", check=False)
        wait_for(lambda: honest_proxy(env.lab).ok, 30, "the host proxy after its restart")
        yield
    finally:
        path.write_text(original)
        supervisorctl("host", "restart", "proxy", check=False)
        for r in routes:
            subprocess.run(["ip", "-6", "route", "del", "unreachable", r], check=False,
                           capture_output=True)
        wait_for(lambda: honest_proxy(env.lab).ok, 30, "the host proxy after its restart")


@pytest.mark.lab
def test_open_to_other_vms_and_the_host(env: Env) -> None:
    """A PROXY-OPEN from vm1 to vm2's subnet addresses, the host's own addresses and 127.0.0.1
    in mapped, NAT64 and 6to4 forms is refused by the policy (reply 2), even under an allow
    list that covers them."""
    honest_sub = [a for a in env.honest_ips if on_subnet(a)]
    gateway = str(next(ipaddress.ip_network(SUBNET_CIDR).hosts()))
    targets = [*[(a, HONEST_PORT) for a in honest_sub], (env.host_ext_ip, 22),
               (gateway, 22), ("127.0.0.1", 22), ("::ffff:127.0.0.1", 22),
               (NAT64_LOOPBACK, 22), (SIXTOFOUR_LOOPBACK, 22)]
    # The policy is put back (the proxy restarted) only after the watch's check: a restart
    # it asked for is not one the attack caused.
    with widened_host_policy(env):
        with (hostile_vm(env) as peer, RssWatch(env) as watch,
              HonestLoad(env.lab, rounds=3, deadline=40) as load):
            results = {}
            for k, (host, port) in enumerate(targets):
                results[(host, port)] = open_ack(peer.open_proxy(host, port, stream=700 + k))
            for (host, port), (code, why) in results.items():
                print(f"PROXY-OPEN {host}:{port} -> {code} {why!r}")
            wrong = {t: r for t, r in results.items() if r[0] != 2}
            assert not wrong, "not refused by the egress policy (reply 2): " + "; ".join(
                f"{h}:{p} -> {c} {why!r}" for (h, p), (c, why) in wrong.items())
            assert_honest(honest_round(env.lab), "after the attack")
        watch.check()
        assert_honest(load.checks, "during the attack")


# --- h. control characters in guest text -----------------------------------------------------


def _log_sizes(log_dir: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in log_dir.glob("*.log")}


def _new_log_lines(log_dir: Path, before: dict[Path, int]) -> list[bytes]:
    """Lines the host's logs gained since ``before`` (a rotated log counts from its start)."""
    lines: list[bytes] = []
    for p in log_dir.glob("*.log"):
        with open(p, "rb") as fh:
            start = before.get(p, 0)
            fh.seek(start if p.stat().st_size >= start else 0)
            lines += [line for line in fh.read().split(b"\n") if line]
    return lines


@pytest.mark.lab
def test_control_characters_reach_no_log(env: Env) -> None:
    """A newline and ANSI escapes in the HELLO's hostname, a PROXY-OPEN's host name and an
    ATTACH's guest name: the host's logs gain no forged line and no raw ESC byte."""
    marker = f"FORGED-{secrets.token_hex(4)}"
    evil = f"\n{marker} injected \x1b[2J\x1b]0;owned\x07\x1b[31m"
    before = _log_sizes(env.log_dir)
    # The HELLO first, on its own: a host may refuse such a HELLO (that is a defence too).
    with hostile_vm(env, hostname="hostile" + evil, host_must_accept=False):
        time.sleep(2)
    with hostile_vm(env) as peer, RssWatch(env) as watch:
        code, why = open_ack(peer.open_proxy("x.invalid" + evil, 80, stream=41))
        print(f"PROXY-OPEN to a name with control characters: {code} {why!r}")
        open_ack(peer.open_proxy(env.ext_ip + evil, 80, stream=42))
        rid = peer.request(hp.IP_BEARER, hp.BEARER_ATTACH, {"name": "guest" + evil,
                                                            "offload": True}, stream=43)
        peer.wait_ack(rid, 10)
        peer.request(hp.IP_BEARER, hp.BEARER_KEEPALIVE, {"stream": "s" + evil}, stream=0)
        peer.send(hp.pack(hp.DATA, hp.PROXY_CLIENT, hp.PROXY_DATA, ("r" + evil).encode(),
                          stream=41, flags=hp.RESET))
        time.sleep(2)
    time.sleep(1)
    forged, esc = [], []
    for p in env.log_dir.glob("*.log"):
        with open(p, "rb") as fh:
            fh.seek(before.get(p, 0) if p.stat().st_size >= before.get(p, 0) else 0)
            new = fh.read()
        for line in new.split(b"\n"):
            if line.startswith(marker.encode()):
                forged.append(f"{p.name}: {line[:120]!r}")
        if b"\x1b" in new:
            esc.append(p.name)
    watch.check()
    assert not forged, f"forged log lines: {forged}"
    assert not esc, f"raw ESC bytes in {esc}"
    assert_honest(honest_round(env.lab), "after the attack")
