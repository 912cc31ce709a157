"""One QEMU guest of the lab: its files, its command line, start, stop and readiness.

Every VM runs from a qcow2 overlay of the shared base image (made fresh at each start, so a
VM boots clean and never changes the base), with a per-VM config disk, no NIC, one
virtio-serial port whose chardev is a Unix socket QEMU listens on (the host stack connects to
it), and its serial console in a log file. QEMU daemonizes and writes a pidfile; a process
counts as this VM's QEMU only if its command line names this VM's directory.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from vmbusify.errors import LabError
from vmbusify.lab.layout import VMLayout
from vmbusify.lab.qemu import image
from vmbusify.lab.qemu.accel import CPU, Accel
from vmbusify.text import printable
from vmbusify.transport import vport

log = logging.getLogger(__name__)

MEMORY_MB = 512
#: console.log holds at most this much of a boot (the rest is read and dropped).
CONSOLE_LOG_CAP = 1 << 20
BOOT_TIMEOUT = {Accel.KVM: 60.0, Accel.TCG: 300.0}


def overlay_path(vm: VMLayout) -> Path:
    """The VM's copy-on-write disk over the shared image."""
    return vm.dir / "disk.qcow2"


def config_disk_path(vm: VMLayout) -> Path:
    """The small disk that carries the VM's configuration in."""
    return vm.dir / "config.img"


def console_path(vm: VMLayout) -> Path:
    """The guest's serial console (kernel, systemd, the readiness marker, a root shell's echo)."""
    return vm.dir / "console.log"


def console_socket(vm: VMLayout) -> Path:
    """The Unix socket QEMU serves the serial console on."""
    return vm.dir / "console.sock"


def pid_path(vm: VMLayout) -> Path:
    """Where QEMU writes its pid."""
    return vm.dir / "qemu.pid"


def argv(vm: VMLayout, kernel: image.Kernel, accel: Accel) -> list[str]:
    """QEMU's command line for ``vm`` (no NIC; virtio-serial to :attr:`VMLayout.chardev_path`)."""
    return [
        "qemu-system-x86_64",
        "-name", f"vmbusify-lab-{vm.vmid}",
        "-accel", accel.value, "-cpu", CPU[accel], "-m", str(MEMORY_MB), "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-nic", "none",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(kernel.initrd),
        "-append", (f"root=/dev/vda rw console=ttyS0 panic=-1 systemd.hostname={vm.vmid} "
                   "quiet systemd.show_status=error"),
        "-drive", f"file={overlay_path(vm)},if=virtio,format=qcow2,cache=unsafe",
        "-drive", f"file={config_disk_path(vm)},if=virtio,format=raw,readonly=on",
        # the channel: the transport's own QEMU options (QEMU listens on the chardev socket)
        *vport.qemu_args(str(vm.chardev_path), image.PORT_NAME),
        # The serial console: a root shell for whoever connects to console.sock (root-only, in
        # the VM's 0700 directory). No logfile= here: QEMU's has no size limit, and the guest
        # is not trusted; wait_ready() copies the boot (capped) into console.log.
        "-chardev", f"socket,id=console0,path={console_socket(vm)},server=on,wait=off",
        "-serial", "chardev:console0",
        "-daemonize", "-pidfile", str(pid_path(vm)),
    ]


def running_pid(vm: VMLayout) -> int | None:
    """The pid of ``vm``'s QEMU if it runs (its pidfile, checked against its command line)."""
    try:
        pid = int(pid_path(vm).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _is_ours(pid, vm) else None


def _is_ours(pid: int, vm: VMLayout) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return f"path={vm.chardev_path},".encode() in b" ".join(cmdline)


def stray_pids(vm: VMLayout) -> list[int]:
    """Every QEMU process of ``vm`` (by its command line), pidfile or not."""
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and _is_ours(int(p.name), vm)]


def start(vm: VMLayout, base: Path, kernel: image.Kernel, accel: Accel) -> int:
    """Boot ``vm`` from a fresh overlay of ``base``; its QEMU's pid (QEMU has daemonized)."""
    overlay = overlay_path(vm)
    overlay.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(overlay)], check=True, capture_output=True)
    console_path(vm).write_text("")
    vm.chardev_path.unlink(missing_ok=True)
    pid_path(vm).unlink(missing_ok=True)
    log.info("%s: booting (QEMU, %s, %d MiB, no NIC)", vm.vmid, accel.value, MEMORY_MB)
    proc = subprocess.run(argv(vm, kernel, accel), check=False, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    pid = running_pid(vm)
    if proc.returncode != 0 or pid is None:
        raise LabError(f"{vm.vmid}: QEMU did not start (exit {proc.returncode}): "
                       f"{proc.stderr.strip()[-500:]}")
    return pid


def stop(vm: VMLayout, timeout: float = 5.0) -> None:
    """Stop every QEMU of ``vm`` (SIGTERM, then SIGKILL); no-op when none runs."""
    pids = set(stray_pids(vm))
    pid = running_pid(vm)
    if pid is not None:
        pids.add(pid)
    for p in pids:
        log.info("%s: stopping QEMU %d", vm.vmid, p)
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = {p for p in pids if _is_ours(p, vm)}
        time.sleep(0.1)
    for p in pids:
        _signal(p, signal.SIGKILL)
    pid_path(vm).unlink(missing_ok=True)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class _ConsoleCopy:
    """A VM's serial console while it boots: read from console.sock, copied to console.log up
    to :data:`CONSOLE_LOG_CAP` bytes, searched for the readiness marker."""

    def __init__(self, vm: VMLayout) -> None:
        self.vm = vm
        self.sock: socket.socket | None = None
        self.written = 0
        self.tail = b""

    def poll(self) -> bool:
        """Read what there is; True once the marker has been seen."""
        if self.sock is None:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(console_socket(self.vm)))
                sock.setblocking(False)
                self.sock = sock
            except OSError:
                sock.close()
                return False
        while True:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                return False
            except OSError:
                chunk = b""
            if not chunk:  # QEMU went away
                self.close()
                return False
            room = CONSOLE_LOG_CAP - self.written
            if room > 0:
                with open(console_path(self.vm), "ab") as f:
                    f.write(chunk[:room])
                self.written += min(room, len(chunk))
            self.tail = (self.tail + chunk)[-4096:]
            if image.READY_MARKER.encode() in self.tail:
                return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def wait_ready(vms: list[VMLayout], accel: Accel, timeout: float | None = None) -> None:
    """Wait until every VM in ``vms`` printed :data:`image.READY_MARKER` on its console,
    copying each one's boot into its console.log (capped: the guest is not trusted).

    LabError naming the VM, with its console's last lines, if one stops or takes too long.
    """
    timeout = timeout if timeout is not None else BOOT_TIMEOUT[accel]
    start = time.monotonic()
    copies = {vm.vmid: _ConsoleCopy(vm) for vm in vms}
    try:
        while copies:
            for vmid, copy in list(copies.items()):
                if copy.poll():
                    log.info("%s: guest ready (%.1f s)", vmid, time.monotonic() - start)
                    copy.close()
                    del copies[vmid]
                elif running_pid(copy.vm) is None:
                    raise LabError(f"{vmid}: QEMU exited during boot; its console ended:\n"
                                   + _tail(copy.tail))
            if copies and time.monotonic() - start > timeout:
                copy = next(iter(copies.values()))
                raise LabError(f"{copy.vm.vmid}: no guest ready within {timeout:g} s; its "
                               f"console ({console_path(copy.vm)}) ends:\n" + _tail(copy.tail))
            time.sleep(0.2)
    finally:
        for copy in copies.values():
            copy.close()


def _tail(data: bytes, lines: int = 15) -> str:
    text = data.decode(errors="replace")
    return "\n".join(printable(line) for line in text.strip().splitlines()[-lines:])
