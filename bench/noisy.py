#!/usr/bin/env python3
"""The noisy neighbour: one VM holds every cap and floods control packages; the other VM's
exec latency and proxy throughput, quiet and noisy, as ratios (needs root and a lab).

vm1 is measured: `vmbusifyexec vm1 true` from the host (median wall time) and a download
through vm1's proxy (``curl --socks5-hostname`` inside vm1, through the host's proxy server,
of a file served in the external namespace; MB/s). First quiet, then while vm2 is noisy:
vm2's guest mux is stopped and the hostile guest of tests/e2e/hostile_peer.py (the wire
protocol with struct and msgpack, none of vmbusify's classes) takes its tunnel and

  - opens ``--idle-streams`` proxy streams to a service that accepts and never sends (they
    hold stream slots) and ``--flood-streams`` to one that sends without end, and never reads
    a byte (the host holds what its caps let it: buffered bytes, tunnel backlog);
  - floods one-way packages that want no answer (PONGs for no PING, WINDOWs and DATA for
    streams never opened, MESSAGEs for no handler, a PROXY-OPEN as a MESSAGE with a bad
    body), ``--rate`` a second (20,000; capped so that the harness's own CPU, which a real
    VM would not take from the host, stays small beside the host's).

Not a bandwidth share: vm2 moves no bulk bytes of its own. Goal: vm1 within 1.5x of quiet.

    .venv/bin/python bench/noisy.py [--runs 15] [--mib 64] [--idle-streams 256]
                                    [--flood-streams 16] [--rate 20000]

Honours VMBUSIFY_LAB_INSTANCE; vm2's guest mux is started again at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e import hostile_peer as hp
from vmbusify.lab import netns as ip
from vmbusify.lab.access import command
from vmbusify.lab.layout import LabLayout
from vmbusify.lab.stack import supervisorctl
from vmbusify.lab.testing import BIN, LabHandle, lab_status

MEASURED, NOISY = "vm1", "vm2"
#: Ports of this benchmark in the external namespace.
WEB_PORT, IDLE_PORT, FLOOD_PORT = 18280, 18281, 18282
GUEST_PROXY = "127.0.0.1:6542"

SERVICES = textwrap.dedent("""
    import asyncio, sys
    host, idle_port, flood_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    CHUNK = bytes(1 << 20)
    async def idle(r, w):
        try:
            while await r.read(1 << 16):
                pass
        except OSError:
            pass
        w.close()
    async def flood(r, w):
        try:
            while True:
                w.write(CHUNK)
                await w.drain()
        except OSError:
            pass
        w.close()
    async def main():
        a = await asyncio.start_server(idle, host, idle_port, backlog=4096)
        b = await asyncio.start_server(flood, host, flood_port, backlog=1024)
        async with a, b:
            await asyncio.sleep(3600)
    asyncio.run(main())
""")


#: A figure's single run may take this long; one that fails or takes longer counts as this
#: long (exec) or as 0 MB/s (download), and is said so.
RUN_TIMEOUT = 30.0


def exec_ms(env: dict[str, str], runs: int) -> float:
    """Median wall time of `vmbusifyexec vm1 true` (ms)."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        try:
            subprocess.run([str(BIN / "vmbusifyexec"), MEASURED, "--", "true"], env=env,
                           check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           timeout=RUN_TIMEOUT)
            times.append(time.perf_counter() - t0)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            print(f"exec on {MEASURED} failed: {exc}", file=sys.stderr, flush=True)
            times.append(RUN_TIMEOUT)
    return statistics.median(times) * 1e3


def proxy_mbps(url: str, rounds: int = 3) -> float:
    """Median download speed through vm1's proxy (MB/s)."""
    speeds = []
    for _ in range(rounds):
        argv, env = command(MEASURED, ["curl", "-sS", "-o", "/dev/null", "--max-time",
                                       str(int(RUN_TIMEOUT)), "-w", "%{speed_download}",
                                       "--socks5-hostname", GUEST_PROXY, url])
        proc = subprocess.run(argv, env=env, check=False, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT + 30)
        if proc.returncode != 0:
            print(f"download through {MEASURED}'s proxy failed: {proc.stderr.strip()}",
                  file=sys.stderr, flush=True)
            speeds.append(0.0)
        else:
            speeds.append(float(proc.stdout) / 1e6)
    return statistics.median(speeds)


def measure(env: dict[str, str], url: str, runs: int) -> tuple[float, float]:
    return exec_ms(env, runs), proxy_mbps(url)


class Noise:
    """vm2 made noisy with the hostile guest (see the module docstring)."""

    def __init__(self, layout: LabLayout, ext_ip: str, idle_streams: int,
                 flood_streams: int, rate: float) -> None:
        self.peer = hp.HostilePeer(layout.vm(NOISY).tunnel_path, give_credit=False,
                                   key_file=layout.vm(NOISY).key_path)
        self.ext_ip = ext_ip
        self.idle_streams = idle_streams
        self.flood_streams = flood_streams
        self.rate = rate
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flood, daemon=True)

    def start(self, lab: LabHandle) -> None:
        supervisorctl(NOISY, "stop", "mux", check=False)
        self.peer.listen()
        self.peer.wait_connected(30)
        lab.wait_connected([MEASURED, NOISY], timeout=30)
        self.peer.stop_reading()  # from now on the host's answers and stream bytes pile up
        opens = [(IDLE_PORT, self.idle_streams), (FLOOD_PORT, self.flood_streams)]
        stream = 1
        for port, count in opens:
            for _ in range(count):
                self.peer.request(hp.PROXY_CLIENT, hp.PROXY_OPEN,
                                  {"host": self.ext_ip, "port": port, "cmd": 1}, stream=stream)
                stream += 1
                time.sleep(0.005)
        time.sleep(3)  # let the streams fill what the host lets them
        self._thread.start()
        time.sleep(1)

    def _flood(self) -> None:
        kinds = [
            hp.pack(hp.MESSAGE, hp.TUNNEL, hp.PONG, hp.body({"nonce": 1 << 40})),
            hp.pack(hp.WINDOW, hp.PROXY_CLIENT, hp.PROXY_DATA, hp.window(1), stream=999_999),
            hp.pack(hp.DATA, hp.PROXY_CLIENT, hp.PROXY_DATA, b"x" * 64, stream=999_998),
            hp.pack(hp.MESSAGE, 6, 99, hp.body({})),
            hp.pack(hp.MESSAGE, hp.PROXY_CLIENT, hp.PROXY_OPEN, b"\xc1", stream=999_997),
        ]
        batch = b"".join(kinds[k % len(kinds)] for k in range(500))
        self.sent = hp.flood(self.peer, batch, 500, rate=self.rate, stop=self._stop,
                             seconds=1800)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.peer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15, help="execs per figure")
    ap.add_argument("--mib", type=int, default=64, help="size of the proxied download")
    ap.add_argument("--idle-streams", type=int, default=256)
    ap.add_argument("--flood-streams", type=int, default=16)
    ap.add_argument("--rate", type=float, default=20_000,
                    help="control packages a second (0: as fast as one thread sends them)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/noisy.py needs root (the lab)")
    status = lab_status()
    if not status["up"] or len(status["vms"]) < 2:
        sys.exit("bench/noisy.py needs a lab with 2 VMs: vmbusify lab up")
    lab = LabHandle(status=status, started=False)
    layout = lab.layout
    ext = layout.external
    lab.wait_connected([MEASURED, NOISY], timeout=60)
    env = command("host", ["true"])[1]
    www = Path(tempfile.mkdtemp(prefix="vmbusify-bench-noisy-"))
    (www / "big").write_bytes(os.urandom(args.mib << 20))
    procs = [
        subprocess.Popen(ip.ns_argv(ext.netns, [sys.executable, "-m", "http.server", "--bind",
                                                ext.ip, "--directory", str(www), str(WEB_PORT)]),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen(ip.ns_argv(ext.netns, [sys.executable, "-c", SERVICES, ext.ip,
                                                str(IDLE_PORT), str(FLOOD_PORT)]),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    url = f"http://{ext.ip}:{WEB_PORT}/big"
    noise = Noise(layout, ext.ip, args.idle_streams, args.flood_streams, args.rate)
    try:
        time.sleep(1)
        exec_ms(env, 3)  # warm up
        quiet_exec, quiet_mbps = measure(env, url, args.runs)
        print(f"quiet: exec {quiet_exec:.1f} ms, proxy {quiet_mbps:.0f} MB/s", file=sys.stderr,
              flush=True)
        noise.start(lab)
        noisy_exec, noisy_mbps = measure(env, url, args.runs)
    finally:
        noise.stop()  # joins the flood thread, so noise.sent is final
        supervisorctl(NOISY, "start", "mux", check=False)
        for p in procs:
            p.kill()
            p.wait(10)
        for f in www.iterdir():
            f.unlink()
        www.rmdir()
    sent = noise.sent
    lab.wait_connected([MEASURED, NOISY], timeout=60)
    print(f"noisy neighbour: {NOISY} opened {args.idle_streams} idle and {args.flood_streams} "
          f"flooding streams, read nothing, and sent {sent} one-way control packages "
          f"(at up to {args.rate:g} a second)")
    print(f"exec `true` on {MEASURED}, median of {args.runs}: quiet {quiet_exec:.1f} ms, "
          f"noisy {noisy_exec:.1f} ms, ratio {noisy_exec / quiet_exec:.2f}")
    print(f"proxy download on {MEASURED} ({args.mib} MiB): quiet {quiet_mbps:.0f} MB/s, "
          f"noisy {noisy_mbps:.0f} MB/s, ratio "
          + (f"{quiet_mbps / noisy_mbps:.2f}" if noisy_mbps else "inf (the downloads failed)"))


if __name__ == "__main__":
    main()
