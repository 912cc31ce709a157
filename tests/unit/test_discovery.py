"""VMs found, not listed (docs/discovery.md): libvirt domain XML, vsock sockets by glob, the
[host] settings that name them, and the vmids names become."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmbusify.config import load_config
from vmbusify.errors import ConfigError
from vmbusify.mux.discovery import VMID_MAX, as_vmid
from vmbusify.mux.discovery.libvirt import MAX_XML, parse_domain
from vmbusify.mux.discovery.sockets import find_sockets

UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"


def _domain(devices: str, name: str = "web-1") -> str:
    return (f"<domain type='kvm' id='3'><name>{name}</name><uuid>{UUID.upper()}</uuid>"
            f"<devices>{devices}</devices></domain>")


def test_a_vsock_cid_libvirt_chose_is_read_from_the_live_xml() -> None:
    """``auto='yes'``: the live XML (virsh dumpxml of a running domain) has the address."""
    vm = parse_domain(_domain("<vsock model='virtio'><cid auto='yes' address='42'/></vsock>"),
                      "org.vmbusify.0")
    assert vm is not None
    assert (vm.vmid, vm.address, vm.aliases, vm.source) == (
        "web-1", "vsock:42:6541", (UUID,), "libvirt")


def test_a_domain_without_vsock_is_reached_at_its_virtio_serial_channel() -> None:
    xml = _domain("<channel type='pty'><target type='virtio' name='org.vmbusify.0'/></channel>"
                  "<channel type='unix'><source mode='bind' path='/var/lib/x/other.sock'/>"
                  "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
                  "<channel type='unix'><source mode='bind' path='/var/lib/x/vb.sock'/>"
                  "<target type='virtio' name='org.vmbusify.0'/></channel>")
    vm = parse_domain(xml, "org.vmbusify.0")
    assert vm is not None and vm.address == "unix:/var/lib/x/vb.sock"
    assert parse_domain(xml, "org.other.0") is None


@pytest.mark.parametrize("devices", [
    "",
    "<vsock model='virtio'><cid auto='yes'/></vsock>",  # inactive XML: no address yet
    "<vsock model='virtio'><cid address='2'/></vsock>",  # the host's own CID
    "<vsock model='virtio'><cid address='x'/></vsock>",
])
def test_a_domain_with_no_usable_channel_is_left_out(devices: str) -> None:
    assert parse_domain(_domain(devices), "org.vmbusify.0") is None


def test_bad_xml_is_a_config_error_not_a_traceback() -> None:
    with pytest.raises(ConfigError, match="does not parse"):
        parse_domain("<domain><name>x</name>", "org.vmbusify.0")
    with pytest.raises(ConfigError, match="more than"):
        parse_domain("<a>" + " " * MAX_XML + "</a>", "org.vmbusify.0")


@pytest.mark.parametrize(("name", "vmid"), [
    ("web-1", "web-1"), ("db 2", "db_2"), ("../../etc", "etc"), ("x" * 100, "x" * VMID_MAX),
    ("émoji☃", "moji"), ("...", ""),
])
def test_names_become_safe_vmids(name: str, vmid: str) -> None:
    assert as_vmid(name) == vmid


@pytest.fixture
def sockets(tmp_path: Path) -> Iterator[Path]:
    held = []
    for rel in ("fc/a.vsock", "fc/b.vsock", "ch/vm7/v.sock", "ch/vm8/v.sock"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        held.append(s)
    (tmp_path / "fc" / "c.vsock").write_text("not a socket")
    yield tmp_path
    for s in held:
        s.close()


def test_sockets_are_found_by_glob_and_named_by_stem_or_dir(sockets: Path) -> None:
    found = find_sockets([f"{sockets}/fc/*.vsock"], "stem", "firecracker")
    assert [(f.vmid, f.address) for f in found] == [
        ("a", f"fc:{sockets}/fc/a.vsock:6541"), ("b", f"fc:{sockets}/fc/b.vsock:6541")]
    found = find_sockets([f"{sockets}/ch/*/v.sock"], "dir", "cloud-hypervisor")
    assert [f.vmid for f in found] == ["vm7", "vm8"]
    assert {f.source for f in found} == {"cloud-hypervisor"}
    # Two sockets that make one vmid: the first wins, the other is not a second VM.
    assert [f.vmid for f in find_sockets([f"{sockets}/ch/*/v.sock"], "stem", "x")] == ["v"]


@pytest.mark.parametrize(("text", "error"), [
    ('[host]\ndiscover = ["vmware"]\n', "is not one of"),
    ('[host]\ndiscover = ["firecracker"]\n', "socket_globs must name"),
    ('[host]\nsocket_vmid = "uuid"\n', "must be 'stem' or 'dir'"),
    ('[host]\ndiscover_interval = 0\n', "must be > 0"),
    ('[metrics]\nlisten = "localhost:9641"\n', "expected IP:PORT"),
    ('[metrics]\nlisten = "127.0.0.1:70000"\n', "expected IP:PORT"),
    ('[metrics]\nlisten = "127.0.0.1"\n', "expected IP:PORT"),
])
def test_bad_discovery_and_metrics_settings_are_refused_at_load(
        tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "h.toml"
    path.write_text('role = "host"\n' + text)
    with pytest.raises(ConfigError, match=error):
        load_config(path)


def test_discovery_and_metrics_settings_load(tmp_path: Path) -> None:
    path = tmp_path / "h.toml"
    path.write_text('role = "host"\n[host]\ndiscover = ["libvirt", "firecracker"]\n'
                    'socket_globs = ["/run/fc/*.vsock"]\nlibvirt_uri = "qemu:///session"\n'
                    '[metrics]\nlisten = "[::1]:9641"\n')
    config = load_config(path)
    assert config.host.discover == ["libvirt", "firecracker"]
    assert config.host.libvirt_channel == "org.vmbusify.0"
    assert config.metrics.listen == "[::1]:9641"
    assert load_config(tmp_path / "h.toml").metrics.listen  # and loads again
    empty = tmp_path / "e.toml"
    empty.write_text("")
    assert load_config(empty).metrics.listen == ""  # off unless asked for
