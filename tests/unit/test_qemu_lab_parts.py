"""The QEMU lab's parts that need no root and boot nothing: QEMU's command line, the configs
it writes, the accelerator's choice and cache, and ``lab status`` for a QEMU lab."""

from __future__ import annotations

import importlib.util
import json
import tomllib
from pathlib import Path

import pytest

from vmbusify.errors import LabError
from vmbusify.lab.lab import ExternalStatus, HostStatus, Kind, LabStatus, VMStatus
from vmbusify.lab.layout import LabLayout, host_config, qemu_guest_config
from vmbusify.lab.qemu import accel, image
from vmbusify.lab.qemu import vm as qemu_vm

LAYOUT = LabLayout(Path("/run/test-lab"))
KERNEL = image.Kernel("6.1.0-99-cloud-amd64", Path("/boot/vmlinuz-6.1.0-99-cloud-amd64"),
                      Path("/boot/initrd.img-6.1.0-99-cloud-amd64"))


def test_qemu_gets_no_nic_and_one_virtio_serial_port_on_the_vms_socket() -> None:
    vm = LAYOUT.vm(2)
    argv = qemu_vm.argv(vm, KERNEL, accel.Accel.TCG)
    assert argv[0] == "qemu-system-x86_64"
    assert "-nodefaults" in argv and argv[argv.index("-nic") + 1] == "none"
    assert not [a for a in argv if a in ("-netdev", "-net", "-device") and "net" in a]
    assert not any("virtio-net" in a or "e1000" in a for a in argv)
    joined = " ".join(argv)
    assert f"path={vm.chardev_path},server=on,wait=off" in joined
    assert "virtio-serial-pci" in joined
    assert f"name={image.PORT_NAME}" in [a.split(",")[-1] for a in argv
                                         if a.startswith("virtserialport,")]
    assert argv[argv.index("-accel") + 1] == "tcg" and argv[argv.index("-smp") + 1] == "1"
    assert int(argv[argv.index("-m") + 1]) <= 512
    assert f"file={qemu_vm.overlay_path(vm)},if=virtio,format=qcow2" in joined
    assert "systemd.hostname=vm2" in argv[argv.index("-append") + 1]


def test_kvm_uses_the_host_cpu() -> None:
    argv = qemu_vm.argv(LAYOUT.vm(1), KERNEL, accel.Accel.KVM)
    assert argv[argv.index("-accel") + 1] == "kvm" and argv[argv.index("-cpu") + 1] == "host"


def test_the_guest_listens_on_its_port_and_the_host_connects_to_the_chardev() -> None:
    vm = LAYOUT.vm(3)
    guest = tomllib.loads(qemu_guest_config(vm, image.PORT_NAME))
    assert guest["role"] == "guest" and guest["name"] == "vm3"
    assert guest["tunnel"]["listen"] == f"vport:{image.PORT_NAME}"
    assert guest["tunnel"]["key_file"] == f"{image.GUEST_ETC}/tunnel.key"
    host = tomllib.loads(host_config(LAYOUT, [vm], qemu=True))
    assert host["vms"] == [{"vmid": "vm3", "address": f"unix:{vm.chardev_path}",
                            "key_file": vm.key_path}]
    # the namespace lab's host config is unchanged
    host = tomllib.loads(host_config(LAYOUT, [vm]))
    assert host["vms"][0]["address"] == vm.tunnel_address


def _status(kind: Kind, qemu_pid: int | None) -> LabStatus:
    vm = VMStatus(vmid="vm1", netns="", sdn_ip="", tunnel="/x/serial.sock", run_dir="/x",
                  config="/x/vmbusify.toml", netns_present=False, supervisord_pid=None,
                  qemu_pid=qemu_pid, console="/x/console.log")
    return LabStatus(root="/run/test-lab", vms=[vm],
                     external=ExternalStatus("e", "1.2.3.4", "e0", "1.2.3.1", True),
                     host=HostStatus("/c", "/r", "unix:/s", 42), kind=kind.value)


def test_status_of_a_qemu_lab_keeps_its_shape_with_kind() -> None:
    doc = _status(Kind.QEMU, 1234).to_json()
    assert doc["kind"] == "qemu" and doc["up"] is True
    assert set(doc) == {"root", "vms", "external", "host", "kind", "up"}
    assert doc["vms"][0]["qemu_pid"] == 1234
    json.dumps(doc)
    # a VM whose QEMU is gone makes the lab degraded, and says so
    st = _status(Kind.QEMU, None)
    assert st.up is False and "QEMU NOT RUNNING" in st.render()
    # the namespace lab judges by its namespaces and supervisords, as before
    assert _status(Kind.NETNS, 1234).up is False


def test_accel_override_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image, "CACHE", tmp_path)
    probes: list[accel.Accel] = []

    def fake_probe(a: accel.Accel, kernel: image.Kernel, timeout: float = 0) -> bool:
        probes.append(a)
        return False

    monkeypatch.setattr(accel, "boots_under", fake_probe)
    monkeypatch.setattr(accel.os, "access", lambda path, mode: True)
    assert accel.choose(KERNEL, "tcg") is accel.Accel.TCG and probes == []
    assert accel.choose(KERNEL) is accel.Accel.TCG and probes == [accel.Accel.KVM]
    assert accel.choose(KERNEL) is accel.Accel.TCG and len(probes) == 1  # cached
    assert json.loads((tmp_path / "accel.json").read_text())["accel"] == "tcg"
    # a different kernel probes again
    other = image.Kernel("6.1.0-100-cloud-amd64", KERNEL.vmlinuz, KERNEL.initrd)
    accel.choose(other)
    assert len(probes) == 2
    with pytest.raises(LabError, match="kvm or tcg"):
        accel.choose(KERNEL, "xen")


def test_no_usable_kvm_means_no_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image, "CACHE", tmp_path)
    monkeypatch.setattr(accel, "boots_under", lambda *a, **k: pytest.fail("probed"))
    monkeypatch.setattr(accel.os, "access", lambda path, mode: False)
    assert accel.choose(KERNEL) is accel.Accel.TCG
    with pytest.raises(LabError, match="/dev/kvm"):
        accel.choose(KERNEL, "kvm")


def test_find_kernel_wants_an_initrd_and_modules(tmp_path: Path) -> None:
    (tmp_path / "vmlinuz-6.1.0-1-cloud-amd64").write_bytes(b"k")
    with pytest.raises(LabError, match="linux-image-cloud-amd64"):
        image.find_kernel(tmp_path)
    (tmp_path / "initrd.img-6.1.0-1-cloud-amd64").write_bytes(b"")  # empty: being generated
    with pytest.raises(LabError):
        image.find_kernel(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("vmbusify.transport.vport") is None,
                    reason="needs the guest's virtio-serial transport (vport:NAME, issue 14)")
def test_the_guest_config_loads(tmp_path: Path) -> None:
    from vmbusify.config import load_config
    path = tmp_path / "vmbusify.toml"
    path.write_text(qemu_guest_config(LAYOUT.vm(1), image.PORT_NAME))
    config = load_config(path)
    assert str(config.tunnel.listen) == f"vport:{image.PORT_NAME}"
