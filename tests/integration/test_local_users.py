"""Who may use what, as local users see it (issue 12): the host proxy, the command listener
and ``vmbusifyctl forward``, tried as root, as ``nobody`` and as a member of the granted
group (setpriv), and a squatter on the listener's address who must never get the token.

Root only (setpriv, useradd). The group and its member are made for this module (``vbtgrp``
and ``vbtuser``, removed afterwards) and named in the config (``[proxy] group``, ``[control]
group``): the same code as the default group ``vmbusify``, without making a group that other
stacks on this shared machine would start granting things to.
"""

from __future__ import annotations

import grp
import http.server
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import BIN, free_port
from tests.integration.proxy_harness import ProxyPair, start_proxies, stop_proxies

pytestmark = pytest.mark.root

GROUP, USER = "vbtgrp", "vbtuser"
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
MEMBER = ["setpriv", f"--reuid={USER}", "--regid=nogroup", "--init-groups"]
ROOT: list[str] = []
PY = shutil.which("python3", path="/usr/bin:/bin") or "python3"
BODY = b"hello from inside vm1\n"
PASSWORD = "wonder land"

#: A SOCKS5 CONNECT, as a user's program makes it; prints the reply code (or why not).
SOCKS5 = r"""
import socket, struct, sys
port, host, tport, auth = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:6]
s = socket.create_connection(("127.0.0.1", port), timeout=20)
s.sendall(b"\x05\x01" + (b"\x02" if auth else b"\x00"))
if s.recv(2)[1:] == b"\x02":
    u, p = auth[0].encode(), auth[1].encode()
    s.sendall(b"\x01" + bytes([len(u)]) + u + bytes([len(p)]) + p)
    if s.recv(2) != b"\x01\x00":
        print("auth-failed"); sys.exit()
h = host.encode()
s.sendall(b"\x05\x01\x00\x03" + bytes([len(h)]) + h + struct.pack(">H", tport))
print(s.recv(4)[1])
"""

#: Connect, send a request, print what came back (b'' when closed at once, "reset" when
#: reset: a refused connection is aborted, and the reset may come first).
FETCH = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
out = b""
try:
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    while chunk := s.recv(65536):
        out += chunk
except ConnectionResetError:
    print("reset"); sys.exit()
print(repr(out))
"""

#: A squatter: listens where root's command listener should be, answers 200, and writes
#: every byte it receives into a file.
SQUATTER = r"""
import os, socket, sys
kind, where, log = sys.argv[1], sys.argv[2], sys.argv[3]
if kind == "unix":
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(where)
    os.chmod(where, 0o666)
else:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", int(where)))
srv.listen(16)
open(log + ".ready", "w").close()
while True:
    c, _ = srv.accept()
    c.settimeout(3)
    got = b""
    try:
        while b"\r\n\r\n" not in got:
            chunk = c.recv(4096)
            if not chunk:
                break
            got += chunk
    except OSError:
        pass
    with open(log, "ab") as fh:
        fh.write(got + b"\n--\n")
    try:
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    except OSError:
        pass
    c.close()
"""


def run(argv: list[str], timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          check=False, cwd="/", **kw)


def as_user(who: list[str], argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return run([*who, *argv], **kw)


class _Web(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class World:
    base: Path
    proxies: ProxyPair
    web_port: int
    control: subprocess.Popen[bytes]

    @property
    def host_config(self) -> str:
        return str(self.proxies.pair.host.config_path)

    def ctl(self, who: list[str], *args: str) -> subprocess.CompletedProcess[str]:
        return as_user(who, [str(BIN / "vmbusifyctl"), "--config", self.host_config, *args])

    def curl(self, who: list[str], *args: str) -> subprocess.CompletedProcess[str]:
        return as_user(who, ["curl", "-sS", "--max-time", "20", *args])

    def socks(self, who: list[str], *auth: str) -> str:
        p = as_user(who, [PY, "-c", SOCKS5, str(self.proxies.host_port), "vm1.vmbusify",
                          str(self.web_port), *auth])
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()


@pytest.fixture(scope="module")
def accounts() -> Iterator[None]:
    made_group = run(["getent", "group", GROUP]).returncode != 0
    if made_group:
        assert run(["groupadd", "--system", GROUP]).returncode == 0
    made_user = run(["getent", "passwd", USER]).returncode != 0
    if made_user:
        p = run(["useradd", "--system", "--no-create-home", "--gid", "nogroup", "--groups",
                 GROUP, "--shell", "/usr/sbin/nologin", USER])
        assert p.returncode == 0, p.stderr
    try:
        yield
    finally:
        if made_user:
            run(["userdel", USER])
        if made_group:
            run(["groupdel", GROUP])


@pytest.fixture(scope="module")
def world(accounts: None) -> Iterator[World]:
    # Not under pytest's tmp_path (0700 all the way up): the group must be able to walk in.
    base = Path(tempfile.mkdtemp(prefix="vb-users-", dir="/tmp"))
    base.chmod(0o711)
    creds = base / "proxy.credentials"
    creds.write_text(f"# user:password\nalice:{PASSWORD}\n")
    creds.chmod(0o600)
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Web)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    pp = start_proxies(base, host_extra=f'group = "{GROUP}"\ncredentials_file = "{creds}"\n',
                       control_extra=f'group = "{GROUP}"\n')
    with open(base / "control.log", "ab") as log:
        control = subprocess.Popen([str(BIN / "vmbusify"), "control", "--config",
                                    str(pp.pair.host.config_path)],
                                   stdout=log, stderr=subprocess.STDOUT)
    w = World(base, pp, web.server_address[1], control)
    try:
        deadline = time.monotonic() + 30
        while (p := w.ctl(ROOT, "list")).returncode != 0:
            assert time.monotonic() < deadline, p.stderr
            time.sleep(0.3)
        yield w
    finally:
        control.terminate()
        control.wait(15)
        stop_proxies(pp)
        web.shutdown()
        shutil.rmtree(base, ignore_errors=True)


# -- the host proxy ------------------------------------------------------------------------

def test_host_proxy_refuses_nobody_without_credentials(world: World) -> None:
    assert world.socks(NOBODY) == "2"  # "connection not allowed by ruleset"
    url = f"http://vm1.vmbusify:{world.web_port}/"
    p = world.curl(NOBODY, "-o", "/dev/null", "-D", "-", "-x",
                   f"http://127.0.0.1:{world.proxies.host_port}", url)
    assert p.stdout.startswith("HTTP/1.1 407"), p.stdout
    assert 'Proxy-Authenticate: Basic realm="vmbusify"' in p.stdout
    p = world.curl(NOBODY, "-x", f"socks4a://127.0.0.1:{world.proxies.host_port}", url)
    assert p.returncode != 0 and BODY.decode() not in p.stdout
    p = world.curl(NOBODY, "--socks5-hostname", f"127.0.0.1:{world.proxies.host_port}", url)
    assert p.returncode == 97 and p.stderr.rstrip().endswith("(2)"), p.stderr  # ruleset
    logs = world.proxies.logs()
    assert "uid=65534" in logs and "neither root nor in group vbtgrp" in logs


def test_host_proxy_serves_nobody_with_credentials(world: World) -> None:
    hp = world.proxies.host_port
    url = f"http://vm1.vmbusify:{world.web_port}/"
    assert world.socks(NOBODY, "alice", PASSWORD) == "0"
    assert world.socks(NOBODY, "alice", "wrong") == "auth-failed"
    p = world.curl(NOBODY, "--socks5-hostname", f"127.0.0.1:{hp}", "--proxy-user",
                   f"alice:{PASSWORD}", url)
    assert p.returncode == 0 and p.stdout == BODY.decode(), p.stderr
    p = world.curl(NOBODY, "-x", f"http://127.0.0.1:{hp}", "--proxy-user", f"alice:{PASSWORD}",
                   url)
    assert p.returncode == 0 and p.stdout == BODY.decode(), p.stderr
    p = world.curl(NOBODY, "-o", "/dev/null", "-w", "%{http_code}", "-x",
                   f"http://127.0.0.1:{hp}", "--proxy-user", "alice:wrong", url)
    assert p.stdout == "407"


@pytest.mark.parametrize("who", [ROOT, MEMBER], ids=["root", "group member"])
def test_host_proxy_serves_root_and_the_group_without_credentials(world: World,
                                                                   who: list[str]) -> None:
    assert world.socks(who) == "0"
    url = f"http://vm1.vmbusify:{world.web_port}/"
    for proxy in (f"socks5h://127.0.0.1:{world.proxies.host_port}",
                  f"http://127.0.0.1:{world.proxies.host_port}"):
        p = world.curl(who, "-x", proxy, url)
        assert p.returncode == 0 and p.stdout == BODY.decode(), (proxy, p.stderr)


# -- the command listener ------------------------------------------------------------------

def test_listener_closed_to_nobody_open_to_the_group(world: World) -> None:
    cdir = world.base / "host-control"
    gid = grp.getgrnam(GROUP).gr_gid
    for path, mode in ((cdir, 0o750), (cdir / "control.sock", 0o660),
                       (cdir / "control.token", 0o640)):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, gid, mode), path
    run_dir = os.stat(world.base / "host-run")  # the ZeroMQ endpoints: root alone
    assert stat.S_IMODE(run_dir.st_mode) == 0o700
    p = world.ctl(NOBODY, "status")
    # One line: what was refused and the access needed (cli/locate.py, issue 17).
    assert p.returncode == 1 and (f"permission denied on {cdir / 'control.token'}: "
                                  f"vmbusifyctl needs root or group {GROUP}") in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    poke = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ntry:\n"
            "    s.connect(sys.argv[1]); print('connected')\n"
            "except OSError as e:\n    print(e.errno)\n")
    p = as_user(NOBODY, [PY, "-c", poke, str(cdir / "control.sock")])
    assert p.stdout.strip() == "13", p  # EACCES
    p = world.ctl(MEMBER, "list")
    assert p.returncode == 0 and p.stdout.startswith("vm1\tconnected"), p.stderr


def _squat(world: World, kind: str, where: str, name: str) -> tuple[subprocess.Popen[bytes],
                                                                    Path]:
    out = world.base / f"{name}-out"
    out.mkdir()
    os.chown(out, 65534, 65534)
    log = out / "received"
    squatter = subprocess.Popen([*NOBODY, PY, "-c", SQUATTER, kind, where, str(log)], cwd="/")
    deadline = time.monotonic() + 10
    while not Path(f"{log}.ready").exists():
        assert squatter.poll() is None and time.monotonic() < deadline, "squatter failed"
        time.sleep(0.05)
    return squatter, log


def _config(world: World, name: str, listen: str, state_dir: Path) -> str:
    path = world.base / f"{name}.toml"
    path.write_text(f'role = "host"\nstate_dir = "{state_dir}"\n[control]\nlisten = "{listen}"\n'
                    '[[vms]]\nvmid = "vm1"\naddress = "unix:/nonexistent"\n')
    return str(path)


def _root_clients_refuse(config: str, token: str, log: Path, why: str) -> None:
    for argv, code in (([str(BIN / "vmbusifyctl"), "--config", config, "status"], 1),
                       ([str(BIN / "vmbusifyexec"), "--config", config, "vm1", "true"], 255),
                       ([str(BIN / "vmbusifyexec"), "--config", config, "-d", "vm1", "true"],
                        255)):
        p = run(argv)
        assert p.returncode == code, (argv, p.stderr)
        assert "refusing to send the control token" in p.stderr and why in p.stderr, p.stderr
        assert p.stderr.count("\n") == 1, p.stderr
    got = log.read_bytes() if log.exists() else b""
    assert token.encode() not in got and b"authorization" not in got.lower(), got


def _token_file(path: Path) -> str:
    token = f"root-secret-{os.getpid()}"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


def test_token_never_sent_to_a_squatter_in_a_directory_it_owns(world: World) -> None:
    d = world.base / "squat1"
    d.mkdir()
    os.chown(d, 65534, 65534)
    token = _token_file(d / "control.token")  # root's token, left there by an earlier start
    squatter, log = _squat(world, "unix", str(d / "control.sock"), "squat1")
    try:
        config = _config(world, "squat1", f"unix:{d}/control.sock", world.base / "nostate")
        _root_clients_refuse(config, token, log, "is owned by uid 65534")
    finally:
        squatter.kill()
        squatter.wait()


def test_token_never_sent_to_a_squatter_behind_root_owned_files(world: World) -> None:
    """Directory and socket file root's, the process listening nobody's: SO_PEERCRED
    tells."""
    d = world.base / "squat2"
    d.mkdir()
    os.chown(d, 65534, 65534)
    squatter, log = _squat(world, "unix", str(d / "control.sock"), "squat2")
    try:
        os.chown(d / "control.sock", 0, 0)
        os.chown(d, 0, 0)
        d.chmod(0o755)
        token = _token_file(d / "control.token")
        config = _config(world, "squat2", f"unix:{d}/control.sock", world.base / "nostate")
        _root_clients_refuse(config, token, log, "runs as uid 65534")
    finally:
        squatter.kill()
        squatter.wait()


def test_token_never_sent_to_a_tcp_squatter(world: World) -> None:
    """The issue's demonstration: nobody binds the TCP port first."""
    port = free_port()
    state = world.base / "tcp-state"
    state.mkdir(mode=0o700)
    token = _token_file(state / "control.token")
    squatter, log = _squat(world, "tcp", str(port), "squat3")
    try:
        config = _config(world, "squat3", f"tcp:127.0.0.1:{port}", state)
        _root_clients_refuse(config, token, log, "held by uid 65534")
    finally:
        squatter.kill()
        squatter.wait()


# -- vmbusifyctl forward -------------------------------------------------------------------

def test_forward_refuses_nobody(world: World) -> None:
    port = free_port()
    fwd = subprocess.Popen([str(BIN / "vmbusifyctl"), "--config", world.host_config, "forward",
                            "vm1", f"{port}:localhost:{world.web_port}"],
                           stderr=subprocess.PIPE, cwd="/")
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert fwd.poll() is None and time.monotonic() < deadline, "forward failed"
                time.sleep(0.1)
        for who, expect in ((ROOT, True), (MEMBER, True), (NOBODY, False)):
            p = as_user(who, [PY, "-c", FETCH, str(port)])
            assert p.returncode == 0, p.stderr
            assert ("hello from inside vm1" in p.stdout) is expect, (who, p.stdout)
            if not expect:
                assert p.stdout.strip() in ("b''", "reset"), p.stdout
    finally:
        fwd.terminate()
        _, err = fwd.communicate(timeout=15)
    assert b"refused a connection from uid 65534" in err, err
