"""The QEMU lab's guest image: a Debian root filesystem as an ext4 image, cached outside the
checkout.

Two levels of cache under :data:`CACHE` (``/var/cache/vmbusify-lab``, or
``$VMBUSIFY_LAB_CACHE``):

``rootfs-<hash>.tar``
    ``mmdebstrap`` from Debian's packages (:data:`PACKAGES`, minbase), plus the host's
    kernel modules for the cloud kernel the VMs boot. Minutes, once; the hash covers the
    package list, the suite and the kernel version.
``base-<hash>.img``
    That tarball, with VMBusify and its unit added, as an ext4 image (``mkfs.ext4 -d``).
    Seconds; the hash also covers the VMBusify tree put in. Every VM boots a qcow2 overlay
    of it, so VMs share it and never change it.

VMBusify goes in as an operator's image would get it: the guest package that
``packaging/build-guest.py`` builds, installed with ``dpkg -i`` in a chroot with no network
(:func:`guest_package`, :func:`guest_payload`). A checkout without that builder gets a copy of
its ``vmbusify`` package and ``conf/`` in ``/opt/vmbusify`` with a unit of the lab's own.

Per VM, a small "config disk" (:func:`config_disk`, an ext4 image labelled ``vmbcfg``)
carries what differs between VMs: its ``vmbusify.toml``, key, ``hosts`` and ``resolv.conf``.
The image mounts it read-only at ``/etc/vmbusify/vm`` and links the usual paths to it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vmbusify.errors import LabError
from vmbusify.transport.vport import DEFAULT_PORT_NAME

log = logging.getLogger(__name__)

CACHE = Path(os.environ.get("VMBUSIFY_LAB_CACHE", "/var/cache/vmbusify-lab"))
SUITE = "bookworm"
#: What the guest needs from Debian (the guest package's dependencies, and what the tests use).
PACKAGES = (
    "systemd", "systemd-sysv", "udev", "kmod", "python3", "python3-zmq", "python3-msgpack",
    "python3-psutil", "python3-click", "python3-aiohttp", "supervisor", "iproute2", "curl",
    "iputils-ping", "procps",
)
#: The virtio-serial port's name: the guest finds it as /dev/virtio-ports/PORT_NAME.
PORT_NAME = DEFAULT_PORT_NAME
#: The config disk's ext4 label (the image's fstab mounts it by label).
CONFIG_LABEL = "vmbcfg"
#: Where the image mounts a VM's config disk.
GUEST_ETC = "/etc/vmbusify/vm"
#: What the guest writes to its serial console once VMBusify's unit has started.
READY_MARKER = "vmbusify-lab: guest ready"
IMAGE_SIZE = "1536M"


@dataclass(frozen=True)
class Kernel:
    """The kernel and initrd the VMs boot (Debian's cloud kernel, from /boot)."""

    version: str
    vmlinuz: Path
    initrd: Path

    @property
    def modules(self) -> Path:
        return Path("/lib/modules") / self.version


def find_kernel(boot: Path = Path("/boot")) -> Kernel:
    """The newest cloud kernel with its initrd and modules; LabError naming the package if none."""
    found = []
    for vmlinuz in boot.glob("vmlinuz-*-cloud-amd64"):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        kernel = Kernel(version, vmlinuz, boot / f"initrd.img-{version}")
        if kernel.initrd.is_file() and kernel.initrd.stat().st_size > 0 \
                and kernel.modules.is_dir():
            found.append(kernel)
    if not found:
        raise LabError("no cloud kernel with an initrd in /boot: install linux-image-cloud-amd64 "
                       "(bin/setup --qemu)")
    return max(found, key=lambda k: [int(p) if p.isdigit() else 0
                                     for p in k.version.replace("-", ".").split(".")])


def require_tools() -> None:
    """LabError naming what is missing among the programs the QEMU lab runs."""
    tools = {"qemu-system-x86_64": "qemu-system-x86", "qemu-img": "qemu-utils",
             "mmdebstrap": "mmdebstrap", "mkfs.ext4": "e2fsprogs", "busybox": "busybox-static",
             "cpio": "cpio"}
    missing = sorted({pkg for tool, pkg in tools.items() if shutil.which(tool) is None})
    if missing:
        raise LabError(f"the QEMU lab needs Debian packages {', '.join(missing)} "
                       "(bin/setup --qemu installs them)")


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _run(argv: list[str], what: str, **kwargs: object) -> None:
    log.info("%s: %s", what, " ".join(argv))
    proc = subprocess.run(argv, check=False, capture_output=True, text=True,
                          **kwargs)  # type: ignore
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise LabError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def rootfs_tarball(kernel: Kernel) -> Path:
    """The cached Debian root filesystem (mmdebstrap), building it if needed (minutes, once)."""
    CACHE.mkdir(parents=True, exist_ok=True, mode=0o700)
    tar = CACHE / f"rootfs-{_digest(SUITE, *PACKAGES, kernel.version)}.tar"
    if tar.is_file():
        return tar
    tmp = tar.with_suffix(".tar.part")
    tmp.unlink(missing_ok=True)
    log.info("building the guest's Debian root filesystem (mmdebstrap %s; minutes, once) -> %s",
             SUITE, tar)
    _run(["mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar",
          "--include=" + ",".join(PACKAGES),
          # the VMs boot the host's cloud kernel: its modules go in (virtio_console, tun)
          (f"--customize-hook=mkdir -p \"$1/lib/modules\" && "
          f"cp -a {kernel.modules} \"$1/lib/modules/\""),
          ("--customize-hook=rm -rf \"$1/var/cache/apt/archives\"/*.deb "
          "\"$1/var/lib/apt/lists\"/*_Packages"),
          SUITE, str(tmp)], "mmdebstrap")
    tmp.replace(tar)
    return tar


def repo_root() -> Path:
    """This checkout's top directory."""
    return Path(__file__).resolve().parents[3]


def _payload_files() -> list[Path]:
    root = repo_root()
    files = sorted((root / "vmbusify").rglob("*.py"))
    files += sorted((root / "conf").rglob("*.conf"))
    return files


_UNIT = """\
# Written by the VMBusify QEMU lab's image builder: a stand-in for the guest package's unit,
# used only when this checkout has no packaging/build-guest.py.
[Unit]
Description=VMBusify guest endpoint (tunnel to the host over virtio-serial)
After=systemd-modules-load.service local-fs.target
Wants=systemd-modules-load.service

[Service]
Type=simple
Environment=VMBUSIFY_CONFIG=/etc/vmbusify/vmbusify.toml
Environment=VMBUSIFY_RUN_DIR=/run/vmbusify
Environment=VMBUSIFY_BIN=/opt/vmbusify/bin
Environment=PYTHONPATH=/opt/vmbusify/lib
RuntimeDirectory=vmbusify
RuntimeDirectoryMode=0700
StateDirectory=vmbusify
StateDirectoryMode=0700
ExecStart=/usr/bin/supervisord -n -c /etc/vmbusify/supervisord.conf
KillMode=mixed
TimeoutStopSec=45
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
"""

#: The lab's drop-in for the guest unit (packaged or not): this VM's config from its config
#: disk, and the readiness marker on the serial console.
_DROPIN = f"""\
# Written by the VMBusify QEMU lab's image builder.
[Service]
Environment=VMBUSIFY_CONFIG={GUEST_ETC}/vmbusify.toml
ExecStartPost=/bin/sh -c 'echo "{READY_MARKER}" > /dev/ttyS0'
"""

_SCRIPT = """\
#!/usr/bin/python3
import sys
from {module} import main
sys.exit(main())
"""
_SCRIPTS = {"vmbusify": "vmbusify.cli.main", "vmbusifyctl": "vmbusify.cli.ctl",
            "vmbusifyexec": "vmbusify.cli.exec"}


def guest_package() -> Path | None:
    """The guest's Debian package built by ``packaging/build-guest.py`` (cached by it), or None
    when this checkout has no such builder (then :func:`guest_payload` copies the tree)."""
    builder = repo_root() / "packaging" / "build-guest.py"
    if not builder.is_file():
        return None
    out = CACHE / "deb"
    # This interpreter (the checkout's venv): the builder runs the checkout's own
    # `vmbusify man`, which needs the package's dependencies; a bare python3 may lack them.
    proc = subprocess.run([sys.executable, str(builder), "--out", str(out), "--source",
                           str(repo_root())], check=False, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not Path(lines[-1]).is_file():
        raise LabError(f"packaging/build-guest.py failed (exit {proc.returncode}): "
                       f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    return Path(lines[-1])


def guest_payload(root: Path, deb: Path | None) -> None:
    """Put VMBusify into the unpacked root filesystem ``root``.

    ``deb``: the guest package, installed with ``dpkg -i`` in a chroot (no network: its
    dependencies are Debian's and already in the root filesystem). None: a copy of this
    checkout's tree and a unit of the lab's own, for a checkout without the package builder.
    Either way the lab's drop-in points the unit at the VM's config disk.
    """
    dropin = root / "etc/systemd/system/vmbusify-guest.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "vmbusify-lab.conf").write_text(_DROPIN)
    if deb is not None:
        shutil.copy(deb, root / "tmp" / deb.name)
        _run(["chroot", str(root), "dpkg", "-i", f"/tmp/{deb.name}"],
             "dpkg -i (the guest package, in the image's chroot, no network)",
             env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"})
        (root / "tmp" / deb.name).unlink()
        # The guest's CLIs (vmbusifyctl in the guest) read the same config as its unit.
        conf = root / "etc/vmbusify/vmbusify.toml"
        conf.unlink(missing_ok=True)
        conf.symlink_to("vm/vmbusify.toml")
        return
    src = repo_root()
    lib = root / "opt/vmbusify/lib"
    shutil.copytree(src / "vmbusify", lib / "vmbusify",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    bindir = root / "opt/vmbusify/bin"
    bindir.mkdir(parents=True)
    for name, module in _SCRIPTS.items():
        script = bindir / name
        script.write_text(_SCRIPT.format(module=module))
        script.chmod(0o755)
        (root / "usr/local/bin" / name).symlink_to(f"/opt/vmbusify/bin/{name}")
    for name in ("supervisord", "supervisorctl"):
        (bindir / name).symlink_to(f"/usr/bin/{name}")
    etc = root / "etc/vmbusify"
    etc.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "conf/supervisord.conf", etc / "supervisord.conf")
    shutil.copytree(src / "conf/programs", etc / "programs")
    (etc / "vmbusify.toml").symlink_to("vm/vmbusify.toml")
    unit = root / "etc/systemd/system/vmbusify-guest.service"
    unit.write_text(_UNIT)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / unit.name).symlink_to(f"/etc/systemd/system/{unit.name}")


def _system_setup(root: Path) -> None:
    """What makes the root filesystem a bootable lab guest: fstab, modules, console, names."""
    (root / GUEST_ETC.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (root / "etc/fstab").write_text(
        "/dev/vda / ext4 rw,errors=remount-ro 0 1\n"
        f"LABEL={CONFIG_LABEL} {GUEST_ETC} ext4 ro,nofail 0 0\n")
    (root / "etc/hostname").write_text("vmbusify-guest\n")
    (root / "etc/modules-load.d/vmbusify.conf").write_text("virtio_console\ntun\n")
    # The lab's names: the config disk carries this VM's hosts and resolv.conf.
    for name in ("hosts", "resolv.conf"):
        path = root / "etc" / name
        if path.exists() or path.is_symlink():
            path.unlink()
        path.symlink_to(f"vmbusify/vm/{name}")
    # A root shell on the serial console, for debugging a guest by hand (the lab's own).
    getty = root / "etc/systemd/system/serial-getty@ttyS0.service.d"
    getty.mkdir(parents=True, exist_ok=True)
    (getty / "autologin.conf").write_text(
        "[Service]\nExecStart=\n"
        "ExecStart=-/sbin/agetty --autologin root --noclear %I 115200 linux\n")
    # Nothing that waits on a network or wakes up to download.
    system = root / "etc/systemd/system"
    for unit in ("apt-daily.timer", "apt-daily-upgrade.timer",
                 "systemd-networkd-wait-online.service", "e2scrub_all.timer", "fstrim.timer",
                 "systemd-timesyncd.service"):
        link = system / unit
        if not link.exists():
            link.symlink_to("/dev/null")
    (root / "etc/machine-id").write_text("")


def base_image(kernel: Kernel | None = None) -> Path:
    """The cached ext4 base image every VM boots (building it, and its rootfs, if needed)."""
    require_tools()
    kernel = kernel or find_kernel()
    tar = rootfs_tarball(kernel)
    deb = guest_package()
    if deb is not None:  # its name says its content (build-guest.py's version has a hash)
        payload = [deb.name.encode()]
    else:
        log.info("no packaging/build-guest.py in this checkout: the image gets a copy of "
                 "its vmbusify tree and a unit of the lab's own")
        payload = [str(p.relative_to(repo_root())).encode() + b"\0" + p.read_bytes()
                   for p in _payload_files()]
    # This module's own text too: a change to how the image is made makes a new one.
    img = CACHE / f"base-{_digest(tar.name, Path(__file__).read_bytes(), *payload)}.img"
    if img.is_file():
        return img
    log.info("making the guest image %s (seconds)", img)
    with tempfile.TemporaryDirectory(prefix="vmbusify-image-", dir=CACHE) as tmpdir:
        root = Path(tmpdir) / "root"
        root.mkdir()
        with tarfile.open(tar) as tf:
            tf.extractall(root, filter="fully_trusted")  # our own mmdebstrap output
        _system_setup(root)
        guest_payload(root, deb)
        tmp = Path(tmpdir) / "base.img"
        _run(["mkfs.ext4", "-q", "-F", "-L", "vmbusify-root", "-d", str(root), str(tmp),
              IMAGE_SIZE], "mkfs.ext4")
        tmp.replace(img)
    for old in CACHE.glob("base-*.img"):  # one base image at a time: the current one
        if old != img and not _in_use(old):
            old.unlink(missing_ok=True)
    return img


def _in_use(path: Path) -> bool:
    """True if a running QEMU has ``path`` as a backing file (an overlay of it is booted)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(path) in (proc / "cmdline").read_text():
                    return True
                for fd in (proc / "fd").iterdir():
                    if os.readlink(fd) == str(path):
                        return True
            except OSError:
                continue
    return False


def config_disk(path: Path, files: dict[str, tuple[str, int]]) -> None:
    """Write a small ext4 image at ``path`` holding ``files`` (name -> (text, mode))."""
    with tempfile.TemporaryDirectory(prefix="vmbusify-cfg-") as tmpdir:
        d = Path(tmpdir) / "d"
        d.mkdir(mode=0o700)
        for name, (text, mode) in files.items():
            (d / name).write_text(text)
            (d / name).chmod(mode)
        tmp = path.with_name(path.name + ".tmp")
        _run(["mkfs.ext4", "-q", "-F", "-L", CONFIG_LABEL, "-N", "64", "-d", str(d), str(tmp),
              "4M"], "mkfs.ext4 (config disk)")
        tmp.replace(path)
