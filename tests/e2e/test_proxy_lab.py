"""The proxy in the lab, with real clients: VMs reach the external namespace through the host,
and the host reaches services inside VMs (root; uses the ``lab`` fixture).

Every address and port comes from the lab's layout and configs (the lab instance decides
them). Packets go only to loopback and the lab's namespaces; names resolve from the lab's
hosts files (the host's proxy server reads the external namespace's, by its config) or the
lab's DNS server in the external namespace, which has no upstream.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmbusify.config import load_config
from vmbusify.lab.layout import EXT_NAME
from vmbusify.lab.netns import ns_argv
from vmbusify.lab.testing import BIN, LabHandle

PY = sys.executable
VM = "vm1"
GUEST_PROXY = "127.0.0.1:6542"  # the guest's default (its own namespace)
WEB_PORT = 18080
BULK_PORT = 18081


NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def host_proxy(lab: LabHandle) -> str:
    return load_config(lab.layout.host.config_path).proxy.listen


def guest_proxy(lab: LabHandle) -> str:
    return load_config(lab.layout.vm(VM).config_path).proxy.listen


@dataclass
class Service:
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def spawn(netns: str | None, argv: list[str], ready_port: tuple[str, int] | None = None
          ) -> Service:
    """A process in ``netns``; waits until it listens on ``ready_port`` (checked from there)."""
    svc = Service(subprocess.Popen(ns_argv(netns, argv), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    if ready_port:
        probe = (f"import socket,time\nfor _ in range(100):\n try:\n"
                 f"  socket.create_connection({ready_port!r},timeout=1).close();break\n"
                 f" except OSError: time.sleep(0.1)\nelse: raise SystemExit(1)")
        subprocess.run(ns_argv(netns, [PY, "-c", probe]), check=True, timeout=30)
    return svc


# The bulk server in the external namespace: "UP n\n" then n bytes -> "sha\n";
# "DOWN n\n" -> n bytes (block i = 8-byte counter + a fixed pseudo-random rest).
BULK_SERVER = textwrap.dedent("""
    import hashlib, os, socket, struct, sys, threading
    BLOCK = 1 << 20
    base = hashlib.sha256(b"seed").digest() * (BLOCK // 32)
    def block(i): return struct.pack(">Q", i) + base[8:]
    def handle(c):
        with c:
            f = c.makefile("rb")
            cmd, n = f.readline().split()
            n = int(n)
            if cmd == b"UP":
                h = hashlib.sha256(); got = 0
                while got < n:
                    chunk = f.read1(1 << 20)
                    if not chunk: break
                    h.update(chunk); got += len(chunk)
                c.sendall(f"{got} {h.hexdigest()}\\n".encode())
            else:
                for i in range(n // BLOCK): c.sendall(block(i))
                c.shutdown(socket.SHUT_WR)
                while c.recv(65536): pass
    s = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=1024)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
""")

# A SOCKS5 client for scripts run inside a VM.
SOCKS_CLIENT = textwrap.dedent("""
    import socket, struct
    def socks(proxy, host, port, cmd=1):
        ph, pp = proxy.rsplit(":", 1)
        s = socket.create_connection((ph, int(pp)), timeout=60)
        s.sendall(b"\\x05\\x01\\x00"); assert s.recv(2) == b"\\x05\\x00"
        s.sendall(b"\\x05" + bytes([cmd]) + b"\\x00\\x03" + bytes([len(host)]) + host.encode()
                  + struct.pack(">H", port))
        head = b""
        while len(head) < 10: head += s.recv(10 - len(head))
        if head[1] != 0: raise SystemExit(f"reply {head[1]}")
        return s, socket.inet_ntoa(head[4:8]), struct.unpack(">H", head[8:10])[0]
""")


@pytest.fixture(scope="module")
def ext(lab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, bytes]]:
    """A web server and the bulk server in the external namespace; yields (ip, blob)."""
    e = lab.layout.external
    www = tmp_path_factory.mktemp("ext-www")
    blob = os.urandom(2 << 20)
    (www / "blob").write_bytes(blob)
    script = www / "bulk.py"
    script.write_text(BULK_SERVER)
    web = spawn(e.netns, [PY, "-m", "http.server", "--bind", e.ip, "--directory", str(www),
                          str(WEB_PORT)], (e.ip, WEB_PORT))
    bulk = spawn(e.netns, [PY, str(script), e.ip, str(BULK_PORT)], (e.ip, BULK_PORT))
    yield e.ip, blob
    web.stop()
    bulk.stop()


def in_vm(lab: LabHandle, argv: list[str], timeout: float = 120
          ) -> subprocess.CompletedProcess[str]:
    return lab.run_in_vm(VM, argv, check=False, timeout=timeout)


def curl_sha(lab: LabHandle, opts: str, url: str) -> str:
    # pipefail: curl's own failure (and its message) must show, not sha256sum's of nothing
    out = in_vm(lab, ["bash", "-c",
                      f"set -o pipefail; curl -sS --max-time 60 {opts} {url} | sha256sum"])
    assert out.returncode == 0, f"curl {opts} {url}: exit {out.returncode}: {out.stderr}"
    return out.stdout.split()[0]


def test_vm_reaches_the_external_namespace_with_every_client(lab: LabHandle,
                                                             ext: tuple[str, bytes]) -> None:
    ip, blob = ext
    want = hashlib.sha256(blob).hexdigest()
    gp = guest_proxy(lab)
    for opts, host in ((f"--socks5-hostname {gp}", EXT_NAME),  # name resolved on the host
                       (f"--socks5 {gp}", ip),
                       (f"-x socks4a://{gp}", EXT_NAME),
                       (f"-x http://{gp}", EXT_NAME),            # plain absolute-URI request
                       (f"-p -x http://{gp}", EXT_NAME)):        # CONNECT
        assert curl_sha(lab, opts, f"http://{host}:{WEB_PORT}/blob") == want, opts
    # http_proxy in the environment, as apt, pip and git follow it
    out = in_vm(lab, ["env", f"http_proxy=http://{gp}", "curl", "-sS", "--max-time", "30",
                      "-o", "/dev/null", "-w", "%{http_code}",
                      f"http://{EXT_NAME}:{WEB_PORT}/blob"])
    assert out.stdout == "200", out.stderr


def test_reply_codes_refused_and_policy(lab: LabHandle, ext: tuple[str, bytes]) -> None:
    gp = guest_proxy(lab)
    # a closed port in the external namespace: the far side's real outcome, reply 5
    out = in_vm(lab, ["curl", "-sS", "--max-time", "20", "--socks5-hostname", gp,
                      f"http://{EXT_NAME}:1/"])
    assert out.returncode == 97 and "(5)" in out.stderr, out.stderr
    # the host's own loopback, by address and by name: refused by default policy, reply 2
    for host in ("127.0.0.1", "localhost"):
        out = in_vm(lab, ["curl", "-sS", "--max-time", "20", "--socks5-hostname", gp,
                          f"http://{host}:{lab_control_port(lab)}/"])
        assert out.returncode == 97 and "(2)" in out.stderr, (host, out.stderr)
    # the host's own address on the lab's network: refused before any connect, reply 2 (a
    # connect would have been refused by the closed port, reply 5)
    out = in_vm(lab, ["curl", "-sS", "--max-time", "20", "--socks5-hostname", gp,
                      f"http://{lab.layout.external.host_ip}:{lab_control_port(lab)}/"])
    assert out.returncode == 97 and "(2)" in out.stderr, out.stderr
    out = in_vm(lab, ["curl", "-sS", "--max-time", "20", "-x", f"http://{gp}",
                      "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1/"])
    assert out.stdout == "403", out.stdout
    log = (lab.layout.host.run_dir / "proxy.log").read_text(errors="replace")
    assert "egress refused by policy" in log and "Traceback" not in log


def test_a_vm_reaches_no_other_vm_through_the_host_proxy(lab: LabHandle) -> None:
    """Issue 12 item 8: vm2's subnet address (also in NAT64 and 6to4 dress) is refused to vm1
    by the host's proxy server (reply 2) for being in the subnet's range, before any allow
    rule and before any connect."""
    net = ipaddress.ip_network(load_config(lab.layout.host.config_path).subnet.cidr)
    vms = json.loads(lab.ctl("status", "--json").stdout)["vms"]
    held = next(v for v in vms if v["vmid"] == "vm2")["ips"]
    target = next((ip for ip in held if ipaddress.ip_address(ip) in net), str(net[2]))
    v4 = ipaddress.IPv4Address(target)
    sixtofour = ipaddress.IPv6Address(b"\x20\x02" + v4.packed + bytes(10))
    for host in (target, f"[64:ff9b::{target}]", f"[{sixtofour}]"):
        out = in_vm(lab, ["curl", "-sS", "--max-time", "20", "--socks5-hostname",
                          guest_proxy(lab), f"http://{host}:22/"])
        assert out.returncode == 97 and "(2)" in out.stderr, (host, out.stderr)
    log = (lab.layout.host.run_dir / "proxy.log").read_text(errors="replace")
    assert f"{target} is in the subnet's range {net}" in log
    assert f"(inside {ipaddress.IPv6Address(f'64:ff9b::{target}')})" in log
    assert f"(inside {sixtofour})" in log


def lab_control_port(lab: LabHandle) -> int:
    """A port the host listens on (on loopback): its proxy's (the command listener is a
    Unix socket now)."""
    return int(host_proxy(lab).rsplit(":", 1)[1])


def test_one_gib_each_way_sha256(lab: LabHandle, ext: tuple[str, bytes]) -> None:
    size = 1 << 30
    script = SOCKS_CLIENT + textwrap.dedent(f"""
        import hashlib, struct, sys, threading
        BLOCK = 1 << 20
        base = hashlib.sha256(b"seed").digest() * (BLOCK // 32)
        def block(i): return struct.pack(">Q", i) + base[8:]
        n = {size}
        up, _, _ = socks({guest_proxy(lab)!r}, {EXT_NAME!r}, {BULK_PORT})
        down, _, _ = socks({guest_proxy(lab)!r}, {EXT_NAME!r}, {BULK_PORT})
        res = {{}}
        def send():
            up.sendall(f"UP {{n}}\\n".encode()); h = hashlib.sha256()
            for i in range(n // BLOCK):
                b = block(i); h.update(b); up.sendall(b)
            up.shutdown(1); res["sent"] = h.hexdigest()
            res["far"] = up.makefile("rb").readline().decode().split()
        t = threading.Thread(target=send); t.start()
        down.sendall(f"DOWN {{n}}\\n".encode()); h = hashlib.sha256(); got = 0
        while chunk := down.recv(1 << 20):
            h.update(chunk); got += len(chunk)
        want = hashlib.sha256()
        for i in range(n // BLOCK): want.update(block(i))
        t.join()
        print(got, h.hexdigest() == want.hexdigest(), res["far"] == [str(n), res["sent"]])
    """)
    out = in_vm(lab, [PY, "-c", script], timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(size), "True", "True"], out.stdout


def test_500_connections_at_once_through_one_vm(lab: LabHandle, ext: tuple[str, bytes]) -> None:
    script = textwrap.dedent(f"""
        import asyncio, hashlib, struct
        async def one(i):
            r, w = await asyncio.open_connection(*{guest_proxy(lab).rsplit(':', 1)!r})
            w.write(b"\\x05\\x01\\x00"); assert await r.readexactly(2) == b"\\x05\\x00"
            host = {EXT_NAME!r}.encode()
            w.write(b"\\x05\\x01\\x00\\x03" + bytes([len(host)]) + host
                    + struct.pack(">H", {BULK_PORT}))
            head = await r.readexactly(10)
            if head[1]: return False
            data = (b"%d." % i) * 2000
            w.write(b"UP %d\\n" % len(data) + data); w.write_eof()
            answer = await r.read(); w.close()
            return answer == f"{{len(data)}} {{hashlib.sha256(data).hexdigest()}}\\n".encode()
        async def main():
            return await asyncio.gather(*(one(i) for i in range(500)), return_exceptions=True)
        res = asyncio.run(main())
        print(sum(1 for x in res if x is True), [repr(x) for x in res if x is not True][:3])
    """)
    out = in_vm(lab, [PY, "-c", script], timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("500 "), out.stdout


def test_udp_associate_carries_dns_from_a_vm(lab: LabHandle, ext: tuple[str, bytes]) -> None:
    ip, _ = ext
    script = SOCKS_CLIENT + textwrap.dedent(f"""
        import socket, struct
        ctl, rhost, rport = socks({guest_proxy(lab)!r}, "0.0.0.0", 0, cmd=3)
        q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
        q += b"".join(bytes([len(p)]) + p.encode() for p in {EXT_NAME!r}.split(".")) + b"\\0"
        q += struct.pack(">HH", 1, 1)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(10)
        head = b"\\0\\0\\0\\x01" + socket.inet_aton({ip!r}) + struct.pack(">H", 53)
        u.sendto(head + q, (rhost, rport))
        data, _ = u.recvfrom(65535)
        assert data[:10] == head, data[:10]
        answer = data[10:]
        assert answer[:2] == b"\\x12\\x34" and answer[3] & 0xF == 0, answer[:4]
        print(socket.inet_ntoa(answer[-4:]))
    """)
    out = in_vm(lab, [PY, "-c", script], timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ip


def test_host_reaches_vm_services_by_address_and_by_vmid(lab: LabHandle,
                                                         tmp_path: Path) -> None:
    vm = lab.layout.vm(VM)
    (tmp_path / "hello").write_text("hello from inside\n")
    on_sdn = spawn(vm.netns, [PY, "-m", "http.server", "--bind", vm.sdn_ip, "--directory",
                              str(tmp_path), "18090"], (vm.sdn_ip, 18090))
    on_lo = spawn(vm.netns, [PY, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                             str(tmp_path), "18091"], ("127.0.0.1", 18091))
    hp = host_proxy(lab)
    try:
        for opts, url in ((["--socks5", hp], f"http://{vm.sdn_ip}:18090/hello"),  # vmid-by-ip
                          (["--socks5-hostname", hp], f"http://{VM}.vmbusify:18091/hello"),
                          (["-x", f"http://{hp}"], f"http://{VM}.vmbusify:18091/hello")):
            out = lab.run_on_host(["curl", "-sS", "--max-time", "20", *opts, url], check=False)
            assert out.stdout == "hello from inside\n", (opts, out.stderr)
        # not for every user of the host: root and group vmbusify only, others need
        # credentials (SOCKS reply 2 "not allowed by ruleset"; HTTP 407 asking for Basic)
        url = f"http://{VM}.vmbusify:18091/hello"
        out = lab.run_on_host([*NOBODY, "curl", "-sS", "--max-time", "20", "--socks5-hostname",
                               hp, url], check=False)
        assert out.returncode == 97 and out.stderr.rstrip().endswith("(2)"), out.stderr
        out = lab.run_on_host([*NOBODY, "curl", "-sS", "--max-time", "20", "-o", "/dev/null",
                               "-w", "%{http_code}", "-x", f"http://{hp}", url], check=False)
        assert out.stdout == "407", out
        # status: open connections and bytes per VM (the worker reports every 2 s)
        deadline = time.monotonic() + 10
        while True:
            st = json.loads(lab.ctl("status", "--json").stdout)
            stats = next(w for w in st["workers"] if w["name"] == "proxy")["stats"]
            vm_stats = stats.get("vms", {}).get(VM, {})
            if vm_stats.get("opened", 0) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert vm_stats["opened"] >= 3 and vm_stats["bytes_out"] > 0, stats
        assert "proxy" in lab.ctl("status").stdout
    finally:
        on_sdn.stop()
        on_lo.stop()


@pytest.mark.skipif(shutil.which("ncat") is None or (shutil.which("sshd") is None
                    and not Path("/usr/sbin/sshd").exists()), reason="needs ncat and sshd")
def test_ssh_from_the_host_into_a_vm_through_the_proxy(lab: LabHandle, tmp_path: Path) -> None:
    vm = lab.layout.vm(VM)
    d = tmp_path / "ssh"
    d.mkdir(mode=0o700)
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                       check=True)
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    (d / "sshd_config").write_text(
        f"Port 2222\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "UsePAM no\nStrictModes no\nPasswordAuthentication no\nPermitRootLogin yes\n")
    os.makedirs("/run/sshd", exist_ok=True)
    sshd = spawn(vm.netns, ["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                 ("127.0.0.1", 2222))
    hp_host, hp_port = host_proxy(lab).rsplit(":", 1)
    try:
        out = lab.run_on_host([
            "ssh", "-i", str(d / "user_key"), "-p", "2222", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={d / 'known'}",
            "-o", (f"ProxyCommand=ncat --proxy {hp_host}:{hp_port} --proxy-type socks5 "
                   "--proxy-dns remote %h %p"),
            f"root@{VM}.vmbusify", "cat /proc/sys/kernel/hostname; ip -brief addr show sdn0"],
            check=False, timeout=60)
        assert out.returncode == 0, out.stderr
        assert vm.sdn_ip in out.stdout  # the command ran inside the VM's namespace
    finally:
        sshd.stop()


def test_forward_for_programs_that_cannot_speak_socks(lab: LabHandle, tmp_path: Path) -> None:
    vm = lab.layout.vm(VM)
    (tmp_path / "hello").write_text("forwarded\n")
    svc = spawn(vm.netns, [PY, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                           str(tmp_path), "18092"], ("127.0.0.1", 18092))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
    argv, env = lab_command_host(lab, [str(BIN / "vmbusifyctl"), "forward", VM,
                                       f"{local}:127.0.0.1:18092"])
    fwd = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            out = subprocess.run(["curl", "-sS", "--max-time", "10",
                                  f"http://127.0.0.1:{local}/hello"], capture_output=True,
                                 text=True, check=False)
            if out.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert out.stdout == "forwarded\n", out.stderr
        out = subprocess.run([*NOBODY, "curl", "-sS", "--max-time", "10",
                              f"http://127.0.0.1:{local}/hello"], capture_output=True,
                             text=True, check=False)
        assert out.returncode != 0 and "forwarded" not in out.stdout, out
        bad = lab.ctl("forward", VM, "nonsense", check=False)
        assert bad.returncode != 0 and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    finally:
        fwd.send_signal(signal.SIGINT)
        fwd.wait(10)
        svc.stop()


def lab_command_host(lab: LabHandle, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    from vmbusify.lab.access import command
    return command("host", argv)
