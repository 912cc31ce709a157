"""The QEMU lab: real Linux guests (Debian, systemd, the cloud kernel) with no NIC, reached only
over their virtio-serial port (``vmbusify lab up --qemu``).

One guest is booted for the module (TCG here: about 15 s to systemd, 20-40 s more until the
guest's programs are up), so the whole module takes a few minutes. Marked ``qemu`` and
``lab``; skipped with the reason when QEMU, the cloud kernel or root is missing, and when the
lab instance is already up as a namespace lab (run the QEMU tests in a session of their own:
``pytest -m qemu tests/e2e/test_qemu_lab.py``). The image is built (minutes) on first use and
cached in /var/cache/vmbusify-lab.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmbusify.errors import LabError
from vmbusify.lab.external import WEB_GREETING
from vmbusify.lab.layout import EXT_NAME, LabLayout
from vmbusify.lab.qemu import image
from vmbusify.lab.qemu import vm as qemu_vm
from vmbusify.lab.testing import BIN, LabHandle, lab_status, vm_states, vmbusify

pytestmark = [pytest.mark.qemu, pytest.mark.lab, pytest.mark.timeout(900)]

#: Boot to systemd plus the guest's programs' start, under TCG on a busy 2-core machine.
CONNECT_TIMEOUT = 240.0


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, QEMU's files in /run)"
    try:
        image.require_tools()
        image.find_kernel()
    except LabError as exc:
        return str(exc)
    return None


def _has_vport() -> bool:
    return importlib.util.find_spec("vmbusify.transport.vport") is not None


@pytest.fixture(scope="module")
def qlab(_lab_session_lock: None) -> Iterator[LabHandle]:
    """A QEMU lab with vm1 booted; brought down (everything removed) at the end."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    before = lab_status()
    if before["vms"] and before.get("kind") != "qemu":
        pytest.skip("this lab instance is up as a namespace lab: run the QEMU tests in a "
                    "session of their own (pytest -m qemu tests/e2e/test_qemu_lab.py)")
    vmbusify("lab", "-q", "up", "--qemu", "--vms", "1", timeout=1200)
    handle = LabHandle(status=lab_status(), started=True)
    try:
        yield handle
    finally:
        vmbusify("lab", "-q", "down", check=False)


def _exec(*argv: str, input: str | None = None, timeout: float = 60.0,
          ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VMBUSIFY_CONFIG=str(LabLayout().host.config_path))
    return subprocess.run([str(BIN / "vmbusifyexec"), *argv], capture_output=True, text=True,
                          input=input, timeout=timeout, env=env, check=False,
                          stdin=None if input is not None else subprocess.DEVNULL)


def _state(lab: LabHandle, vmid: str = "vm1") -> str | None:
    proc = lab.ctl("status", "--json", check=False)
    try:
        return vm_states(json.loads(proc.stdout)).get(vmid)
    except ValueError:
        return None


# --- the lab itself (needs no transport) -----------------------------------------------------


def test_status_says_qemu_and_the_vm_has_no_nic(qlab: LabHandle) -> None:
    st = qlab.refresh()
    assert st["kind"] == "qemu" and st["up"], st
    (vm1,) = st["vms"]
    assert vm1["vmid"] == "vm1" and vm1["qemu_pid"], vm1
    assert vm1["tunnel"] == str(LabLayout().vm(1).chardev_path)
    # The host stack's config reaches vm1 at its chardev socket.
    host_conf = LabLayout().host.config_path.read_text()
    assert f'address = "unix:{vm1["tunnel"]}"' in host_conf
    # QEMU's own command line: no NIC, no default devices, one virtio-serial port.
    argv = Path(f"/proc/{vm1['qemu_pid']}/cmdline").read_bytes().split(b"\0")
    assert b"-nodefaults" in argv and argv[argv.index(b"-nic") + 1] == b"none"
    assert not any(a.startswith((b"-netdev", b"-net")) and a != b"-nic" for a in argv)
    assert f"name={image.PORT_NAME}".encode() in b" ".join(argv)
    # The guest booted systemd, whose console says so.
    console = Path(vm1["console"]).read_text(errors="replace")
    assert image.READY_MARKER in console


def test_a_second_lab_up_changes_nothing(qlab: LabHandle) -> None:
    pid = qlab.refresh()["vms"][0]["qemu_pid"]
    start = time.monotonic()
    vmbusify("lab", "-q", "up", "--qemu", timeout=300)
    assert time.monotonic() - start < 30  # image cached, QEMU left running
    assert qlab.refresh()["vms"][0]["qemu_pid"] == pid and qlab.status["up"]


def test_vms_share_the_cached_base_image(qlab: LabHandle) -> None:
    overlay = qemu_vm.overlay_path(LabLayout().vm(1))
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(overlay)],
                                     capture_output=True, text=True, check=True).stdout)
    backing = Path(info["backing-filename"])
    assert backing.parent == image.CACHE and backing.name.startswith("base-"), info
    assert info["format"] == "qcow2"


def test_a_namespace_lab_up_is_refused_while_the_qemu_lab_is_up(qlab: LabHandle) -> None:
    proc = vmbusify("lab", "-q", "up", check=False)
    assert proc.returncode == 1
    assert "up as a qemu lab" in proc.stderr and "Traceback" not in proc.stderr


# --- across the virtio-serial channel --------------------------------------------------------


@pytest.fixture(scope="module")
def connected(qlab: LabHandle) -> LabHandle:
    if not _has_vport():
        pytest.skip("needs the guest's virtio-serial transport (vport:NAME, issue 14)")
    try:
        qlab.wait_connected(["vm1"], timeout=CONNECT_TIMEOUT)
    except TimeoutError as exc:
        pytest.fail(str(exc), pytrace=False)
    return qlab


def test_exec_runs_on_the_guests_own_kernel(connected: LabHandle) -> None:
    proc = _exec("vm1", "--", "uname", "-r")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == image.find_kernel().version
    # ... on a machine whose only interfaces are loopback and the virtual subnet's TUN.
    proc = _exec("vm1", "--", "ls", "/sys/class/net")
    assert set(proc.stdout.split()) <= {"lo", "vmbus0"}, proc.stdout


def test_the_guest_runs_the_installed_package_under_systemd(connected: LabHandle) -> None:
    if not (image.repo_root() / "packaging" / "build-guest.py").is_file():
        pytest.skip("this checkout builds no guest package")
    proc = _exec("vm1", "--", "dpkg-query", "-W", "-f", "${Status} ${Version}", "vmbusify-guest")
    assert proc.stdout.startswith("install ok installed "), proc.stdout + proc.stderr
    proc = _exec("vm1", "--", "systemctl", "is-active", "vmbusify-guest")
    assert proc.stdout.strip() == "active", proc.stdout + proc.stderr
    # every program's log reaches the journal
    proc = _exec("vm1", "--", "journalctl", "-u", "vmbusify-guest", "--no-pager", "-o", "cat")
    assert proc.returncode == 0, proc.stderr
    assert "guest mux vm1 ready" in proc.stdout, proc.stdout[-2000:]


def test_exec_exit_code_and_stdin(connected: LabHandle) -> None:
    proc = _exec("-i", "vm1", "--", "sh", "-c", "tr a-z A-Z; exit 7", input="hello guest\n")
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "HELLO GUEST\n"


def test_exec_on_a_pseudo_terminal(connected: LabHandle) -> None:
    proc = _exec("-t", "vm1", "--", "tty")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("/dev/pts/"), proc.stdout
    proc = _exec("-it", "vm1", "--", "sort", input="b\na\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.replace("\r\n", "\n").endswith("a\nb\n")


def test_ctl_status_shows_the_vm_with_its_round_trip(connected: LabHandle) -> None:
    deadline = time.monotonic() + 20  # the first ping goes out ping_interval (5 s) after HELLO
    while True:
        doc = json.loads(connected.ctl("status", "--json").stdout)
        (vm1,) = doc["vms"]
        if vm1.get("rtt_ms") is not None or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert vm1["vmid"] == "vm1" and vm1["state"] == "connected", vm1
    assert 0 < vm1["rtt_ms"] < 5000, vm1
    line = next(ln for ln in connected.ctl("status").stdout.splitlines() if ln.startswith("vm1"))
    assert "connected" in line and "ms" in line, line


def test_socks_proxy_out_of_the_vm(connected: LabHandle) -> None:
    proc = _exec("vm1", "--", "curl", "-sS", "--max-time", "20", "--socks5-hostname",
                 "127.0.0.1:6542", f"http://{EXT_NAME}/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == WEB_GREETING


def test_host_reaches_the_vms_loopback_through_the_proxy(connected: LabHandle) -> None:
    # A web server on the guest's loopback only, serving its config disk's directory.
    proc = _exec("-d", "vm1", "--", "python3", "-m", "http.server", "--bind", "127.0.0.1",
                 "--directory", "/etc/vmbusify/vm", "18091")
    assert proc.returncode == 0, proc.stderr
    try:
        url = "http://vm1.vmbusify:18091/hosts"
        deadline = time.monotonic() + 60
        while True:  # python3 starts in seconds under TCG
            out = connected.run_on_host(["curl", "-sS", "--max-time", "20", "--socks5-hostname",
                                         LabLayout().host.proxy, url], check=False)
            if out.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert out.returncode == 0, out.stderr
        assert "127.0.1.1\tvm1\n" in out.stdout
    finally:
        _exec("vm1", "--", "pkill", "-f", "http.server --bind 127.0.0.1")


def test_cp_a_tree_into_and_out_of_the_guests_own_disk(connected: LabHandle,
                                                      tmp_path: Path) -> None:
    """`vmbusifyctl cp -r -p` to the guest's own file system (nothing shared with the host)
    and back: the guest's python3 runs the copy's helper; the tree lands whole under its
    name (staged, docs/files.md), with modes, times and a symlink, and comes back equal."""
    src = tmp_path / "tree"
    (src / "sub" / "empty").mkdir(parents=True)
    for i in range(50):
        (src / "sub" / f"f{i}").write_bytes(os.urandom(100 + 97 * i))
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o750)
    (src / "link").symlink_to("sub/f1")
    os.utime(src / "run.sh", ns=(10**18, 10**18))
    proc = connected.ctl("cp", "-r", "-p", "-q", str(src), "vm1:/var/tmp/t", check=False,
                         timeout=300)
    assert proc.returncode == 0, proc.stderr
    listing = _exec("vm1", "--", "sh", "-c", "cd /var/tmp/t && find . | sort && "
                    "stat -c '%a %Y' run.sh && readlink link && ls -a /var/tmp")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert "./sub/empty" in lines and "./sub/f49" in lines and "750 1000000000" in lines
    assert "sub/f1" in lines and not any("vmbcp" in line for line in lines), lines
    sums = _exec("vm1", "--", "sh", "-c", "cd /var/tmp/t && sha256sum sub/f7 sub/f49")
    for line in sums.stdout.splitlines():
        digest, name = line.split()
        assert digest == hashlib.sha256((src / name).read_bytes()).hexdigest(), name
    back = tmp_path / "back"
    proc = connected.ctl("cp", "-r", "-p", "-q", "vm1:/var/tmp/t", str(back), check=False,
                         timeout=300)
    assert proc.returncode == 0, proc.stderr
    diff = subprocess.run(["diff", "-r", "--no-dereference", str(src), str(back)],
                          capture_output=True, text=True, check=False)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    assert os.readlink(back / "link") == "sub/f1"
    assert (back / "run.sh").stat().st_mtime_ns == 10**18


def test_subnet_curl_and_ping_to_the_external_namespace(connected: LabHandle) -> None:
    proc = _exec("vm1", "--", "curl", "-sS", "--max-time", "20", f"http://{EXT_NAME}/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == WEB_GREETING
    proc = _exec("vm1", "--", "ping", "-c", "1", "-W", "10", EXT_NAME)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_reboot_inside_the_guest_reconnects_by_itself(connected: LabHandle) -> None:
    boot_id = _exec("vm1", "--", "cat", "/proc/sys/kernel/random/boot_id").stdout.strip()
    assert boot_id
    pid = connected.refresh()["vms"][0]["qemu_pid"]
    proc = _exec("-d", "vm1", "--", "sh", "-c", "sleep 1; systemctl reboot")
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 60
    while _state(connected) == "connected":
        assert time.monotonic() < deadline, "vm1 still connected 60 s after its reboot"
        time.sleep(0.5)
    connected.wait_connected(["vm1"], timeout=CONNECT_TIMEOUT)
    after = _exec("vm1", "--", "cat", "/proc/sys/kernel/random/boot_id").stdout.strip()
    assert after and after != boot_id
    assert connected.refresh()["vms"][0]["qemu_pid"] == pid  # the same QEMU, a new boot


def test_kill_9_of_qemu_shows_the_vm_down_and_down_leaves_nothing(qlab: LabHandle) -> None:
    # Runs last: it takes the lab down.
    layout = LabLayout()
    vm = layout.vm(1)
    pid = qlab.refresh()["vms"][0]["qemu_pid"]
    assert pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        st = lab_status()
        state = _state(qlab)
        if st["vms"][0]["qemu_pid"] is None and not st["up"] and state != "connected":
            break
        assert time.monotonic() < deadline, (st, state)
        time.sleep(0.5)
    vmbusify("lab", "-q", "down")
    assert not layout.root.exists()
    assert qemu_vm.stray_pids(vm) == []
    assert not any("qemu-system" in cmd and str(layout.root) in cmd
                   for cmd in map(_cmdline, Path("/proc").iterdir()))


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
