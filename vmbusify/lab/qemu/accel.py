"""Which accelerator the QEMU lab's VMs use: KVM where a guest really boots under it, TCG otherwise.

Opening /dev/kvm is no proof: on some hosts KVM_CREATE_VM succeeds and the guest kernel then
hangs in early boot. So the probe boots the lab's own kernel with a one-line busybox
initramfs under KVM and waits (at most :data:`PROBE_TIMEOUT` s) for its marker on the serial
console. The answer is cached per kernel and QEMU binary; ``--accel kvm|tcg`` overrides it.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from vmbusify.errors import LabError
from vmbusify.lab.qemu import image
from vmbusify.text import printable

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 20.0
PROBE_MARKER = "vmbusify-kvm-probe-ok"


class Accel(enum.StrEnum):
    """The accelerators the lab knows."""

    KVM = "kvm"
    TCG = "tcg"


#: QEMU's CPU model per accelerator (``-cpu host`` needs KVM; TCG emulates ``max``).
CPU = {Accel.KVM: "host", Accel.TCG: "max"}


def probe_initramfs() -> Path:
    """A cached initramfs whose /init (busybox) prints :data:`PROBE_MARKER` and powers off."""
    out = image.CACHE / "probe-initramfs.cpio"
    if out.is_file():
        return out
    busybox = shutil.which("busybox")
    if busybox is None:
        raise LabError("the KVM probe needs busybox (Debian package busybox-static)")
    image.CACHE.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(prefix="vmbusify-probe-") as tmpdir:
        root = Path(tmpdir)
        (root / "bin").mkdir()
        shutil.copy(busybox, root / "bin/busybox")
        init = root / "init"
        init.write_text("#!/bin/busybox sh\n"
                        f"/bin/busybox echo {PROBE_MARKER}\n"
                        "/bin/busybox poweroff -f\n")
        init.chmod(0o755)
        files = "bin\nbin/busybox\ninit" + "\n"
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "wb") as f:
            subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], input=files.encode(),
                           cwd=root, stdout=f, check=True)
        tmp.replace(out)
    return out


def boots_under(accel: Accel, kernel: image.Kernel, timeout: float = PROBE_TIMEOUT) -> bool:
    """True if ``kernel`` reaches the probe's marker on its serial console under ``accel``."""
    argv = [
        "qemu-system-x86_64", "-accel", accel.value, "-cpu", CPU[accel], "-m", "128",
        "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-nic", "none", "-serial", "stdio", "-kernel", str(kernel.vmlinuz),
        "-initrd", str(probe_initramfs()), "-append", "console=ttyS0 panic=-1 quiet",
    ]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    seen = b""
    try:
        while time.monotonic() - start < timeout:
            chunk = proc.stdout.read()
            if chunk:
                seen = (seen + chunk)[-4096:]
                if PROBE_MARKER.encode() in seen:
                    log.info("%s boots the guest kernel (%.1f s to the probe's marker)",
                             accel.value, time.monotonic() - start)
                    return True
            if proc.poll() is not None and not chunk:
                break
            time.sleep(0.1)
        last = seen.decode(errors="replace").strip().splitlines()[-1:]
        log.info("%s does not boot the guest kernel here within %g s (%s)", accel.value,
                 timeout, printable(last[0]) if last else "no output on its console")
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def _cache_key(kernel: image.Kernel) -> str:
    qemu = shutil.which("qemu-system-x86_64") or ""
    mtime = os.stat(qemu).st_mtime_ns if qemu else 0
    return f"{kernel.version} {qemu} {mtime}"


def choose(kernel: image.Kernel, override: Accel | str | None = None) -> Accel:
    """The accelerator to use: ``override`` if given, else the cached or freshly probed answer."""
    if override:
        try:
            accel = Accel(override)
        except ValueError:
            raise LabError(f"--accel must be kvm or tcg, not {override!r}") from None
        if accel is Accel.KVM and not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise LabError("--accel kvm: /dev/kvm is missing or not usable")
        return accel
    cache = image.CACHE / "accel.json"
    key = _cache_key(kernel)
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return Accel(cached["accel"])
    except (OSError, ValueError, KeyError):
        pass
    kvm_ok = os.access("/dev/kvm", os.R_OK | os.W_OK) and boots_under(Accel.KVM, kernel)
    accel = Accel.KVM if kvm_ok else Accel.TCG
    image.CACHE.mkdir(parents=True, exist_ok=True, mode=0o700)
    cache.write_text(json.dumps({"key": key, "accel": accel.value}) + "\n")
    log.info("accelerator: %s (cached in %s; --accel overrides)", accel.value, cache)
    return accel
