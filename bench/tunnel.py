#!/usr/bin/env python3
"""Tunnel benchmark: ping round trip (idle and beside a stream), one stream's throughput.

The stream goes worker -> host mux -> tunnel (a Unix socket, as in the lab) -> guest mux ->
worker, each a process of its own. Beside it, in the same run, socat moves the same number of
bytes over the same kind of Unix socket. Prints the figures and the ratio.

    .venv/bin/python bench/tunnel.py [--mib 1024] [--pings 2000]

Workers and muxes run on uvloop, as `vmbusify` programs do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.harness import link_for, make_pair, wait_state
from vmbusify.bus.frames import RouteKind
from vmbusify.bus.link import Inbound, WorkerLink
from vmbusify.protocol.entities import Entity
from vmbusify.runtime import run_async

OPEN, DATA = 911, 912
#: Write size: what the real workers hand a stream per read (relay, exec: up to 1 MiB).
CHUNK = 1 << 20
#: Also shown: writes of 256 KiB, four times the packages per byte.
SMALL_CHUNK = 256 << 10


async def sink_worker(config_path: str) -> None:
    """Guest side: accept one stream, count its bytes, answer the count."""
    from vmbusify.config import load_config
    link: WorkerLink
    drains: set[asyncio.Task[None]] = set()  # the loop holds tasks by weak reference only

    async def on_open(msg: Inbound) -> object:
        stream = link.streams.accept(msg.vmid, Entity.PROXY_SERVER, msg.package, DATA)

        async def drain() -> None:
            total = 0
            while chunk := await stream.read():
                total += len(chunk)
            await stream.write(str(total).encode())
            await stream.write_eof()

        drains.add(task := asyncio.ensure_future(drain()))
        task.add_done_callback(drains.discard)
        return True

    link = WorkerLink(load_config(config_path), "bench-sink", [Entity.PROXY_SERVER])
    link.route(Entity.PROXY_CLIENT, OPEN, on_open, RouteKind.REQUEST)
    link.route(Entity.PROXY_CLIENT, DATA, None, RouteKind.STREAM)
    await link.start()
    await asyncio.Event().wait()


async def tunnel_figures(root: Path, mib: int, pings: int) -> dict[str, float]:
    pair = make_pair(root, ping_interval=5.0, dead_after=30.0)
    # Started once, before anything is measured: blocking the loop for it costs nothing.
    sink = subprocess.Popen([sys.executable, __file__, "--sink",  # noqa: ASYNC220
                             str(pair.guest.config_path)])
    try:
        host = await link_for(pair.host, "bench-src", [Entity.PROXY_CLIENT],
                              [(Entity.PROXY_SERVER, DATA, None)])
        await wait_state(host, "vm1", "connected")
        for _ in range(50):  # warm up
            await host.control({"cmd": "ping", "vmid": "vm1"})
        rtts = [(await host.control({"cmd": "ping", "vmid": "vm1"}))["rtt_ms"]
                for _ in range(pings)]
        # wait for the sink to register
        guest_link = await link_for(pair.guest, "bench-probe", [])
        for _ in range(600):
            st = await guest_link.control({"cmd": "status"})
            if any(w["name"] == "bench-sink" for w in st["workers"]):
                break
            await asyncio.sleep(0.1)
        else:
            raise SystemExit("the sink worker did not register within 60 s")
        await guest_link.close()
        procs = {"host worker": psutil.Process(), "host mux": psutil.Process(pair.host.pid),
                 "guest mux": psutil.Process(pair.guest.pid),
                 "guest worker": psutil.Process(sink.pid)}
        total = mib << 20

        async def one_stream(block_size: int) -> tuple[float, dict[str, float]]:
            """MB/s of one stream written in ``block_size`` writes, and CPU-s/GB per process."""
            stream = await host.open_stream("vm1", Entity.PROXY_CLIENT, Entity.PROXY_SERVER,
                                            DATA)
            await host.request_body("vm1", Entity.PROXY_CLIENT, OPEN, {}, stream=stream.id)
            block = b"\0" * block_size
            cpu0 = {k: p.cpu_times() for k, p in procs.items()}
            t0 = time.perf_counter()
            sent = 0
            while sent < total:
                await stream.write(block)
                sent += len(block)
            await stream.write_eof()
            count = int(bytes(await stream.read()).decode())
            elapsed = time.perf_counter() - t0
            assert count == sent, (count, sent)
            gb = sent / 1e9
            now = {k: p.cpu_times() for k, p in procs.items()}
            cpu = {k: (now[k].user + now[k].system - cpu0[k].user - cpu0[k].system) / gb
                   for k in procs}
            cpu |= {f"sys {k}": (now[k].system - cpu0[k].system) / gb for k in procs}
            return sent / elapsed / 1e6, cpu

        busy_rtts: list[float] = []

        async def ping_beside() -> None:
            """Control packages jump the stream's queue: their round trip while it runs."""
            while True:
                await asyncio.sleep(0.01)
                busy_rtts.append((await host.control({"cmd": "ping", "vmid": "vm1"}))["rtt_ms"])

        pinger = asyncio.ensure_future(ping_beside())
        try:
            ours, cpu = await one_stream(CHUNK)
        finally:
            pinger.cancel()
        small, small_cpu = await one_stream(SMALL_CHUNK)
        # How the payloads crossed the buses (vmbusify/bus/ring.py; VMBUSIFY_BUS_RING=0: no
        # rings): through the host worker's ring or inline, and into the sink's.
        rings = host._bus.rings if host._bus is not None else None
        probe = await link_for(pair.guest, "bench-probe", [])
        st = await probe.control({"cmd": "status"})
        await probe.close()
        sink_ring = next((w.get("ring") for w in st["workers"] if w["name"] == "bench-sink"),
                         None) or {}
        await host.close()
        return {"rtt_median_ms": statistics.median(rtts),
                "rtt_p99_ms": sorted(rtts)[int(len(rtts) * 0.99) - 1],
                "busy_rtt_median_ms": statistics.median(busy_rtts) if busy_rtts else 0.0,
                "busy_rtt_p99_ms": sorted(busy_rtts)[int(len(busy_rtts) * 0.99) - 1]
                if busy_rtts else 0.0,
                "ours_mb_s": ours, "small_mb_s": small,
                **{f"cpu_s_per_gb {k}": v for k, v in cpu.items() if not k.startswith("sys ")},
                **{f"sys_cpu_s_per_gb {k[4:]}": v for k, v in cpu.items()
                   if k.startswith("sys ")},
                **{f"small_cpu_s_per_gb {k}": v for k, v in small_cpu.items()
                   if not k.startswith("sys ")},
                "ring_host_placed": rings.placed if rings else 0,
                "ring_host_inline": rings.inline if rings else 0,
                "ring_guest_placed": sink_ring.get("placed", 0),
                "ring_guest_inline": sink_ring.get("inline", 0)}
    finally:
        sink.kill()
        pair.stop()


def _cpu_of(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> float:
    """Wait for ``proc`` (a child); its user + system CPU seconds (from wait4's rusage)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"socat (pid {proc.pid}) did not finish within {timeout:g} s")
        time.sleep(0.01)


def _wait_for(path: Path) -> None:
    for _ in range(250):
        if path.exists():
            return
        time.sleep(0.02)
    raise SystemExit(f"socat did not listen on {path}")


def socat_figure(root: Path, mib: int, block: int | None = None, hops: int = 1
                 ) -> tuple[float, float]:
    """socat reading /dev/zero into a Unix socket and a second socat draining it; with
    ``hops`` > 1, ``hops - 1`` socat relays between them (each crossing a Unix socket of its
    own, as the stream crosses the host's bus, the tunnel and the guest's bus). MB/s and the
    CPU seconds per GB of all the socats together."""
    opts = ["-b", str(block)] if block else []
    socks = [root / f"socat{k}.sock" for k in range(hops)]
    for sock in socks:
        sock.unlink(missing_ok=True)
    procs = [subprocess.Popen(["socat", "-u", *opts, f"UNIX-LISTEN:{socks[-1]}",
                               "OPEN:/dev/null"])]
    _wait_for(socks[-1])
    for k in range(hops - 2, -1, -1):  # relays, from the sink's end back to the source's
        procs.append(subprocess.Popen(["socat", "-u", *opts, f"UNIX-LISTEN:{socks[k]}",
                                       f"UNIX-CONNECT:{socks[k + 1]}"]))
        _wait_for(socks[k])
    t0 = time.perf_counter()
    procs.append(subprocess.Popen(["socat", "-u", *opts,
                                   f"OPEN:/dev/zero,readbytes={mib << 20}",
                                   f"UNIX-CONNECT:{socks[0]}"]))
    cpu = sum(_cpu_of(p) for p in reversed(procs))
    elapsed = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise SystemExit(f"socat failed: exit statuses {[p.returncode for p in procs]}")
    return (mib << 20) / elapsed / 1e6, cpu / ((mib << 20) / 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--sink", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sink:
        run_async(sink_worker(args.sink))
        return
    if not shutil.which("socat"):
        sys.exit("bench/tunnel.py needs socat (bin/setup installs it)")
    root = Path(tempfile.mkdtemp(prefix="vmbusify-bench-"))
    try:
        ours = run_async(tunnel_figures(root, args.mib, args.pings))
        socat = max(socat_figure(root, args.mib)[0] for _ in range(3))
        # -b as the label says: 256 KiB (this was CHUNK, 1 MiB, which socat moves ~2.5 x
        # faster, under a label saying 256 KiB).
        socat_big = max(socat_figure(root, args.mib, SMALL_CHUNK)[0] for _ in range(3))
        # The floor of the architecture's copies: the same three crossings by C relays.
        chain = max((socat_figure(root, args.mib, SMALL_CHUNK, hops=3) for _ in range(3)),
                    key=lambda f: f[0])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"tunnel benchmark on {os.cpu_count()} cores, {args.mib} MiB, {args.pings} pings")
    print(f"  ping round trip (mux to mux): median {ours['rtt_median_ms']:.3f} ms, "
          f"p99 {ours['rtt_p99_ms']:.3f} ms")
    print(f"  the same while the stream below runs: median {ours['busy_rtt_median_ms']:.3f} ms, "
          f"p99 {ours['busy_rtt_p99_ms']:.3f} ms")
    print(f"  one stream host->guest (worker, mux, tunnel, mux, worker): "
          f"{ours['ours_mb_s']:.0f} MB/s in 1 MiB writes, {ours['small_mb_s']:.0f} MB/s in "
          "256 KiB writes")
    sums = []
    for prefix, what in (("cpu_s_per_gb ", ""), ("small_cpu_s_per_gb ", ", 256 KiB writes")):
        cpu = {k[len(prefix):]: v for k, v in ours.items() if k.startswith(prefix)}
        sums.append(sum(cpu.values()))
        print(f"  CPU seconds per GB{what}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
    print(f"  CPU seconds per GB over the four (goal <= 1.3): {sums[0]:.2f} in 1 MiB writes, "
          f"{sums[1]:.2f} in 256 KiB writes")
    print(f"  socat over a Unix socket, same bytes (default 8 KiB blocks): {socat:.0f} MB/s")
    print(f"  socat with 256 KiB blocks (-b 262144):                     {socat_big:.0f} MB/s")
    print(f"  ratio ours/socat: {ours['ours_mb_s'] / socat:.2f}; "
          f"ours/socat -b 256K: {ours['ours_mb_s'] / socat_big:.2f} (goal >= 0.50)")
    print(f"  socat chain, the stream's three crossings (two relays, -b 256K): "
          f"{chain[0]:.0f} MB/s, {chain[1]:.2f} CPU-s/GB over its four processes")
    print(f"  ratio ours/socat chain: {ours['ours_mb_s'] / chain[0]:.2f}; the chain itself / "
          f"socat -b 256K: {chain[0] / socat_big:.2f} (the goal of 0.50 asks nearly that of "
          "C relays doing the same crossings; each crossing is a copy in and a copy out of "
          "the kernel)")
    print(f"  payloads through the shared-memory rings (VMBUSIFY_BUS_RING): host worker -> "
          f"host mux {ours['ring_host_placed']:.0f} (inline for want of room "
          f"{ours['ring_host_inline']:.0f}), guest mux -> guest worker "
          f"{ours['ring_guest_placed']:.0f} ({ours['ring_guest_inline']:.0f})")
    kernel = sum(v for k, v in ours.items() if k.startswith("sys_cpu_s_per_gb "))
    print(f"  of the CPU seconds per GB in 1 MiB writes, in the kernel (system time): "
          f"{kernel:.2f}")


if __name__ == "__main__":
    main()
