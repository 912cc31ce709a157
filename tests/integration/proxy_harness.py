"""Two muxes with a proxy worker on each end (no root): for the proxy tests and bench/proxy.py.

Both proxy servers reach targets on loopback (the built-in loopback denial is lifted), and
a small SOCKS5 client is here to drive them.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.integration.harness import BIN, Pair, free_port, make_pair


@dataclass
class ProxyPair:
    pair: Pair
    guest_port: int
    host_port: int
    workers: list[subprocess.Popen[bytes]]

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace")
                       for p in sorted(self.pair.root.glob("*-proxy.log")))


def start_proxies(root: Path, guest_extra: str = "", host_extra: str = "",
                  auth: tuple[str, str] | None = None, ping_interval: float = 0.5,
                  dead_after: float = 3.0, control_extra: str = "") -> ProxyPair:
    """A mux pair (``make_pair``'s tunnel settings) with a proxy worker on each end; returns
    once a request through the guest's proxy reaches the host's."""
    pair = make_pair(root, ping_interval, dead_after, control_extra=control_extra)
    guest_port, host_port = free_port(), free_port()
    for mux, port, extra in ((pair.guest, guest_port, guest_extra),
                             (pair.host, host_port, host_extra)):
        with open(mux.config_path, "a") as fh:
            fh.write(f'[proxy]\nlisten = "127.0.0.1:{port}"\ndefault_deny = false\n'
                     f'connect_timeout = 3.0\n{extra}')
    workers = []
    for m in (pair.guest, pair.host):
        with open(root / f"{m.name}-proxy.log", "ab") as log:  # the child keeps its own fd
            workers.append(subprocess.Popen(
                [str(BIN / "vmbusify"), "worker", "proxy", "--config", str(m.config_path)],
                stdout=log, stderr=subprocess.STDOUT))
    pp = ProxyPair(pair, guest_port, host_port, workers)
    # Ready when a request through the guest reaches the host's proxy server.
    deadline = time.monotonic() + 30
    while True:
        try:
            s, code, _ = socks5_open(guest_port, "127.0.0.1", 1, auth=auth)
            s.close()
        except OSError:
            code = -1
        if code == 5:  # the far side really tried: both workers are registered
            return pp
        if time.monotonic() > deadline:
            stop_proxies(pp)
            raise AssertionError(f"proxies not ready (last reply {code}):\n{pp.logs()}")
        time.sleep(0.2)


def stop_proxies(pp: ProxyPair) -> None:
    for w in pp.workers:
        if w.poll() is None:
            w.terminate()
    codes = [w.wait(10) for w in pp.workers]
    pp.pair.stop()
    assert codes == [0, 0], f"proxy workers exited {codes} on SIGTERM"


# -- a small SOCKS5 client ----------------------------------------------------------------------
def _exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {out!r}")
        out += chunk
    return out


def socks5_open(proxy: int, host: str, port: int, auth: tuple[str, str] | None = None,
                cmd: int = 1) -> tuple[socket.socket, int, bytes]:
    """(socket, reply code, bound address bytes) after a SOCKS5 request."""
    s = socket.create_connection(("127.0.0.1", proxy), timeout=30)
    s.sendall(b"\x05\x01" + (b"\x02" if auth else b"\x00"))
    method = _exact(s, 2)
    if auth:
        assert method == b"\x05\x02"
        u, p = auth[0].encode(), auth[1].encode()
        s.sendall(b"\x01" + bytes([len(u)]) + u + bytes([len(p)]) + p)
        if _exact(s, 2) != b"\x01\x00":
            return s, -2, b""
    else:
        assert method == b"\x05\x00", method
    try:
        addr = b"\x01" + socket.inet_aton(host)
    except OSError:
        addr = b"\x03" + bytes([len(host)]) + host.encode()
    s.sendall(b"\x05" + bytes([cmd]) + b"\x00" + addr + struct.pack(">H", port))
    head = _exact(s, 4)
    bound = _exact(s, {1: 4, 4: 16}.get(head[3], 0) + 2)
    return s, head[1], bound
