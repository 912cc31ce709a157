"""[host] discover = ["libvirt"] against a real libvirtd running a real QEMU guest (TCG),
defined like the QEMU lab's: Debian with VMBusify's guest package, no NIC, one
virtio-serial channel ``org.vmbusify.0`` (docs/discovery.md, "libvirt").

Marked ``qemu`` (not in the default run). It needs root, the QEMU lab's tools and kernel,
and a libvirtd answering at ``qemu:///system`` (``VMBUSIFY_TEST_LIBVIRT_URI`` to change
it); it skips, saying which, without them. It defines and starts a transient domain of its
own (``vmbusify-test-discover``) and destroys it at the end; nothing else in libvirt is
touched. The host mux runs as a program with a worker link on its bus, as in
tests/integration (no lab needed).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_qemu_lab import _skip_reason as qemu_lab_skip_reason
from tests.integration.harness import MuxProc, link_for, wait_state, write_config
from vmbusify.bus.link import WorkerLink
from vmbusify.lab.qemu import image
from vmbusify.protocol.entities import Entity

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.timeout(600)]

URI = os.environ.get("VMBUSIFY_TEST_LIBVIRT_URI", "qemu:///system")
DOMAIN = "vmbusify-test-discover"
#: A TCG guest on a loaded 2-core machine: systemd and the guest stack take a while.
BOOT_TIMEOUT = 300.0


def _virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True,
                          timeout=120, check=check)


def _skip_reason() -> str | None:
    reason = qemu_lab_skip_reason()  # root, QEMU's tools, the cloud kernel
    if reason:
        return reason
    if shutil.which("virsh") is None:
        return "virsh (libvirt-clients) is not installed"
    probe = _virsh("list", "--name", check=False)
    if probe.returncode != 0:
        return f"no libvirtd at {URI}: {probe.stderr.strip()[-200:]}"
    return None


def _domain_xml(d: Path, kernel: image.Kernel) -> str:
    """Like vmbusify/lab/qemu/vm.py's command line, in libvirt's terms."""
    return f"""<domain type='qemu'>
  <name>{DOMAIN}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel.vmlinuz}</kernel><initrd>{kernel.initrd}</initrd>
    <cmdline>root=/dev/vda rw console=ttyS0 panic=-1 systemd.hostname={DOMAIN} quiet
      systemd.show_status=error</cmdline>
  </os>
  <devices>
    <emulator>{shutil.which("qemu-system-x86_64")}</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='unsafe'/>
      <source file='{d}/disk.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='{d}/config.img'/><target dev='vdb' bus='virtio'/><readonly/></disk>
    <channel type='unix'><source mode='bind' path='{d}/serial.sock'/>
      <target type='virtio' name='{image.PORT_NAME}'/></channel>
    <serial type='file'><source path='{d}/console.log'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@pytest.fixture
def domain(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """The guest's files under tmp_path (its key in ``keys/DOMAIN.key``) and the running
    transient domain's UUID; destroyed at the end."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    kernel = image.find_kernel()
    base = image.base_image(kernel)
    key = secrets.token_hex(32) + "\n"
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / f"{DOMAIN}.key").write_text(key)
    (keys / f"{DOMAIN}.key").chmod(0o600)
    guest = (f'role = "guest"\nname = "{DOMAIN}"\nrun_dir = "/run/vmbusify"\n'
             'state_dir = "/var/lib/vmbusify"\n'
             f'[tunnel]\nlisten = "vport:{image.PORT_NAME}"\n'
             'key_file = "/etc/vmbusify/vm/tunnel.key"\n'
             '[control]\nlisten = "unix:/run/vmbusify-control/control.sock"\n')
    image.config_disk(tmp_path / "config.img", {
        "vmbusify.toml": (guest, 0o600), "tunnel.key": (key, 0o600),
        "hosts": (f"127.0.0.1\tlocalhost\n127.0.1.1\t{DOMAIN}\n", 0o644),
        "resolv.conf": ("# no DNS: the guest has no network\n", 0o644)})
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(tmp_path / "disk.qcow2")], check=True)
    (tmp_path / "domain.xml").write_text(_domain_xml(tmp_path, kernel))
    _virsh("destroy", DOMAIN, check=False)  # a leftover of an interrupted run
    _virsh("create", str(tmp_path / "domain.xml"))
    try:
        uuid = _virsh("domuuid", DOMAIN).stdout.strip()
        yield tmp_path, uuid
    finally:
        _virsh("destroy", DOMAIN, check=False)


async def _vms(link: WorkerLink) -> dict[str, dict[str, Any]]:
    return {v["vmid"]: v for v in (await link.control({"cmd": "status"}))["vms"]}


def test_a_running_libvirt_domain_is_found_connected_and_dropped_when_it_stops(
        domain: tuple[Path, str]) -> None:
    root, uuid = domain
    host_cfg = write_config(root / "host.toml", (
        f'role = "host"\nname = "host"\nrun_dir = "{root}/host-run"\n'
        f'state_dir = "{root}/host-state"\n'
        f'[host]\ndiscover = ["libvirt"]\ndiscover_interval = 1.0\nlibvirt_uri = "{URI}"\n'
        f'discover_key_dir = "{root}/keys"\n'
        f'[control]\nlisten = "unix:{root}/host-control/control.sock"\n'))
    host = MuxProc("host", host_cfg, root / "host.log")
    host.start()

    async def scenario() -> None:
        link = await link_for(host, "t-host", [Entity.CMD_LISTENER])
        try:
            vm = await wait_state(link, DOMAIN, "connected", timeout=BOOT_TIMEOUT)
            assert vm["source"] == "libvirt" and vm["aliases"] == [uuid.lower()]
            assert vm["address"] == f"unix:{root}/serial.sock"
            assert vm["hostname"] == DOMAIN  # the guest's own HELLO
            pong = await link.control({"cmd": "ping", "vmid": uuid}, timeout=30)
            assert pong["vmid"] == DOMAIN and pong["rtt_ms"] > 0
            deadline = time.monotonic() + 30
            while not (await _vms(link))[DOMAIN]["guest_stats"]:
                assert time.monotonic() < deadline, "no STATS from the guest"
                await asyncio.sleep(0.5)
            await asyncio.to_thread(_virsh, "destroy", DOMAIN)
            deadline = time.monotonic() + 30
            while DOMAIN in await _vms(link):
                assert time.monotonic() < deadline, "the stopped domain is still listed"
                await asyncio.sleep(0.5)
        finally:
            await link.close()

    try:
        asyncio.run(asyncio.wait_for(scenario(), BOOT_TIMEOUT + 120))
    finally:
        host.kill(signal.SIGTERM)
    log = host.log()
    assert f"vm={DOMAIN}: the guest proved the shared key" in log, log[-2000:]
    assert "Traceback" not in log
