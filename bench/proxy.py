#!/usr/bin/env python3
"""Proxy benchmark: one stream "VM -> external" through VMBusify, socat and `ssh -D`, side by side.

In one run, the same Python sender pushes the same bytes to the same Python sink through:

  vmbusify   SOCKS5 to the guest's proxy client -> guest mux -> tunnel (a Unix socket, as in
             the lab) -> host mux -> host proxy server -> TCP to the sink; every hop its own
             process, on uvloop, as supervisord runs them
  socat      TCP -> socat -> Unix socket -> socat -> TCP (the usual hand-made vsock bridge),
             with 256 KiB blocks (-b 262144) as the issue's anchor names
  ssh -D     SOCKS5 to `ssh -D` -> sshd on loopback (a throwaway key and sshd_config in a
             temporary directory; the machine's sshd and its config are not touched)

and prints MB/s, the ratios, and connect-to-first-byte latency (SOCKS handshake included;
the sink sends one byte as soon as it accepts). Everything stays on loopback.

    .venv/bin/python bench/proxy.py [--mib 1024] [--connects 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.harness import free_port
from tests.integration.proxy_harness import start_proxies, stop_proxies

BLOCK = 1 << 20
MB = 1_000_000
#: Processes of the VMBusify path, for its CPU cost per GB (name -> pid).
VMBUSIFY_PIDS: dict[str, int] = {}


# -- the sink (a process of its own) ----------------------------------------------------------
def sink_main(port: int) -> None:
    """Accept forever; per connection: send b"!", count bytes to EOF, answer the count."""
    import threading

    srv = socket.create_server(("127.0.0.1", port), backlog=512)

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(b"!")
                total = 0
                buf = bytearray(BLOCK)
                while n := conn.recv_into(buf):
                    total += n
                conn.sendall(str(total).encode())
            except OSError:
                pass  # the client went away (latency runs close early)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


# -- clients ----------------------------------------------------------------------------------
def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed during the SOCKS handshake")
        out += chunk
    return out


def socks5_connect(proxy: int, port: int) -> socket.socket:
    """A socket to 127.0.0.1:``port`` through the SOCKS5 proxy at 127.0.0.1:``proxy``."""
    s = socket.create_connection(("127.0.0.1", proxy))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b"\x05\x01\x00")
    if _recv_exact(s, 2) != b"\x05\x00":
        raise ConnectionError("SOCKS5 method refused")
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", port))
    head = _recv_exact(s, 4)
    if head[1] != 0:
        raise ConnectionError(f"SOCKS5 reply {head[1]}")
    _recv_exact(s, {1: 4, 4: 16}[head[3]] + 2)
    return s


def direct_connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


Connect = Callable[[], socket.socket]


def connector(port: int, via: Callable[[int, int], socket.socket] | None, sink: int) -> Connect:
    """How to reach the sink through a path listening on ``port``: straight to it (the path
    forwards to the sink itself), or through ``via``, a proxy client told to go to ``sink``."""
    if via is None:
        return lambda: direct_connect(port)
    return lambda: via(port, sink)


def throughput(connect: Connect, mib: int) -> float:
    """MB/s of one stream of ``mib`` MiB, from the first byte sent to the sink's count."""
    s = connect()
    with s:
        if s.recv(1) != b"!":
            raise ConnectionError("no greeting from the sink")
        block = os.urandom(BLOCK)
        t0 = time.perf_counter()
        for _ in range(mib):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(64):
            answer += chunk
        elapsed = time.perf_counter() - t0
    if int(answer or b"0") != mib * BLOCK:
        raise RuntimeError(f"sink counted {answer!r}, expected {mib * BLOCK}")
    return mib * BLOCK / elapsed / MB


def first_byte_ms(connect: Connect, n: int) -> float:
    """Median milliseconds from connect() to the sink's first byte."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        s = connect()
        with s:
            if s.recv(1) != b"!":
                raise ConnectionError("no greeting from the sink")
            times.append((time.perf_counter() - t0) * 1000)
            s.shutdown(socket.SHUT_WR)
            while s.recv(64):
                pass
    return statistics.median(times)


def cpu_seconds() -> dict[str, float]:
    """user+system CPU seconds so far of each process of the VMBusify path."""
    import psutil
    out = {}
    for name, pid in VMBUSIFY_PIDS.items():
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[name] = t.user + t.system
    return out


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


# -- the three paths --------------------------------------------------------------------------
@contextmanager
def vmbusify_path(root: Path) -> Iterator[int]:
    """Both muxes and both proxy workers (the proxy tests' harness); yields the guest proxy's
    port. The host's proxy server reaches the sink on its loopback: the harness lifts the
    built-in denial."""
    pp = start_proxies(root, ping_interval=5.0, dead_after=30.0)
    VMBUSIFY_PIDS.update({"guest mux": pp.pair.guest.pid, "host mux": pp.pair.host.pid,
                          "guest proxy": pp.workers[0].pid, "host proxy": pp.workers[1].pid})
    try:
        yield pp.guest_port
    finally:
        stop_proxies(pp)


#: The bridge's socat block size (its default, 8 KiB, makes it a weaker anchor).
SOCAT_BLOCK = 256 << 10


@contextmanager
def socat_path(root: Path, sink: int) -> Iterator[int]:
    """TCP -> socat -> Unix -> socat -> TCP; yields the entry port."""
    port, path = free_port(), root / "bridge.sock"
    procs = [
        subprocess.Popen(["socat", "-b", str(SOCAT_BLOCK), f"UNIX-LISTEN:{path},fork",
                          f"TCP:127.0.0.1:{sink}"]),
        subprocess.Popen(["socat", "-b", str(SOCAT_BLOCK),
                          f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                          f"UNIX-CONNECT:{path}"]),
    ]
    try:
        wait_port(port)
        yield port
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


@contextmanager
def ssh_path(root: Path) -> Iterator[int]:
    """A throwaway sshd on loopback and `ssh -D`; yields the SOCKS port."""
    d = root / "ssh"
    d.mkdir(mode=0o700)
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                       check=True)
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    sshd_port, socks_port = free_port(), free_port()
    (d / "sshd_config").write_text(
        f"Port {sshd_port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "UsePAM no\nStrictModes no\nPasswordAuthentication no\nPermitRootLogin yes\n"
        "AllowTcpForwarding yes\n")
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    with open(d / "sshd.log", "ab") as log:
        sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                                stderr=log)
    ssh: subprocess.Popen[bytes] | None = None
    try:
        wait_port(sshd_port)
        user = os.environ.get("USER") or "root"
        with open(d / "ssh.log", "ab") as log:
            ssh = subprocess.Popen(
                ["ssh", "-N", "-D", f"127.0.0.1:{socks_port}", "-p", str(sshd_port),
                 "-i", str(d / "user_key"), "-o", "StrictHostKeyChecking=no",
                 "-o", f"UserKnownHostsFile={d / 'known_hosts'}", "-o", "BatchMode=yes",
                 "-o", "ExitOnForwardFailure=yes", f"{user}@127.0.0.1"],
                stderr=log)
        wait_port(socks_port)
        yield socks_port
    finally:
        for p in (ssh, sshd):
            if p is not None:
                p.send_signal(signal.SIGTERM)
                p.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=1024, help="MiB per stream (default 1024)")
    ap.add_argument("--connects", type=int, default=200,
                    help="connections for the first-byte latency (default 200)")
    ap.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--only", help="run only this path (vmbusify, socat, ssh -D)")
    args = ap.parse_args()
    if args.sink:
        sink_main(args.sink)
        return
    root = Path(tempfile.mkdtemp(prefix="vmbusify-bench-proxy-"))
    sink_port = free_port()
    sink = subprocess.Popen([sys.executable, __file__, "--sink", str(sink_port)])
    results: dict[str, tuple[float, float]] = {}
    try:
        wait_port(sink_port)
        paths = {
            "vmbusify": (lambda: vmbusify_path(root), socks5_connect),
            "socat": (lambda: socat_path(root, sink_port), None),
            "ssh -D": (lambda: ssh_path(root), socks5_connect),
        }
        for name, (make, via) in paths.items():
            if args.only and name != args.only:
                continue
            with make() as port:
                connect = connector(port, via, sink_port)
                for attempt in range(100):  # warm up (the far worker may still register)
                    try:
                        throughput(connect, 16)
                        break
                    except ConnectionError:
                        if attempt == 99:
                            raise
                        time.sleep(0.2)
                cpu0 = cpu_seconds()
                mbps = throughput(connect, args.mib)
                cpu = {k: v - cpu0.get(k, 0.0) for k, v in cpu_seconds().items()}
                latency = first_byte_ms(connect, args.connects)
                results[name] = (mbps, latency)
                print(f"{name:<9} {mbps:8.0f} MB/s   connect-to-first-byte {latency:6.2f} ms "
                      "(median)", flush=True)
                if name == "vmbusify":
                    gb = args.mib * BLOCK / 1e9
                    print("          CPU seconds per GB: " + ", ".join(
                        f"{k} {v / gb:.2f}" for k, v in cpu.items()), flush=True)
    finally:
        sink.terminate()
        sink.wait(10)
        shutil.rmtree(root, ignore_errors=True)
    if len(results) < len(paths):
        return
    v = results["vmbusify"][0]
    print(f"\none stream, {args.mib} MiB: vmbusify / ssh -D = {v / results['ssh -D'][0]:.2f}x, "
          f"vmbusify / socat bridge = {v / results['socat'][0]:.2f}x")


if __name__ == "__main__":
    main()
