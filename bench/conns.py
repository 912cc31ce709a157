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
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmbusify.config import load_config
from vmbusify.lab import netns as ip
from vmbusify.lab.layout import LabLayout

PORT = 18190

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
        srv = await asyncio.start_server(echo, sys.argv[1], int(sys.argv[2]), backlog=4096)
        print("ready", flush=True)
        await srv.serve_forever()
    asyncio.run(main())
""")

# argv: proxy ("" = direct) host port conns kib; prints one JSON line.
CLIENT = textwrap.dedent("""
    import asyncio, json, os, socket, statistics, struct, sys, time
    proxy, host, port, conns, kib = sys.argv[1], sys.argv[2], int(sys.argv[3]), \\
        int(sys.argv[4]), int(sys.argv[5])
    async def one(i):
        payload = (b"%08d" % i) * (kib * 128)
        t0 = time.perf_counter()
        if proxy:
            ph, pp = proxy.rsplit(":", 1)
            r, w = await asyncio.open_connection(ph, int(pp))
            w.write(b"\\x05\\x01\\x00")
            if await r.readexactly(2) != b"\\x05\\x00":
                return "method refused", 0.0
            w.write(b"\\x05\\x01\\x00\\x01" + socket.inet_aton(host) + struct.pack(">H", port))
            head = await r.readexactly(10)
            if head[1]:
                return f"reply {head[1]}", 0.0
        else:
            r, w = await asyncio.open_connection(host, port)
        connected = time.perf_counter() - t0
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
        return ("ok" if got == payload else f"mismatch {len(got)}/{len(payload)}"), connected
    async def main():
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(i) for i in range(conns)), return_exceptions=True)
        wall = time.perf_counter() - t0
        ok = [r for r in res if isinstance(r, tuple) and r[0] == "ok"]
        errors = [repr(r) if not isinstance(r, tuple) else r[0] for r in res
                  if not (isinstance(r, tuple) and r[0] == "ok")]
        lat = sorted(c for _, c in ok) or [0.0]
        tally = {}
        for e in errors:
            tally[e] = tally.get(e, 0) + 1
        print(json.dumps({"conns": conns, "intact": len(ok), "wall_s": wall,
                          "connect_median_ms": statistics.median(lat) * 1e3,
                          "connect_p99_ms": lat[max(0, int(len(lat) * 0.99) - 1)] * 1e3,
                          "errors": errors[:5], "error_counts": tally}))
    asyncio.run(main())
""")


def _client(netns: str | None, proxy: str, host: str, conns: int, kib: int,
            script: Path) -> dict[str, Any]:
    proc = subprocess.run(ip.ns_argv(netns, [sys.executable, str(script), proxy, host,
                                             str(PORT), str(conns), str(kib)]),
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the client failed: {proc.stderr.strip()[-500:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


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


def conns_figures(conns: int = 1000, kib: int = 64, vm: str = "vm1") -> dict[str, Any]:
    """{"vmbusify": {...}, "direct": {...}}: each with conns, intact, wall_s, connect_*_ms."""
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
        server = subprocess.Popen(ip.ns_argv(ext.netns, [sys.executable, str(server_py), ext.ip,
                                                         str(PORT)]),
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert server.stdout is not None
            if server.stdout.readline().strip() != "ready":
                raise SystemExit("the echo server did not start")
            _client(vml.netns, guest_proxy, ext.ip, 10, 1, client_py)  # warm up
            pids = {("guest", name): pid
                    for name, pid in _program_pids(vml.config_path).items()}
            pids.update({("host", name): pid
                         for name, pid in _program_pids(layout.host.config_path).items()})
            before = {k: _cpu_seconds(pid) for k, pid in pids.items()}
            ours = _client(vml.netns, guest_proxy, ext.ip, conns, kib, client_py)
            # CPU per connection of each program on the path (the whole connection: open,
            # 2 x kib relayed, close), the evidence for where a burst's time goes.
            ours["cpu_ms_per_conn"] = {
                f"{side} {name}": (_cpu_seconds(pids[(side, name)]) - before[(side, name)])
                * 1e3 / conns
                for side, name in PATH_PROGRAMS if (side, name) in pids}
            time.sleep(1)
            direct = _client(None, "", ext.ip, conns, kib, client_py)
        finally:
            server.terminate()
            server.wait(10)
    return {"vmbusify": ours, "direct": direct}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--kib", type=int, default=64, help="KiB each connection sends (echoed)")
    ap.add_argument("--vm", default="vm1")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/conns.py needs root and a running lab (vmbusify lab up)")
    f = conns_figures(args.conns, args.kib, args.vm)
    print(f"{args.conns} concurrent connections, {args.kib} KiB echoed each, on "
          f"{os.cpu_count()} cores")
    for name, r in f.items():
        print(f"  {name:<9} intact {r['intact']}/{r['conns']}  all done in {r['wall_s']:.2f} s"
              f"  connect median {r['connect_median_ms']:.1f} ms p99 {r['connect_p99_ms']:.1f}"
              f" ms  {r['error_counts'] or ''}")
    cpu = f["vmbusify"].get("cpu_ms_per_conn") or {}
    if cpu:
        print("  CPU per connection on the path (ms): "
              + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
              + f"; together {sum(cpu.values()):.2f} ms x {args.conns} connections = "
              f"{sum(cpu.values()) * args.conns / 1e3:.1f} CPU-s on {os.cpu_count()} cores")
    ratio = f["vmbusify"]["connect_median_ms"] / max(f["direct"]["connect_median_ms"], 1e-9)
    print(f"  connect median ratio ours/direct: {ratio:.2f} (goal <= 2)")


if __name__ == "__main__":
    main()
