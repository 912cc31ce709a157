"""Guests are upgraded last: this checkout's host stack serves a v0.1.0 guest stack (root).

For this module vm2 runs the whole guest stack of the previous release (mux, control, exec,
proxy and subnet under its own supervisord with v0.1.0's conf/, exported from git by
``vmbusify lab up --guest-release vm2=v0.1.0``) while vm1 and the host run this checkout; at
the end vm2 goes back to the release it ran before. The lab is switched once for the module
(a few seconds: vm2's stack and the host's programs restart). Everything an operator does with
vm2 is checked as a user sees it: status, exec (exit statuses, stdin, errors), the proxy both
ways and the virtual subnet. Skipped when the tag is not in this checkout (a shallow clone).

Packets go only to loopback and the lab's namespaces; names resolve from the lab's files.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import vmbusify
from vmbusify.config import load_config
from vmbusify.errors import LabError
from vmbusify.lab.access import command
from vmbusify.lab.external import WEB_GREETING
from vmbusify.lab.layout import EXT_NAME, SUBNET_CIDR, LabLayout, guest_config
from vmbusify.lab.netns import ns_argv
from vmbusify.lab.release import commit_of, config_error, export
from vmbusify.lab.testing import BIN, LabHandle, lab_status, vm_states
from vmbusify.lab.testing import vmbusify as vmbusify_cli

#: The previous release: a host of this checkout must serve its guests.
OLD_RELEASE = "v0.1.0"
OLD = "vm2"
NEW = "vm1"
#: v0.1.0's guest proxy listens on its default, in the VM's own namespace.
GUEST_PROXY = "127.0.0.1:6542"
SERVICE_PORT = 18095
EXEC = str(BIN / "vmbusifyexec")
PY = sys.executable
MIB = 1 << 20


def _tag_missing() -> str | None:
    try:
        commit_of(OLD_RELEASE)
    except LabError as exc:
        return str(exc)
    return None


_MISSING = _tag_missing()
pytestmark = pytest.mark.skipif(_MISSING is not None,
                                reason=f"needs the tag {OLD_RELEASE}: {_MISSING}")


# --- without root: the config the lab writes for an old guest -----------------------------


def test_the_release_takes_the_old_shape_and_refuses_the_new(tmp_path: Path) -> None:
    """v0.1.0's own loader: the lab's current guest config is refused (a key it does not
    know), the 0.1.0 shape is taken; so the lab must and does fall back to it."""
    layout = LabLayout(tmp_path)
    vm = layout.vm(OLD)
    vm.dir.mkdir(parents=True)
    release, exported = export(OLD_RELEASE, layout)
    assert exported and (release.tree / "vmbusify" / "config.py").is_file()
    assert export(OLD_RELEASE, layout) == (release, False)  # the same commit: kept
    error = config_error(release, guest_config(vm), vm.dir)
    assert error is not None and "unknown key 'key_file'" in error
    assert config_error(release, guest_config(vm, first_release=True), vm.dir) is None
    assert list(vm.dir.iterdir()) == []  # the check leaves no file behind


# --- the lab --------------------------------------------------------------------------------


def _exec_env() -> dict[str, str]:
    return command("host", ["true"])[1]


def run_exec(*args: str, input: bytes | None = None, timeout: float = 60
             ) -> subprocess.CompletedProcess[bytes]:
    """The real vmbusifyexec on the lab's host."""
    return subprocess.run([EXEC, *args], input=input, capture_output=True, env=_exec_env(),
                          timeout=timeout, check=False,
                          stdin=None if input is not None else subprocess.DEVNULL)


def _status(lab: LabHandle) -> dict[str, dict[str, Any]]:
    doc = json.loads(lab.ctl("status", "--json").stdout)
    return {v["vmid"]: v for v in doc["vms"]}


def _wait(lab: LabHandle, what: str, ok: Callable[[dict[str, dict[str, Any]]], bool],
          timeout: float = 60.0) -> dict[str, dict[str, Any]]:
    """Poll the host's status until ``ok(vms)`` holds; the last status."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            vms = _status(lab)
            if ok(vms):
                return vms
        except (LabError, ValueError, KeyError):
            vms = {}
        assert time.monotonic() < deadline, f"{what}: {vms}"
        time.sleep(0.5)


def _serving(vm: dict[str, Any]) -> bool:
    subnet = ipaddress.ip_network(SUBNET_CIDR)
    return vm["state"] == "connected" and any(ipaddress.ip_address(ip) in subnet
                                              for ip in vm["ips"])


def _switch(lab: LabHandle, release: str) -> None:
    """Run vm2 from ``release`` and wait until the lab serves again as before: both VMs
    connected with their subnet leases, the host's workers registered, an exec in each VM
    and a fetch through each VM's proxy. (The host's programs restart when vm2's key goes or
    comes back; the modules after this one find the lab as they expect it.)"""
    vmbusify_cli("lab", "-q", "up", "--guest-release", f"{OLD}={release}")
    lab.refresh()
    lab.wait_connected([NEW, OLD])
    deadline = time.monotonic() + 60
    while True:
        try:
            doc = json.loads(lab.ctl("status", "--json", check=False).stdout or "{}")
        except ValueError:
            doc = {}
        vms = {v["vmid"]: v for v in doc.get("vms", [])}
        workers = {w["name"] for w in doc.get("workers", [])}
        if (all(v in vms and _serving(vms[v]) for v in (NEW, OLD))
                and {"proxy", "subnet", "control"} <= workers
                and all(run_exec(v, "--", "true").returncode == 0 for v in (NEW, OLD))):
            fetches = [_curl(lab, v, "--socks5-hostname", GUEST_PROXY, f"http://{EXT_NAME}/")
                       for v in (NEW, OLD)]
            if all(p.returncode == 0 for p in fetches):
                return
            doc["fetches"] = [p.stderr.decode(errors="replace") for p in fetches]
        assert time.monotonic() < deadline, f"the lab did not settle: {doc}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def old(request: pytest.FixtureRequest) -> Iterator[LabHandle]:
    """The lab with vm2 on v0.1.0 (back to what it ran before at the end)."""
    lab: LabHandle = request.getfixturevalue("lab")
    before = next(vm.get("release") for vm in lab_status()["vms"] if vm["vmid"] == OLD)
    _switch(lab, OLD_RELEASE)
    try:
        yield lab
    finally:
        _switch(lab, before or "current")


@pytest.mark.lab
def test_vm2_runs_the_old_release(old: LabHandle) -> None:
    st = next(vm for vm in lab_status()["vms"] if vm["vmid"] == OLD)
    assert st["release"] == OLD_RELEASE
    tree = old.layout.release_dir(OLD_RELEASE) / "tree"
    pid = old.program_pid(OLD, "mux")
    assert pid is not None
    env = psutil.Process(pid).environ()
    assert env["PYTHONPATH"] == str(tree)
    assert env["VMBUSIFY_BIN"] == str(old.layout.release_dir(OLD_RELEASE) / "bin")
    for program in ("control", "exec", "proxy", "subnet"):
        assert old.program_pid(OLD, program) is not None, program
    # ... and the host sees it on the wire: a HELLO of 0.1.0 lists no features
    log = (old.layout.host.run_dir / "mux.log").read_text(errors="replace")
    assert f"vm={OLD}: the guest lists no features" in log, "the host saw no 0.1.0 HELLO"
    # the guest's own view, from its release's vmbusifyctl (first on PATH inside the VM)
    inside = old.run_in_vm(OLD, ["sh", "-c", "command -v vmbusifyctl; vmbusifyctl status --json"])
    where, _, doc = inside.stdout.partition("\n")
    assert where == str(old.layout.release_dir(OLD_RELEASE) / "bin" / "vmbusifyctl")
    assert vm_states(json.loads(doc)) == {"host": "connected"}
    # no key for it in the host's config (0.1.0 has none); vm1 keeps its key
    keys = {vm.vmid: vm.key_file for vm in load_config(old.layout.host.config_path).vms}
    assert keys[OLD] == "" and keys[NEW] == old.layout.vm(NEW).key_path


@pytest.mark.lab
def test_status_shows_it_connected_with_rtt(old: LabHandle) -> None:
    assert old.ctl("ping", OLD).stdout.startswith(f"{OLD}: rtt ")
    vms = _wait(old, "rtt", lambda vms: vms[OLD]["rtt_ms"] is not None)
    assert vms[OLD]["state"] == "connected" and vms[OLD]["peer_version"] == "0.1.0"
    assert vms[NEW]["peer_version"] == vmbusify.__version__ != "0.1.0"
    assert vms[OLD]["last_error"] in ("", None), vms[OLD]
    line = next(ln for ln in old.ctl("status").stdout.splitlines() if ln.startswith(OLD))
    assert "connected" in line and "ms" in line, line
    sdn = old.layout.vm(OLD).sdn_ip
    assert old.ctl("vmid", sdn).stdout.strip() == OLD


@pytest.mark.lab
def test_exec_streams_stdin_and_exit_statuses(old: LabHandle) -> None:
    sdn = old.layout.vm(OLD).sdn_ip
    p = run_exec(OLD, "--", "sh", "-c", "ip -o -4 addr show; echo to-stderr >&2; exit 5")
    assert p.returncode == 5 and sdn in p.stdout.decode() and p.stderr == b"to-stderr\n"
    p = run_exec(OLD, "--", "cat", "/etc/hostname")
    assert (p.returncode, p.stdout) == (0, Path("/etc/hostname").read_bytes())
    p = run_exec("-i", OLD, "--", "sort", input=b"b\na\n")
    assert (p.returncode, p.stdout, p.stderr) == (0, b"a\nb\n", b"")
    p = run_exec("-u", "nobody", "-w", "/tmp", "-e", "FOO=bar", OLD, "--",
                 "sh", "-c", 'id -un; pwd; echo "$FOO"')
    assert (p.returncode, p.stdout) == (0, b"nobody\n/tmp\nbar\n")
    # past the 8 MiB window each way: credit flows between this host and the old guest
    blob = bytes(range(256)) * (24 * MIB // 256)
    p = run_exec("-i", OLD, "--", "sha256sum", input=blob)
    assert p.returncode == 0 and p.stdout.split()[0].decode() == hashlib.sha256(blob).hexdigest()
    p = run_exec(OLD, "--", "head", "-c", str(40 * MIB), "/dev/zero")
    assert p.returncode == 0 and p.stdout == bytes(40 * MIB)


@pytest.mark.lab
def test_exec_errors(old: LabHandle) -> None:
    p = run_exec(OLD, "--", "/no/such/program")
    assert (p.returncode, p.stdout, p.stderr) == (
        127, b"", b"vmbusifyexec: /no/such/program: command not found\n")
    p = run_exec(OLD, "--", "/etc/passwd")
    assert (p.returncode, p.stderr) == (126, b"vmbusifyexec: /etc/passwd: permission denied\n")
    p = run_exec("-u", "no-such-user", OLD, "--", "true")
    assert (p.returncode, p.stderr) == (126, b"vmbusifyexec: no such user: no-such-user\n")
    p = run_exec("--timeout", "1", OLD, "--", "sleep", "30")
    assert p.returncode == 124 and b"timed out" in p.stderr
    p = run_exec(OLD, "--", "sh", "-c", "kill -KILL $$")
    assert p.returncode == 128 + signal.SIGKILL


@pytest.mark.lab
def test_cp_with_the_old_guest_both_paths(old: LabHandle, tmp_path: Path) -> None:
    """vmbusifyctl cp needs nothing new in a guest (its helper is the host's, sent as
    source): one large file by the fast path (the host's listener reads and writes it by
    descriptor) and a tree by the ordinary stream, both ways, through a v0.1.0 guest."""
    ctl = str(BIN / "vmbusifyctl")

    def cp(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([ctl, "cp", *args], capture_output=True, env=_exec_env(),
                              timeout=300, check=False, stdin=subprocess.DEVNULL)

    src = tmp_path / "big.bin"
    src.write_bytes(bytes(range(256)) * (48 * MIB // 256))
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "f").write_text("in a tree")
    for args in (["--checksum", str(src), f"{OLD}:{tmp_path}/in.bin"],
                 ["--checksum", f"{OLD}:{tmp_path}/in.bin", str(tmp_path / "out.bin")],
                 ["-r", str(tmp_path / "tree"), f"{OLD}:{tmp_path}/tree-in"],
                 ["-r", f"{OLD}:{tmp_path}/tree-in", str(tmp_path / "tree-out")]):
        proc = cp(*args)
        assert proc.returncode == 0, (args, proc.stderr)
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    for name in ("in.bin", "out.bin"):
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == want
    assert (tmp_path / "tree-out" / "sub" / "f").read_text() == "in a tree"
    log = (old.layout.host.run_dir / "control.log").read_text(errors="replace")
    for op in ("read", "write"):
        assert re.search(rf"vm={OLD} stream=\d+: file by descriptor: {op} ", log), op


def _curl(lab: LabHandle, where: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    full, env = command(where, ["curl", "-sS", "--max-time", "30", *args])
    return subprocess.run(full, env=env, capture_output=True, timeout=60, check=False)


@pytest.mark.lab
def test_host_reaches_a_loopback_service_in_the_old_guest(old: LabHandle,
                                                          tmp_path: Path) -> None:
    vm = old.layout.vm(OLD)
    blob = bytes(range(256)) * (20 * MIB // 256)
    (tmp_path / "hello").write_text("hello from the old guest\n")
    (tmp_path / "blob").write_bytes(blob)
    server = subprocess.Popen(
        ns_argv(vm.netns, [PY, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                           str(tmp_path), str(SERVICE_PORT)]),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        hp = load_config(old.layout.host.config_path).proxy.listen
        url = f"http://{OLD}.vmbusify:{SERVICE_PORT}"
        deadline = time.monotonic() + 20
        while (p := _curl(old, "host", "--socks5-hostname", hp, f"{url}/hello")).returncode:
            assert time.monotonic() < deadline, p.stderr
            time.sleep(0.3)
        assert p.stdout == b"hello from the old guest\n"
        p = _curl(old, "host", "--socks5-hostname", hp, f"{url}/blob")
        assert p.returncode == 0 and hashlib.sha256(p.stdout).digest() == \
            hashlib.sha256(blob).digest(), p.stderr
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.lab
def test_old_guest_reaches_the_external_network_through_the_host_proxy(old: LabHandle) -> None:
    p = _curl(old, OLD, "--socks5-hostname", GUEST_PROXY, f"http://{EXT_NAME}/")
    assert (p.returncode, p.stdout.decode()) == (0, WEB_GREETING), p.stderr
    p = _curl(old, OLD, "-x", f"http://{GUEST_PROXY}", f"http://{EXT_NAME}/")
    assert (p.returncode, p.stdout.decode()) == (0, WEB_GREETING), p.stderr


#: Inside the VM: a DNS query for external.lab through the proxy's UDP ASSOCIATE to the lab's
#: DNS server (argv: proxy, DNS server); prints the answer's address.
UDP_DNS = """
import socket, struct, sys
proxy, dns = sys.argv[1], sys.argv[2]
ph, pp = proxy.rsplit(":", 1)
s = socket.create_connection((ph, int(pp)), timeout=30)
s.sendall(b"\\x05\\x01\\x00"); assert s.recv(2) == b"\\x05\\x00"
s.sendall(b"\\x05\\x03\\x00\\x01" + bytes(6))
head = b""
while len(head) < 10: head += s.recv(10 - len(head))
assert head[1] == 0, f"reply {head[1]}"
relay = (socket.inet_ntoa(head[4:8]), struct.unpack(">H", head[8:10])[0])
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in "external.lab".split(".")) + b"\\0"
q += struct.pack(">HH", 1, 1)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(10)
to = b"\\0\\0\\0\\x01" + socket.inet_aton(dns) + struct.pack(">H", 53)
u.sendto(to + q, relay)
data, _ = u.recvfrom(65535)
assert data[:10] == to and data[10:12] == b"\\x12\\x34", data[:12]
print(socket.inet_ntoa(data[-4:]))
"""


@pytest.mark.lab
def test_old_guest_sends_udp_through_the_host_proxy(old: LabHandle) -> None:
    ext = old.layout.external.ip
    p = old.run_in_vm(OLD, [PY, "-c", UDP_DNS, GUEST_PROXY, ext], check=False)
    assert (p.returncode, p.stdout) == (0, f"{ext}\n"), p.stderr


@pytest.mark.lab
def test_old_guest_reaches_the_external_network_over_the_subnet(old: LabHandle) -> None:
    route = old.run_in_vm(OLD, ["ip", "route", "show", "default"]).stdout
    assert "dev vmbus0" in route, route
    p = _curl(old, OLD, f"http://{EXT_NAME}/")  # no proxy: routed through the host's NAT
    assert (p.returncode, p.stdout.decode()) == (0, WEB_GREETING), p.stderr
    subnet = ipaddress.ip_network(SUBNET_CIDR)
    subnet_ip = next(ip for ip in _status(old)[OLD]["ips"] if ipaddress.ip_address(ip) in subnet)
    assert old.ctl("vmid", subnet_ip).stdout.strip() == OLD


@pytest.mark.lab
def test_the_old_guest_comes_back_after_the_host_mux_restarts(old: LabHandle) -> None:
    before = old.program_pid("host", "mux")
    old.supervisorctl("host", "restart", "mux")
    assert old.program_pid("host", "mux") not in (None, before)
    old.wait_connected([NEW, OLD])
    p = run_exec(OLD, "--", "echo", "again")
    assert (p.returncode, p.stdout) == (0, b"again\n"), p.stderr


def _wait_exec(vmid: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (p := run_exec(vmid, "--", "true")).returncode != 0:
        assert time.monotonic() < deadline, p.stderr
        time.sleep(0.3)


@pytest.mark.lab
def test_error_acks_cross_in_the_form_0_1_0_reads(old: LabHandle) -> None:
    """An ERROR ACK is UTF-8 text for a peer of 0.1.0, both ways: the old guest's mux
    answers an exec with no executor in text, which this host still understands; this
    host's answer to the old guest's proxy when no host proxy runs reaches its log as text."""
    old.supervisorctl(OLD, "stop", "exec")
    try:
        p = run_exec(OLD, "--", "true")
        assert (p.returncode, p.stderr) == (255, (
            f"vmbusifyexec: the command executor is not running on {OLD} (check in the "
            "VM that VMBusify's exec program runs: systemctl status vmbusify-guest)\n"
            ).encode())
    finally:
        old.supervisorctl(OLD, "start", "exec")
    _wait_exec(OLD)

    proxy_log = old.layout.vm(OLD).run_dir / "proxy.log"
    seen = proxy_log.stat().st_size
    old.supervisorctl("host", "stop", "proxy")
    try:
        p = _curl(old, OLD, "--socks5-hostname", GUEST_PROXY, f"http://{EXT_NAME}/")
        assert p.returncode == 97 and p.stderr.rstrip().endswith(b"(1)"), p.stderr  # general
    finally:
        old.supervisorctl("host", "start", "proxy")
    with open(proxy_log, "rb") as fh:
        fh.seek(seen)
        logged = fh.read().decode(errors="replace")
    assert ("refused by the far side (1 general failure): no worker on host handles "
            "proxy-client message 1") in logged, logged
    deadline = time.monotonic() + 30
    while (p := _curl(old, OLD, "--socks5-hostname", GUEST_PROXY,
                      f"http://{EXT_NAME}/")).returncode != 0:
        assert time.monotonic() < deadline, p.stderr
        time.sleep(0.3)
