"""Bring the lab up, down, and report on it.

``up`` is idempotent and repairs: every step checks before it changes, files are rewritten
only when their content differs, and a stack is (re)started only when it is not running from
this checkout with its current config. ``down`` removes everything ``up`` can make, whether
or not this run made it, and is a no-op on a lab that is already gone.
"""

from __future__ import annotations

import enum
import fcntl
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import vmbusify.lab.netns as ip
import vmbusify.lab.release as releases
import vmbusify.lab.stack as stacks
from vmbusify.errors import LabError
from vmbusify.lab.external import start_services, stop_services
from vmbusify.lab.layout import (
    ETC_NETNS,
    EXT_NETNS,
    MAX_VMS,
    PREFIX,
    SDN_IF,
    SUBNET_TABLE,
    LabLayout,
    VMLayout,
    guest_config,
    host_config,
    hosts_file,
    qemu_guest_config,
    resolv_conf,
    supervisord_conf,
    venv_bin,
)
from vmbusify.lab.qemu import accel as qemu_accel
from vmbusify.lab.qemu import image as qemu_image
from vmbusify.lab.qemu import vm as qemu_vm

log = logging.getLogger(__name__)

DEFAULT_VMS = 2
#: Left in the lab root: which kind of lab this is (absent: the namespace lab).
_KIND_FILE = "kind"


class Kind(enum.StrEnum):
    """What plays the VMs."""

    NETNS = "netns"
    QEMU = "qemu"
_VM_NETNS_RE = re.compile(rf"^{re.escape(PREFIX)}vm([1-9][0-9]*)$")
#: Left in the lab root when ``up`` had to create /etc/netns, so ``down`` removes it again.
_ETC_NETNS_MARKER = ".created-etc-netns"


@contextmanager
def locked(layout: LabLayout, timeout: float = 300.0) -> Iterator[None]:
    """Hold the lab's lock: one ``up`` or ``down`` at a time on this machine.

    The lock is an flock on the lab root's parent directory (``/run``), so it leaves no file.
    """
    fd = os.open(layout.root.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LabError(f"another `vmbusify lab` command held the lab for "
                                   f"{timeout:g} s") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


def require_root() -> None:
    """LabError unless running as root (namespaces, links and /etc/netns need it)."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces): run it with sudo")


# --- status ---------------------------------------------------------------------------------


@dataclass
class VMStatus:
    """One VM as it is now."""

    vmid: str
    netns: str
    sdn_ip: str
    tunnel: str
    run_dir: str
    config: str
    netns_present: bool
    supervisord_pid: int | None
    #: The older release its guest stack runs (None: this checkout's).
    release: str | None = None
    #: QEMU lab only: the VM's QEMU process and serial console (netns is "" there).
    qemu_pid: int | None = None
    console: str = ""


@dataclass
class ExternalStatus:
    """The external network as it is now."""

    netns: str
    ip: str
    host_if: str
    host_ip: str
    present: bool


@dataclass
class HostStatus:
    """The host stack as it is now."""

    config: str
    run_dir: str
    control: str
    supervisord_pid: int | None


@dataclass
class LabStatus:
    """What ``vmbusify lab status`` reports."""

    root: str
    vms: list[VMStatus]
    external: ExternalStatus
    host: HostStatus
    #: "netns" (simulated VMs in namespaces) or "qemu" (real guests, ``lab up --qemu``).
    kind: str = Kind.NETNS.value
    up: bool = field(init=False)

    def __post_init__(self) -> None:
        def vm_up(vm: VMStatus) -> bool:
            if self.kind == Kind.QEMU:
                return vm.qemu_pid is not None
            return vm.netns_present and vm.supervisord_pid is not None
        self.up = (bool(self.vms) and self.external.present
                   and self.host.supervisord_pid is not None
                   and all(vm_up(vm) for vm in self.vms))

    def to_json(self) -> dict[str, Any]:
        """``{"vms": [{"vmid", "netns", "sdn_ip", ..., "qemu_pid", "console"}],
        "external": {"netns", "ip", ...}, "host": {...}, "root", "kind", "up"}``."""
        return asdict(self)

    def render(self) -> str:
        """The human form."""
        if not self.vms and not self.external.present and self.host.supervisord_pid is None:
            return "lab: down"
        def pid(p: int | None) -> str:
            return f"supervisord {p}" if p else "supervisord not running"
        ext = self.external
        state = "up" if self.up else "DEGRADED (`vmbusify lab up` repairs it)"
        if self.kind == Kind.QEMU:
            state += "  [QEMU guests]"
        host = f"{ext.host_if} {ext.host_ip}  control {self.host.control}"
        lines = [
            f"lab: {state}   ({self.root})",
            f"  host      root netns  {host}  {pid(self.host.supervisord_pid)}",
            f"  external  {ext.netns:<10}  eth0 {ext.ip}" + ("" if ext.present else "  MISSING"),
        ]
        for vm in self.vms:
            if self.kind == Kind.QEMU:
                lines.append(f"  {vm.vmid:<8}  QEMU {vm.qemu_pid or 'NOT RUNNING':<11}  "
                             f"chardev {vm.tunnel}  console {vm.console}")
                continue
            lines.append(
                f"  {vm.vmid:<8}  {vm.netns:<10}  {SDN_IF} {vm.sdn_ip}  {pid(vm.supervisord_pid)}"
                + (f"  release {vm.release}" if vm.release else "")
                + ("" if vm.netns_present else "  NETNS MISSING"))
        return "\n".join(lines)


def existing_vms(layout: LabLayout) -> list[int]:
    """Indexes of VMs with any trace: a namespace, a directory or an /etc/netns entry."""
    found: set[int] = set()
    names = list(ip.list_netns())
    if ETC_NETNS.is_dir():
        names += [p.name for p in ETC_NETNS.iterdir()]
    if layout.root.is_dir():
        names += [PREFIX + p.name for p in layout.root.iterdir() if p.is_dir()]
    for name in names:
        m = _VM_NETNS_RE.match(name)
        if m and int(m.group(1)) <= MAX_VMS:
            found.add(int(m.group(1)))
    return sorted(found)


def lab_kind(layout: LabLayout) -> Kind:
    """The kind of the lab under ``layout`` (the namespace lab when none is recorded)."""
    try:
        return Kind((layout.root / _KIND_FILE).read_text().strip())
    except (OSError, ValueError):
        return Kind.NETNS


def status(layout: LabLayout | None = None) -> LabStatus:
    """The lab as it is now (reads only)."""
    layout = layout or LabLayout()
    namespaces = set(ip.list_netns())
    kind = lab_kind(layout)
    vms = []
    for k in existing_vms(layout):
        vm = layout.vm(k)
        if kind == Kind.QEMU:
            vms.append(VMStatus(
                vmid=vm.vmid, netns="", sdn_ip="", tunnel=str(vm.chardev_path),
                run_dir=str(vm.dir), config=str(vm.config_path), netns_present=False,
                supervisord_pid=None, qemu_pid=qemu_vm.running_pid(vm),
                console=str(qemu_vm.console_path(vm))))
            continue
        proc = stacks.supervisord_process(stacks.stack_for(vm.vmid, layout))
        vms.append(VMStatus(
            vmid=vm.vmid, netns=vm.netns, sdn_ip=vm.sdn_ip, tunnel=str(vm.tunnel_path),
            run_dir=str(vm.run_dir), config=str(vm.config_path),
            netns_present=vm.netns in namespaces, supervisord_pid=proc.pid if proc else None,
            release=releases.release_of(vm)))
    ext = layout.external
    host_proc = stacks.supervisord_process(stacks.stack_for("host", layout))
    return LabStatus(
        root=str(layout.root),
        vms=vms,
        external=ExternalStatus(
            netns=ext.netns, ip=ext.ip, host_if=ext.host_if, host_ip=ext.host_ip,
            present=ext.netns in namespaces and ip.link_exists(ext.host_if)),
        host=HostStatus(
            config=str(layout.host.config_path), run_dir=str(layout.host.run_dir),
            control=layout.host.control, supervisord_pid=host_proc.pid if host_proc else None),
        kind=kind.value,
    )


# --- up -------------------------------------------------------------------------------------


def _write(path: Path, text: str, mode: int = 0o644) -> bool:
    """Write ``text`` to ``path`` unless it already holds exactly that; True if written."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)
    return True


def _write_etc(etc_dir: Path, layout: LabLayout, vm: VMLayout | None) -> None:
    if not ETC_NETNS.exists():
        ETC_NETNS.mkdir(mode=0o755)
        (layout.root / _ETC_NETNS_MARKER).touch()
    _write(etc_dir / "hosts", hosts_file(layout, vm))
    _write(etc_dir / "resolv.conf", resolv_conf(layout))


def _up_external(layout: LabLayout) -> None:
    ext = layout.external
    ip.ensure_netns(ext.netns)
    ip.ensure_veth(ext.host_if, ext.netns, ext.ifname)
    ip.ensure_addr(ext.host_if, ext.host_cidr)
    ip.link_up(ext.host_if)
    ip.ensure_addr(ext.ifname, ext.cidr, ext.netns)
    ip.link_up(ext.ifname, ext.netns)
    ip.ensure_default_route(ext.host_ip, ext.netns)
    for d in (ext.dir, ext.run_dir):
        d.mkdir(exist_ok=True, mode=0o700)
    _write_etc(ext.etc_dir, layout, None)


def _guest_config(layout: LabLayout, vm: VMLayout) -> tuple[str, bool, bool]:
    """(VM ``vm``'s guest config, whether it has a key, whether its release was exported now).

    A VM of an older release gets the newest shape its release's own loader accepts: this
    checkout's, else 0.1.0's (no key, no [control]); the host then asks it for no proof.
    """
    ref = releases.release_of(vm)
    if ref is None:
        return guest_config(vm), True, False
    release, exported = releases.export(ref, layout)
    errors = []
    for first_release in (False, True):
        text = guest_config(vm, first_release=first_release)
        error = releases.config_error(release, text, vm.dir)
        if error is None:
            return text, not first_release, exported
        errors.append(error)
    raise LabError(f"{vm.vmid}: release {ref} takes no config the lab can write "
                   f"({'; '.join(errors)})")


def _up_vm(layout: LabLayout, vm: VMLayout) -> tuple[bool, bool]:
    """Make VM ``vm``'s namespace, link and files; (whether its config or release changed,
    whether its guest has a key)."""
    ip.ensure_netns(vm.netns)
    ip.ensure_nowhere_link(SDN_IF, vm.netns)
    ip.ensure_addr(SDN_IF, vm.sdn_cidr, vm.netns)
    ip.link_up(SDN_IF, vm.netns)
    for d in (vm.dir, vm.run_dir, vm.state_dir):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_etc(vm.etc_dir, layout, vm)
    if not os.path.exists(vm.key_path):  # a key per VM, kept across `lab up` runs
        _write(Path(vm.key_path), secrets.token_hex(32) + "\n", 0o600)
    text, keyed, exported = _guest_config(layout, vm)
    return _write(vm.config_path, text, 0o600) or exported, keyed


def _start(stack: stacks.Stack, config_changed: bool) -> None:
    """Start ``stack``; if it was already running and its config changed, restart its programs."""
    running = stacks.supervisord_process(stack)
    if running is not None and stacks.is_current(stack, running):
        if config_changed:
            log.info("%s: config changed; restarting its programs", stack.name)
            stacks.supervisorctl(stack, "restart", "all", check=False)
        return
    stacks.start(stack)


def up(vms: int | None = None, layout: LabLayout | None = None,
       guest_releases: Mapping[str, str | None] | None = None, qemu: bool = False,
       accel: str | None = None) -> LabStatus:
    """Bring the lab up with VMs 1..``vms``, or repair it; the resulting status.

    ``vms`` None keeps the VMs there are (2 for a new lab, 1 for a new QEMU lab); a number
    adds or removes VMs to match it. ``guest_releases`` maps a VM id to the release its guest
    stack is to run (a git tag such as "v0.1.0", exported from this checkout: lab/release.py),
    or to None (or "current") for this checkout's; VMs it does not name keep the release they
    run. ``qemu``: the VMs are real QEMU guests (see ``lab/qemu``), booted with ``accel``
    ("kvm" or "tcg"; None: probe, cached).
    """
    require_root()
    layout = layout or LabLayout()
    with locked(layout):
        kind = lab_kind(layout) if layout.root.exists() else Kind.NETNS
        wanted = Kind.QEMU if qemu else Kind.NETNS
        if layout.root.exists() and kind != wanted:
            raise LabError(f"the lab is up as a {kind.value} lab: `vmbusify lab down` first")
        if qemu and guest_releases:
            raise LabError("--guest-release is for the namespace lab, not --qemu")
        return _up(layout, vms, dict(guest_releases or {}), wanted, accel)


def _set_releases(layout: LabLayout, wanted: list[VMLayout],
                  guest_releases: dict[str, str | None]) -> None:
    """Record which release each VM named in ``guest_releases`` runs (checked first)."""
    known = {vm.vmid: vm for vm in wanted}
    for vmid, ref in guest_releases.items():
        if vmid not in known:
            raise LabError(f"--guest-release {vmid}: the lab has no such VM "
                           f"(vm1..vm{len(wanted)})")
        if ref not in (None, releases.CURRENT):
            layout.release_dir(ref)  # a LabError for a name that cannot be one
            releases.commit_of(ref)  # ... and for one this checkout does not have
    for vmid, ref in guest_releases.items():
        releases.set_release(known[vmid], None if ref == releases.CURRENT else ref)


def _up(layout: LabLayout, vms: int | None, guest_releases: dict[str, str | None],
        kind: Kind = Kind.NETNS, accel: str | None = None) -> LabStatus:
    present = existing_vms(layout)
    if kind == Kind.QEMU and vms is None and not present:
        vms = 1  # TCG is slow: one guest unless asked
    count = vms if vms is not None else (max(present) if present else DEFAULT_VMS)
    if not 1 <= count <= MAX_VMS:
        raise LabError(f"--vms must be between 1 and {MAX_VMS}, not {count}")
    venv_bin()  # fail early, before touching anything, if the checkout is incomplete
    supervisord_conf()
    if kind == Kind.QEMU:  # the same: tools, kernel, image (minutes the first time)
        qemu_image.require_tools()
        kernel = qemu_image.find_kernel()
        base = qemu_image.base_image(kernel)
        chosen = qemu_accel.choose(kernel, accel)

    # 0711: others may pass through (to the host's control directory, which decides for
    # itself who may enter, as /run/vmbusify-control does in production) but not list it;
    # every directory below but the host's is 0700.
    layout.root.mkdir(mode=0o700, exist_ok=True)
    layout.root.chmod(0o711)
    _write(layout.root / _KIND_FILE, kind.value + "\n")
    _up_external(layout)
    _remove_vms(layout, [layout.vm(k) for k in present if k > count])
    wanted = layout.vms(count)
    if kind == Kind.QEMU:
        booting = [vm for vm in wanted if _up_qemu_vm(layout, vm, base, kernel, chosen)]
        keyless: frozenset[str] = frozenset()
    else:
        for vm in wanted:
            vm.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _set_releases(layout, wanted, guest_releases)
        made = {vm.vmid: _up_vm(layout, vm) for vm in wanted}
        changed = {vmid: c for vmid, (c, _) in made.items()}
        keyless = frozenset(vmid for vmid, (_, keyed) in made.items() if not keyed)
    host = layout.host
    for d in (host.dir, host.run_dir, host.state_dir):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    host.dir.chmod(0o711)  # run/ and state/ stay 0700; control/ is the listener's to set
    host_changed = _write(host.config_path,
                          host_config(layout, wanted, keyless, qemu=kind == Kind.QEMU), 0o600)

    if kind == Kind.NETNS:
        for vm in wanted:  # guests first: they listen, the host connects
            _start(stacks.stack_for(vm.vmid, layout), changed[vm.vmid])
    _start(stacks.stack_for("host", layout), host_changed)
    start_services(layout.external)
    if kind == Kind.QEMU:
        qemu_vm.wait_ready(booting, chosen)
    return status(layout)


def _up_qemu_vm(layout: LabLayout, vm: VMLayout, base: Path, kernel: qemu_image.Kernel,
                accel: qemu_accel.Accel) -> bool:
    """Make QEMU VM ``vm``'s files and boot it unless it runs with its current disks; True if
    it was (re)booted."""
    for d in (vm.dir, vm.run_dir, vm.state_dir):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not os.path.exists(vm.key_path):  # a key per VM, kept across `lab up` runs
        _write(Path(vm.key_path), secrets.token_hex(32) + "\n", 0o600)
    guest = qemu_guest_config(vm, qemu_image.PORT_NAME)
    changed = _write(vm.config_path, guest, 0o600)  # the host's copy, for reading
    disk = qemu_vm.config_disk_path(vm)
    if changed or not disk.exists():
        qemu_image.config_disk(disk, {
            "vmbusify.toml": (guest, 0o600),
            "tunnel.key": (Path(vm.key_path).read_text(), 0o600),
            "hosts": (hosts_file(layout, None).replace(
                "127.0.0.1\tlocalhost", f"127.0.0.1\tlocalhost\n127.0.1.1\t{vm.vmid}"), 0o644),
            "resolv.conf": (resolv_conf(layout), 0o644),
        })
    running = qemu_vm.running_pid(vm)
    if running is not None and not changed and base.name in _backing_file(vm):
        return False
    qemu_vm.stop(vm)
    qemu_vm.start(vm, base, kernel, accel)
    return True


def _backing_file(vm: VMLayout) -> str:
    """The base image the VM's overlay was made from ("" if unknown)."""
    import subprocess
    proc = subprocess.run(["qemu-img", "info", "-U", "--output=json",
                           str(qemu_vm.overlay_path(vm))], check=False, capture_output=True,
                          text=True)
    return proc.stdout if proc.returncode == 0 else ""


# --- down -----------------------------------------------------------------------------------


def _remove_vms(layout: LabLayout, vms: list[VMLayout]) -> None:
    """Stop the VMs' stacks, then remove their namespaces and files."""
    stacks.stop(*(stacks.stack_for(vm.vmid, layout) for vm in vms))
    for vm in vms:
        qemu_vm.stop(vm)
        log.info("removing %s", vm.vmid)
        ip.delete_netns(vm.netns)
        shutil.rmtree(vm.etc_dir, ignore_errors=True)
        shutil.rmtree(vm.dir, ignore_errors=True)


def down(layout: LabLayout | None = None) -> None:
    """Stop every lab stack and remove every namespace, link, file and directory of the lab."""
    require_root()
    layout = layout or LabLayout()
    with locked(layout):
        _down(layout)


def _down(layout: LabLayout) -> None:
    vms = [layout.vm(k) for k in existing_vms(layout)]
    stacks.stop(stacks.stack_for("host", layout),
                *(stacks.stack_for(vm.vmid, layout) for vm in vms))
    # The subnet worker removes its nftables table on stop; after a kill -9 it is still here.
    try:
        ip.delete_nft_table(SUBNET_TABLE)
    except LabError as exc:
        log.warning("%s", exc)
    _remove_vms(layout, vms)
    ext = layout.external
    stop_services(ext)
    ip.delete_link(ext.host_if)  # takes its peer in vmbl-ext with it
    ip.delete_netns(EXT_NETNS)
    shutil.rmtree(ext.etc_dir, ignore_errors=True)
    if (layout.root / _ETC_NETNS_MARKER).exists() and ETC_NETNS.is_dir() \
            and not any(ETC_NETNS.iterdir()):
        ETC_NETNS.rmdir()
    if layout.root.exists():
        log.info("removing %s", layout.root)
        shutil.rmtree(layout.root)
