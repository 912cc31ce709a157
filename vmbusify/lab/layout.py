"""The lab's names, addresses, paths and generated files, computed and nothing else.

Everything the lab creates is named here, so that ``lab up`` and ``lab down`` agree on it and
tests can find it. Nothing in this module touches the system except the file-rendering
helpers' callers; the functions here only compute.

Layout (K = 1..N)::

    netns vmbl-vmK      lo up, sdn0 = 198.19.K.10/24 (leads nowhere), no default route
    netns vmbl-ext      eth0 = 198.18.0.2/24, default via 198.18.0.1
    root netns          vmbl-ext0 = 198.18.0.1/24 (veth peer of vmbl-ext's eth0)
    /run/vmbusify-lab/  (0711: traversable, not listable)
        host/ (0711) vmbusify.toml, run/, state/, control/ (the command listener's socket
              and token: 0750 with group vmbusify when it exists, as in production)
        vmK/ (0700) vmbusify.toml, run/, state/, control/, tunnel.sock, tunnel.key, and
              release when the VM runs an older release's guest stack (it names the release)
        releases/REF/ (0700) an older release's tree (exported from git) and bin/vmbusify
        ext/run/        pid and log files of the external network's services
    /etc/netns/vmbl-ext/{hosts,resolv.conf}, /etc/netns/vmbl-vmK/{hosts,resolv.conf}

198.18.0.0/15 is the benchmarking range (RFC 2544): meant for labs, never routed.
"""

from __future__ import annotations

import json
import os
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmbusify.config_file import DEFAULT_PROXY_PORT
from vmbusify.errors import LabError


def _instance() -> tuple[str, int]:
    """The lab instance named by ``$VMBUSIFY_LAB_INSTANCE`` ("" = the default lab) and its number.

    Several engineers on one machine each get a lab of their own: an instance shifts every
    name, address, path and port the lab uses, so two instances never touch each other.
    CI and `bin/lab` use the default instance, whose names are the ones documented above.
    """
    name = os.environ.get("VMBUSIFY_LAB_INSTANCE", "").strip()
    if not name:
        return "", 0
    if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", name):
        raise LabError("VMBUSIFY_LAB_INSTANCE must be 1-6 lower-case letters or digits, "
                       f"starting with a letter (got {name!r})")
    return name, 1 + zlib.crc32(name.encode()) % 200


INSTANCE, INSTANCE_NUMBER = _instance()

#: Where the lab keeps its configs, run and state directories (root-only).
LAB_ROOT = Path("/run/vmbusify-lab" + (f"-{INSTANCE}" if INSTANCE else ""))
#: `ip netns exec NAME` bind-mounts ``/etc/netns/NAME/*`` over ``/etc/*``.
ETC_NETNS = Path("/etc/netns")
#: Every namespace and root-namespace link the lab makes starts with this.
PREFIX = f"vb{INSTANCE}-" if INSTANCE else "vmbl-"
MAX_VMS = 254

EXT_NETNS = f"{PREFIX}ext"
#: The host side of the veth pair to the external network (root namespace).
EXT_HOST_IF = f"{PREFIX}ext0"
#: The external namespace's side of that pair.
EXT_IF = "eth0"
EXT_HOST_IP = f"198.18.{INSTANCE_NUMBER}.1"
EXT_IP = f"198.18.{INSTANCE_NUMBER}.2"
EXT_PREFIXLEN = 24
EXT_SUBNET = f"198.18.{INSTANCE_NUMBER}.0/24"
#: The host stack's proxy port (shifted per instance; the command listeners are Unix
#: sockets in each machine's directory).
PROXY_PORT = DEFAULT_PROXY_PORT + 10 * INSTANCE_NUMBER
#: The host's /metrics (docs/metrics.md), on loopback, in the same per-instance block.
METRICS_PORT = PROXY_PORT + 9
#: The host's virtual-subnet interface name (per instance, so instances never share one).
SUBNET_IF = f"{PREFIX}sub0" if INSTANCE else "vmbus0"
#: The virtual subnet's nftables table and addresses (per instance: the host stacks of all
#: instances share the root namespace, so their tables and connected routes must differ).
SUBNET_TABLE = f"vmbusify-{INSTANCE}" if INSTANCE else "vmbusify"
SUBNET_CIDR = f"100.77.{INSTANCE_NUMBER}.0/24"
SUBNET_CIDR6 = f"fd77:7662:7573:{INSTANCE_NUMBER:x}::/64"
#: Names the lab's hosts files give (resolved from files only, never through real DNS).
EXT_NAME = "external.lab"
HOST_NAME = "host.lab"

#: The VM's stand-in for its SDN interface.
SDN_IF = "sdn0"
SDN_PREFIXLEN = 24

_VMID_RE = re.compile(r"^vm([1-9][0-9]*)$")
#: A release a VM's guest stack may run (a git tag or branch; it names a directory).
RELEASE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def vm_index(vmid: str) -> int:
    """The K of ``vmK``; LabError for anything that is not a lab VM id."""
    m = _VMID_RE.match(vmid)
    if not m or int(m.group(1)) > MAX_VMS:
        raise LabError(f"{vmid!r} is not a lab VM (expected vm1 .. vm{MAX_VMS})")
    return int(m.group(1))


class _MachineDirs:
    """A lab machine's files under its ``dir``: the same three on the host and every VM."""

    @property
    def dir(self) -> Path:
        raise NotImplementedError

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def config_path(self) -> Path:
        return self.dir / "vmbusify.toml"

    @property
    def control_dir(self) -> Path:
        """The command listener's own directory (its socket and token)."""
        return self.dir / "control"

    @property
    def control(self) -> str:
        """The command listener's address: every machine of the lab shares one filesystem,
        so each has its own socket (not the default /run/vmbusify-control)."""
        return f"unix:{self.control_dir / 'control.sock'}"


@dataclass(frozen=True)
class VMLayout(_MachineDirs):
    """One simulated VM: its namespace, SDN address and files."""

    index: int
    root: Path

    @property
    def vmid(self) -> str:
        return f"vm{self.index}"

    @property
    def netns(self) -> str:
        return f"{PREFIX}{self.vmid}"

    @property
    def sdn_ip(self) -> str:
        return f"198.19.{self.index}.10"

    @property
    def sdn_cidr(self) -> str:
        """The address with its prefix length, as ``ip addr`` takes it."""
        return f"{self.sdn_ip}/{SDN_PREFIXLEN}"

    @property
    def dir(self) -> Path:
        return self.root / self.vmid


    @property
    def tunnel_path(self) -> Path:
        """The Unix socket that stands in for the VM's vsock listener."""
        return self.dir / "tunnel.sock"

    @property
    def tunnel_address(self) -> str:
        return f"unix:{self.tunnel_path}"

    @property
    def chardev_path(self) -> Path:
        """QEMU lab: the Unix socket of the VM's virtio-serial chardev (QEMU listens on it)."""
        return self.dir / "serial.sock"

    @property
    def chardev_address(self) -> str:
        """QEMU lab: the host stack's address for this VM (it connects to the chardev)."""
        return f"unix:{self.chardev_path}"

    @property
    def key_path(self) -> str:
        """The key this VM shares with the host (root-only; both stacks read this file)."""
        return str(self.dir / "tunnel.key")

    @property
    def etc_dir(self) -> Path:
        return ETC_NETNS / self.netns

    @property
    def release_path(self) -> Path:
        """Names the release this VM's guest stack runs (absent: this checkout's)."""
        return self.dir / "release"


@dataclass(frozen=True)
class HostLayout(_MachineDirs):
    """The simulated physical machine: the root namespace's files."""

    root: Path

    @property
    def dir(self) -> Path:
        return self.root / "host"


    @property
    def proxy(self) -> str:
        return f"127.0.0.1:{PROXY_PORT}"


@dataclass(frozen=True)
class ExternalLayout:
    """The "external network": one namespace behind a veth pair, reachable from the host only."""

    root: Path

    netns: str = EXT_NETNS
    ifname: str = EXT_IF
    ip: str = EXT_IP
    host_if: str = EXT_HOST_IF
    host_ip: str = EXT_HOST_IP
    subnet: str = EXT_SUBNET

    @property
    def cidr(self) -> str:
        return f"{self.ip}/{EXT_PREFIXLEN}"

    @property
    def host_cidr(self) -> str:
        return f"{self.host_ip}/{EXT_PREFIXLEN}"

    @property
    def dir(self) -> Path:
        return self.root / "ext"

    @property
    def run_dir(self) -> Path:
        """Pid and log files of the external network's services (see lab/external.py)."""
        return self.dir / "run"

    @property
    def etc_dir(self) -> Path:
        return ETC_NETNS / self.netns


@dataclass(frozen=True)
class LabLayout:
    """The whole lab under one root directory."""

    root: Path = LAB_ROOT

    def vm(self, index_or_vmid: int | str) -> VMLayout:
        """The layout of VM ``K`` or ``"vmK"``."""
        index = vm_index(index_or_vmid) if isinstance(index_or_vmid, str) else index_or_vmid
        if not 1 <= index <= MAX_VMS:
            raise LabError(f"VM index {index} out of range 1..{MAX_VMS}")
        return VMLayout(index, self.root)

    def vms(self, count: int) -> list[VMLayout]:
        """VMs 1..count."""
        return [self.vm(k) for k in range(1, count + 1)]

    @property
    def host(self) -> HostLayout:
        return HostLayout(self.root)

    def release_dir(self, ref: str) -> Path:
        """Where release ``ref``'s tree is exported (see lab/release.py)."""
        if not RELEASE_RE.match(ref):
            raise LabError(f"{ref!r} is not a release name (a tag such as v0.1.0: letters, "
                           "digits, '.', '_' and '-')")
        return self.root / "releases" / ref

    @property
    def external(self) -> ExternalLayout:
        return ExternalLayout(self.root)


# --- paths of this checkout ---------------------------------------------------------------


def repo_root() -> Path:
    """The checkout this package runs from (the lab needs its ``conf/supervisord.conf``)."""
    return Path(__file__).resolve().parents[2]


def supervisord_conf() -> Path:
    """The program set every lab supervisord runs."""
    conf = repo_root() / "conf" / "supervisord.conf"
    if not conf.is_file():
        raise LabError(f"{conf} is missing: the lab runs from a source checkout only")
    return conf


def venv_bin() -> Path:
    """The directory holding this interpreter's ``vmbusify`` and ``supervisord`` scripts."""
    bindir = Path(sys.executable).parent
    for script in ("vmbusify", "supervisord", "supervisorctl"):
        if not (bindir / script).exists():
            raise LabError(f"{bindir / script} is missing: install with `pip install -e .`")
    return bindir


# --- generated files --------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list) and all(not isinstance(v, dict) for v in value):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as a TOML value")


def toml_dumps(doc: dict[str, Any]) -> str:
    """Write a small document: scalars, lists of scalars, tables and arrays of tables."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    arrays: list[tuple[str, list[dict[str, Any]]]] = []
    for key, value in doc.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, table in tables:
        lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    for key, items in arrays:
        for item in items:
            lines += ["", f"[[{key}]]"] + [f"{k} = {_toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


_HEADER = "# Written by `vmbusify lab up` (on every run); `vmbusify lab down` removes it.\n"


def guest_config(vm: VMLayout, *, first_release: bool = False) -> str:
    """The guest stack's vmbusify.toml: it listens on the VM's tunnel socket.

    ``first_release``: in the shape release 0.1.0 reads (it refuses keys it does not know):
    no ``tunnel.key_file`` (0.1.0 has no keys) and no ``[control]`` (0.1.0's listener takes
    HOST:PORT only; its default, 127.0.0.1:6543, is the VM's own loopback in its namespace).
    """
    doc: dict[str, Any] = {
        "role": "guest",
        "name": vm.vmid,
        "run_dir": str(vm.run_dir),
        "state_dir": str(vm.state_dir),
        "tunnel": {"listen": vm.tunnel_address, "key_file": vm.key_path},
        "control": {"listen": vm.control},
    }
    if first_release:
        doc["tunnel"] = {"listen": vm.tunnel_address}
        del doc["control"]
    return _HEADER + toml_dumps(doc)


def host_config(layout: LabLayout, vms: list[VMLayout],
                keyless: frozenset[str] = frozenset(), qemu: bool = False) -> str:
    """The host stack's vmbusify.toml: every VM, and egress confined to the external network.

    The proxy server may reach the external subnet only; the virtual subnet's NAT goes out of
    the lab's veth and its DNS forwarder asks the external namespace, never the real network.
    The VMs in ``keyless`` (guests of a release without keys) get no ``key_file``: the host
    then asks them for no proof.
    ``qemu``: the VMs are QEMU guests, reached at their virtio-serial chardev sockets.
    """
    ext = layout.external
    return _HEADER + toml_dumps({
        "role": "host",
        "name": "host",
        "run_dir": str(layout.host.run_dir),
        "state_dir": str(layout.host.state_dir),
        "host": {"keep_connected": True},
        "control": {"listen": layout.host.control},
        "metrics": {"listen": f"127.0.0.1:{METRICS_PORT}"},
        "proxy": {"listen": layout.host.proxy, "allow": [ext.subnet],
                  "hosts_file": str(ext.etc_dir / "hosts")},
        "subnet": {"uplink": ext.host_if, "dns_upstream": [ext.ip], "ifname": SUBNET_IF,
                   "table": SUBNET_TABLE, "cidr": SUBNET_CIDR, "cidr6": SUBNET_CIDR6},
        "vms": [{"vmid": vm.vmid,
                 "address": vm.chardev_address if qemu else vm.tunnel_address}
                | ({} if vm.vmid in keyless else {"key_file": vm.key_path}) for vm in vms],
    })


#: Where the QEMU lab's image mounts a VM's config disk (see lab/qemu/image.py).
QEMU_GUEST_ETC = "/etc/vmbusify/vm"


def qemu_guest_config(vm: VMLayout, port: str) -> str:
    """A QEMU guest's vmbusify.toml: it listens on its virtio-serial port ``port``.

    Paths are the guest's own (the packaged ones); the key comes from its config disk.
    """
    return _HEADER + toml_dumps({
        "role": "guest",
        "name": vm.vmid,
        "run_dir": "/run/vmbusify",
        "state_dir": "/var/lib/vmbusify",
        "tunnel": {"listen": f"vport:{port}", "key_file": f"{QEMU_GUEST_ETC}/tunnel.key"},
        "control": {"listen": "unix:/run/vmbusify-control/control.sock"},
    })


def hosts_file(layout: LabLayout, vm: VMLayout | None = None) -> str:
    """/etc/hosts for a lab namespace: the lab's names only (``vm`` None: the external one)."""
    ext = layout.external
    lines = [
        "# Written by `vmbusify lab up`: the lab's names; nothing here reaches the real network.",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{ext.ip}\t{EXT_NAME}",
        f"{ext.host_ip}\t{HOST_NAME}",
    ]
    if vm is not None:
        lines.append(f"{vm.sdn_ip}\t{vm.vmid}.lab {vm.vmid}")
    return "\n".join(lines) + "\n"


def resolv_conf(layout: LabLayout) -> str:
    """/etc/resolv.conf for a lab namespace: only the external namespace's (future) DNS server."""
    return (
        "# Written by `vmbusify lab up`: lab namespaces never ask the machine's resolvers.\n"
        f"nameserver {layout.external.ip}\n"
        "options timeout:1 attempts:1\n"
    )
