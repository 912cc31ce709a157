#!/usr/bin/env python3
"""Many concurrent proxy connections through one lab VM, every byte checked (needs root).

An echo server in the lab's external namespace; inside the VM, one asyncio client opens N
SOCKS5 connections at once through the VM's proxy client (guest proxy -> tunnel -> host
proxy server -> the echo server), sends each a distinct payload, half-closes, and checks
that exactly that payload comes back. Beside it, in the same run, the same client from the
host straight to the echo server over the lab's veth (no proxy): the anchor.

    .venv/bin/python bench/conns.py [--conns 1000] [--kib 64] [--vm vm1]

Needs a running lab (``vmbusify lab up``; honours VMBUSIFY_LAB_INSTANCE).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmbusify.config import load_config
from vmbusify.lab import netns as ip
from vmbusify.lab.layout import LabLayout

#: The echo server listens on this many ports (chosen by its kernel), one per burst: a burst
#: leaves ~1,000 connections in TIME_WAIT for 60 s, and with ~14,000 of them to one address
#: and port (Linux gives connect() the even half of 32768-60999) every new connect from the
#: host searched the ephemeral ports at length, then failed: back-to-back bursts to one port
#: made the host's proxy burn 2-3 ms of CPU per connection, refused opens ("reply 1") and
#: slowed the direct anchor 5-10 times.
ECHO_PORTS = 4

ECHO_SERVER = textwrap.dedent("""
    import asyncio, sys
    async def echo(r, w):
        try:
            while data := await r.read(1 << 16):
                w.write(data)
                await w.drain()
            w.write_eof()
            await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()
    async def main():
        ports = []
        for _ in range(int(sys.argv[2])):
            srv = await asyncio.start_server(echo, sys.argv[1], 0, backlog=4096)
            ports.append(srv.sockets[0].getsockname()[1])
        print("ready", *ports, flush=True)
        await asyncio.Event().wait()
    asyncio.run(main())
""")

# argv: host port. A SOCKS5 server that does no work: it answers the greeting and the request
# at once (success, no connect) and echoes what follows itself. The same client through it
# costs the client's own SOCKS handshake (two more round trips through its loop per
# connection) and the least a proxy in Python can cost: the anchor for what a SOCKS proxy
# can reach on this machine.
NULL_SOCKS = textwrap.dedent("""
    import asyncio, sys
    try:
        import uvloop
        loop_new = uvloop.new_event_loop
    except ImportError:
        loop_new = asyncio.new_event_loop
    class Null(asyncio.Protocol):
        def connection_made(self, transport):
            self.t, self.state, self.buf = transport, 0, b""
        def data_received(self, data):
            if self.state == 2:
                self.t.write(data)
                return
            self.buf += data
            if self.state == 0 and len(self.buf) >= 2 and len(self.buf) >= 2 + self.buf[1]:
                self.buf = self.buf[2 + self.buf[1]:]
                self.t.write(b"\\x05\\x00")
                self.state = 1
            if self.state == 1 and len(self.buf) >= 10:
                rest, self.buf = self.buf[10:], b""
                self.t.write(b"\\x05\\x00\\x00\\x01" + bytes(6))
                self.state = 2
                if rest:
                    self.t.write(rest)
        def eof_received(self):
            return False  # the transport closes once what it holds is written
    async def main():
        srv = await asyncio.get_running_loop().create_server(
            Null, sys.argv[1], 0, backlog=4096)
        print("ready", srv.sockets[0].getsockname()[1], flush=True)
        await srv.serve_forever()
    loop = loop_new()
    loop.run_until_complete(main())
""")

# argv: proxy ("" = direct) host port conns kib hold; prints one JSON line. hold "1": every
# connection waits, once connected, until all are; then the client prints "held" and waits
# for a line on stdin before any byte is sent (the opens alone, as if they went first).
CLIENT = textwrap.dedent("""
    import asyncio, json, os, socket, statistics, struct, sys, time
    proxy, host, port, conns, kib, hold = sys.argv[1], sys.argv[2], int(sys.argv[3]), \\
        int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
    pending = conns
    all_in = None
    cpu = {}
    def sched():
        run = wait = 0
        for t in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{t}/schedstat") as f:
                a, b, _ = f.read().split()
            run, wait = run + int(a), wait + int(b)
        return run / 1e6, wait / 1e6
    def arrived():
        global pending
        pending -= 1
        if pending == 0:
            cpu["connected"] = time.process_time()
            all_in.set()
    async def one(i):
        payload = (b"%08d" % i) * (kib * 128)
        t0 = time.perf_counter()
        phases = {}
        try:
            if proxy:
                ph, pp = proxy.rsplit(":", 1)
                r, w = await asyncio.open_connection(ph, int(pp))
                phases["tcp"] = time.perf_counter() - t0
                w.write(b"\\x05\\x01\\x00")
                if await r.readexactly(2) != b"\\x05\\x00":
                    return "method refused", 0.0, phases
                phases["greeting"] = time.perf_counter() - t0
                w.write(b"\\x05\\x01\\x00\\x01" + socket.inet_aton(host)
                        + struct.pack(">H", port))
                head = await r.readexactly(10)
                if head[1]:
                    return f"reply {head[1]}", 0.0, phases
            else:
                r, w = await asyncio.open_connection(host, port)
        finally:
            arrived()
        connected = time.perf_counter() - t0
        if hold:
            await go.wait()
        async def send():
            w.write(payload)
            await w.drain()
            w.write_eof()
        sender = asyncio.ensure_future(send())
        got = bytearray()
        while chunk := await r.read(1 << 16):
            got += chunk
        await sender
        w.close()
        ok = "ok" if got == payload else f"mismatch {len(got)}/{len(payload)}"
        return ok, connected, phases
    async def main():
        global all_in, go
        all_in, go = asyncio.Event(), asyncio.Event()
        cpu["start"] = time.process_time()
        sched0 = sched()
        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(one(i)) for i in range(conns)]
        if hold:
            await all_in.wait()
            print("held", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            go.set()
        res = await asyncio.gather(*tasks, return_exceptions=True)
        wall = time.perf_counter() - t0
        sched1 = sched()
        ok = [r for r in res if isinstance(r, tuple) and r[0] == "ok"]
        errors = [repr(r) if not isinstance(r, tuple) else r[0] for r in res
                  if not (isinstance(r, tuple) and r[0] == "ok")]
        lat = sorted(c for _, c, _ in ok) or [0.0]
        phases = {}
        for name in ("tcp", "greeting"):
            got = [p[name] for _, _, p in ok if name in p]
            if got:
                phases[name] = statistics.median(got) * 1e3
        tally = {}
        for e in errors:
            tally[e] = tally.get(e, 0) + 1
        print(json.dumps({"conns": conns, "intact": len(ok), "wall_s": wall,
                          "connect_median_ms": statistics.median(lat) * 1e3,
                          "connect_p99_ms": lat[max(0, int(len(lat) * 0.99) - 1)] * 1e3,
                          "last_connect_ms": lat[-1] * 1e3, "phases_ms": phases,
                          "client_sched_ms": [sched1[0] - sched0[0], sched1[1] - sched0[1]],
                          "client_cpu_ms_per_open":
                              (cpu["connected"] - cpu["start"]) * 1e3 / conns,
                          "errors": errors[:5], "error_counts": tally}))
    asyncio.run(main())
""")


def _client(netns: str | None, proxy: str, host: str, port: int, conns: int, kib: int,
            script: Path, on_held: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the client; ``on_held``: hold every connection once connected until all are,
    call it, then let them send (the opens alone, then the bytes)."""
    argv = ip.ns_argv(netns, [sys.executable, str(script), proxy, host, str(port), str(conns),
                              str(kib), "1" if on_held else "0"])
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        if on_held is not None:
            line = proc.stdout.readline()
            if line.strip() == "held":
                on_held()
            proc.stdin.write("go\n")
            proc.stdin.flush()
        try:
            out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise SystemExit("the client took more than 600 s") from None
    if proc.returncode != 0:
        raise SystemExit(f"the client failed: {err.strip()[-500:]}")
    return dict(json.loads(out.strip().splitlines()[-1]))


#: The programs on the open path whose CPU a burst is charged with: (side, program).
PATH_PROGRAMS = (("guest", "proxy"), ("guest", "mux"), ("host", "mux"), ("host", "proxy"))


def _program_pids(config_path: Path) -> dict[str, int]:
    """{"mux": pid, "proxy": pid} of the lab stack that runs with ``config_path``."""
    found: dict[str, int] = {}
    want = f"VMBUSIFY_CONFIG={config_path}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if want not in (d / "environ").read_bytes().split(b"\0"):
                continue
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mux" in argv:
            found["mux"] = int(d.name)
        elif b"worker" in argv and b"proxy" in argv:
            found["proxy"] = int(d.name)
    return found


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0.0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _null_socks(netns: str, host: str, port: int, conns: int, kib: int, client_py: Path,
                tmp: Path) -> dict[str, Any]:
    """The client through NULL_SOCKS, run in ``netns`` beside it."""
    null_py = tmp / "null_socks.py"
    null_py.write_text(NULL_SOCKS)
    with _server(netns, [str(null_py), "127.0.0.1"], "the null SOCKS server") as ports:
        return _client(netns, f"127.0.0.1:{ports[0]}", host, port, conns, kib, client_py)


@contextlib.contextmanager
def _server(netns: str, argv: list[str], what: str) -> Iterator[list[int]]:
    """Run a server script of this module (argv after the interpreter) in ``netns`` until
    the block ends; yields the ports it printed after "ready"."""
    proc = subprocess.Popen(ip.ns_argv(netns, [sys.executable, *argv]),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        if ready[:1] != ["ready"]:
            raise SystemExit(f"{what} did not start")
        yield [int(port) for port in ready[1:]]
    finally:
        proc.terminate()
        proc.wait(10)


def _sched_ms(pid: int) -> tuple[float, float]:
    """Milliseconds ``pid``'s threads ran, and waited in the kernel's run queue for a core
    (/proc/PID/task/*/schedstat; zeros if it is gone)."""
    run = wait = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            a, b, _ = stat.read_text().split()
        except (OSError, ValueError):
            continue
        run, wait = run + int(a), wait + int(b)
    return run / 1e6, wait / 1e6


def _cpu_per_conn(pids: dict[tuple[str, str], int], before: dict[tuple[str, str], float],
                  conns: int) -> dict[str, float]:
    """CPU milliseconds per connection of each program on the path since ``before``."""
    return {f"{side} {name}": (_cpu_seconds(pids[(side, name)]) - before[(side, name)])
            * 1e3 / conns for side, name in PATH_PROGRAMS if (side, name) in pids}


def conns_figures(conns: int = 1000, kib: int = 64, vm: str = "vm1", held: bool = False
                  ) -> dict[str, Any]:
    """{"vmbusify": {...}, "direct": {...}}: each with conns, intact, wall_s, connect_*_ms;
    ``held``: and "held", the burst with its opens first (see _client)."""
    extra: dict[str, Any] = {}
    layout = LabLayout()
    ext, vml = layout.external, layout.vm(vm)
    if not ip.netns_exists(vml.netns) or not ip.netns_exists(ext.netns):
        raise SystemExit(f"no lab at {layout.root}: run `vmbusify lab up` first")
    guest_proxy = load_config(vml.config_path).proxy.listen
    with tempfile.TemporaryDirectory(prefix="vmbusify-bench-conns-") as tmp:
        server_py, client_py = Path(tmp) / "echo.py", Path(tmp) / "client.py"
        server_py.write_text(ECHO_SERVER)
        client_py.write_text(CLIENT)
        os.chmod(tmp, 0o755)
        with _server(ext.netns, [str(server_py), ext.ip, str(ECHO_PORTS)],
                     "the echo server") as echo_ports:
            # A port of its own for each burst (ECHO_PORTS), so none waits on another's
            # TIME_WAIT connections.
            ports = iter(echo_ports)
            _client(vml.netns, guest_proxy, ext.ip, next(ports), 10, 1, client_py)  # warm up
            pids = {("guest", name): pid
                    for name, pid in _program_pids(vml.config_path).items()}
            pids.update({("host", name): pid
                         for name, pid in _program_pids(layout.host.config_path).items()})
            before = {k: _cpu_seconds(pid) for k, pid in pids.items()}
            sched = {k: _sched_ms(pid) for k, pid in pids.items()}
            ours = _client(vml.netns, guest_proxy, ext.ip, next(ports), conns, kib, client_py)
            # Run time and time runnable but waiting for a core, each program of the path
            # and the client: whether the burst is bound by the machine's two cores.
            ours["sched_ms"] = {f"{side} {name}": [b - a for a, b in zip(
                sched[(side, name)], _sched_ms(pids[(side, name)]), strict=True)]
                for side, name in PATH_PROGRAMS if (side, name) in pids}
            ours["sched_ms"]["client"] = ours.pop("client_sched_ms")
            # CPU per connection of each program on the path (the whole connection: open,
            # 2 x kib relayed, close), the evidence for where a burst's time goes.
            ours["cpu_ms_per_conn"] = _cpu_per_conn(pids, before, conns)
            if held:
                # The same burst with every connection held once connected until all are:
                # the opens alone, as if each process served them before any byte. Its
                # CPU up to that point is the CPU per open; its connect median what putting
                # opens first could reach at best with that CPU.
                time.sleep(1)
                before = {k: _cpu_seconds(pid) for k, pid in pids.items()}
                opens: dict[str, float] = {}
                first = _client(vml.netns, guest_proxy, ext.ip, next(ports), conns, kib,
                                client_py,
                                on_held=lambda: opens.update(_cpu_per_conn(pids, before,
                                                                           conns)))
                first["cpu_ms_per_open"] = opens
                extra["held"] = first
            time.sleep(1)
            direct = _client(None, "", ext.ip, next(ports), conns, kib, client_py)
            if held:
                time.sleep(1)
                extra["null_socks"] = _null_socks(vml.netns, ext.ip, 9, conns, kib, client_py,
                                                  Path(tmp))
    return {"vmbusify": ours, "direct": direct, **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--kib", type=int, default=64, help="KiB each connection sends (echoed)")
    ap.add_argument("--vm", default="vm1")
    ap.add_argument("--no-held", action="store_true",
                    help="skip the burst with its opens first (the CPU per open, the floor)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/conns.py needs root and a running lab (vmbusify lab up)")
    f = conns_figures(args.conns, args.kib, args.vm, held=not args.no_held)
    print(f"{args.conns} concurrent connections, {args.kib} KiB echoed each, on "
          f"{os.cpu_count()} cores")
    for name, r in f.items():
        phases = r.get("phases_ms") or {}
        print(f"  {name:<9} intact {r['intact']}/{r['conns']}  all done in {r['wall_s']:.2f} s"
              f"  connect median {r['connect_median_ms']:.1f} ms p99 {r['connect_p99_ms']:.1f}"
              f" ms  {r['error_counts'] or ''}"
              + (" (medians: TCP connect {:.1f} ms, SOCKS greeting answered {:.1f} ms)".format(
                  phases["tcp"], phases["greeting"]) if "greeting" in phases else ""))
    cpu = f["vmbusify"].get("cpu_ms_per_conn") or {}
    if cpu:
        print("  CPU per connection on the path (ms): "
              + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
              + f"; together {sum(cpu.values()):.2f} ms x {args.conns} connections = "
              f"{sum(cpu.values()) * args.conns / 1e3:.1f} CPU-s on {os.cpu_count()} cores")
    sched = f["vmbusify"].get("sched_ms") or {}
    if sched:
        run = sum(r for r, _ in sched.values())
        wait = sum(w for _, w in sched.values())
        print("  run / waiting for a core (ms): " + ", ".join(
            f"{k} {r:.0f} / {w:.0f}" for k, (r, w) in sched.items())
            + f"; together {run:.0f} / {wait:.0f} ({wait / max(run, 1e-9):.1f} x as long "
            "waiting as running)")
    direct = f["direct"]["connect_median_ms"]
    ratio = f["vmbusify"]["connect_median_ms"] / max(direct, 1e-9)
    print(f"  connect median ratio ours/direct: {ratio:.2f} (goal <= 2)")
    if f.get("held", {}).get("cpu_ms_per_open"):
        print(floor_text(f, args.conns, os.cpu_count() or 1))


def floor_ms(f: dict[str, Any], conns: int, cores: int) -> float:
    """The least the connect median can be with the burst's CPU per open: the median
    connection is connected once half the burst's opens went through the four programs of
    the path and the client, which share the ``cores`` (the held run's CPU up to the moment
    all were connected, so no byte of data in it)."""
    held = f["held"]
    per_open = sum(held["cpu_ms_per_open"].values()) + held.get("client_cpu_ms_per_open", 0.0)
    return per_open * (conns // 2) / cores


def best_case_ms(f: dict[str, Any], conns: int, cores: int) -> float | None:
    """About the best connect median with this CPU per open, every open first and no wait
    between programs: the client's own SOCKS burst with a server that does no work (its
    median), plus the path's CPU for half the opens over the ``cores``. None without the
    null server's run."""
    null = f.get("null_socks")
    if not null or "held" not in f:
        return None
    path = sum(f["held"]["cpu_ms_per_open"].values())
    return float(null["connect_median_ms"]) + path * (conns // 2) / cores


def floor_text(f: dict[str, Any], conns: int, cores: int) -> str:
    """Why the goal is (or is not) within reach, as lines: the burst with its opens first,
    the CPU per open, the floor for the connect median, a SOCKS server that does no work,
    and the best case they add up to."""
    direct = max(f["direct"]["connect_median_ms"], 1e-9)
    held = f["held"]
    opens = held["cpu_ms_per_open"]
    path, client = sum(opens.values()), held.get("client_cpu_ms_per_open", 0.0)
    floor = floor_ms(f, conns, cores)
    lines = [(f"  opens first (every connection held until all are connected): connect median "
              f"{held['connect_median_ms']:.1f} ms = {held['connect_median_ms'] / direct:.2f} x "
              "direct"),
             "  CPU per open (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in opens.items())
             + f", the client {client:.2f}",
             (f"  CPU floor for the median: ({path:.2f} + {client:.2f}) ms x {conns // 2} opens "
              f"/ {cores} cores = {floor:.0f} ms = {floor / direct:.2f} x direct")]
    null, best = f.get("null_socks"), best_case_ms(f, conns, cores)
    if null and best is not None:
        lines.append(f"  a SOCKS5 server that does no work (answers at once, echoes itself): "
                     f"connect median {null['connect_median_ms']:.1f} ms = "
                     f"{null['connect_median_ms'] / direct:.2f} x direct")
        lines.append(f"  at best with this CPU per open: {null['connect_median_ms']:.0f} ms + "
                     f"{path:.2f} ms x {conns // 2} / {cores} = {best:.0f} ms = "
                     f"{best / direct:.2f} x direct (goal <= 2)")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
