"""VMBusify configuration: one TOML file per endpoint, loaded into dataclasses.

The file is found at ``$VMBUSIFY_CONFIG`` or ``/etc/vmbusify/vmbusify.toml`` (finding and
reading it, and the shared defaults, are in ``vmbusify.config_file``). Every key has a
default, so an empty file is a valid guest configuration. Example (host)::

    role = "host"
    run_dir = "/run/vmbusify"          # root-only: ZeroMQ endpoints, supervisord socket
    state_dir = "/var/lib/vmbusify"    # root-only: control token, subnet leases

    [tunnel]
    ping_interval = 5.0                # seconds between pings on an idle tunnel
    dead_after = 15.0                  # no answer for this long: the peer is dead

    [host]
    keep_connected = true              # connect every VM below at start, reconnect forever

    [[vms]]
    vmid = "vm1"
    address = "vsock:3"
    ips = ["198.19.1.10"]              # optional: all vm1 may claim in its HELLO (IPs, CIDRs)

    [subnet]
    allow_vm_to_vm = false             # VM -> VM through the host: subnet and proxy alike

    [control]
    listen = "unix:/run/vmbusify-control/control.sock"   # dir 0750 root:vmbusify (or 0700)
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from vmbusify.config_file import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_CONTROL_LISTEN,
    DEFAULT_CONTROL_PORT,
    DEFAULT_GROUP,
    DEFAULT_PROXY_PORT,
    DEFAULT_RUN_DIR,
    DEFAULT_STATE_DIR,
    DEFAULT_TUNNEL_PORT,
    parse_control_listen,
    read_config_file,
    split_listen,
)
from vmbusify.config_file import (
    token_path as _token_path,
)
from vmbusify.errors import AddressError, ConfigError
from vmbusify.protocol.package import MAX_PAYLOAD_LIMIT
from vmbusify.protocol.window import INITIAL_WINDOW, MAX_CHUNK
from vmbusify.transport.address import parse_address

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_CONTROL_PORT",
    "DEFAULT_PROXY_PORT",
    "DEFAULT_TUNNEL_PORT",
    "Config",
    "ControlConfig",
    "HostConfig",
    "LimitsConfig",
    "MetricsConfig",
    "ProxyConfig",
    "Role",
    "Rule",
    "SubnetConfig",
    "TunnelConfig",
    "VMEntry",
    "as_dict",
    "check_config",
    "load_config",
    "parse_rule",
]


class Role(str, Enum):
    """Which end of the tunnel this endpoint is."""

    HOST = "host"
    GUEST = "guest"


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Rule:
    """One proxy allow or deny rule (``[proxy] allow``, ``deny``): a network and the ports it
    covers (empty: every port). The policy that applies them is workers/proxy/policy.py."""

    network: IPNetwork
    ports: tuple[tuple[int, int], ...] = ()
    text: str = ""

    def matches(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        """Whether ``ip``:``port`` falls under this rule."""
        if ip.version != self.network.version or ip not in self.network:
            return False
        return not self.ports or any(lo <= port <= hi for lo, hi in self.ports)


def _ports(text: str, rule: str) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for part in text.split(","):
        lo_text, sep, hi_text = part.strip().partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if sep else lo
        except ValueError:
            raise ConfigError(f"proxy rule {rule!r}: bad port {part!r}") from None
        if not 0 <= lo <= hi <= 65535:
            raise ConfigError(f"proxy rule {rule!r}: port range {part!r} out of 0..65535")
        out.append((lo, hi))
    return tuple(out)


def parse_rule(text: str) -> Rule:
    """A rule from its config text (``CIDR``, ``CIDR:PORTS``, ``[v6-CIDR]:PORTS``);
    ConfigError if malformed."""
    raw = text.strip()
    ports, sep = "", ""
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0 or (raw[end + 1:] and not raw[end + 1:].startswith(":")):
            raise ConfigError(f"proxy rule {text!r}: expected [CIDR] or [CIDR]:PORTS")
        cidr, sep, ports = raw[1:end], raw[end + 1:end + 2], raw[end + 2:]
    elif raw.count(":") == 1:
        cidr, sep, ports = raw.partition(":")
    else:
        cidr = raw
    if sep and not ports:
        raise ConfigError(f"proxy rule {text!r}: empty port list after ':'")
    try:
        network = ipaddress.ip_network(cidr, strict=False)
    except ValueError as exc:
        raise ConfigError(f"proxy rule {text!r}: {exc}") from None
    return Rule(network, _ports(ports, text) if sep else (), raw)


@dataclass
class TunnelConfig:
    """Tunnel behaviour shared by both ends."""

    #: Guest: where the mux listens. Host: unused.
    listen: str = f"vsock:any:{DEFAULT_TUNNEL_PORT}"
    ping_interval: float = 5.0
    dead_after: float = 15.0
    connect_timeout: float = 5.0
    #: Largest payload accepted in one vmbus package; larger is a protocol error. At least
    #: 1 MiB (the largest stream chunk), at most 16 MiB.
    max_payload: int = 1 << 20
    #: Reconnect backoff on the host: first delay and cap (seconds).
    backoff_initial: float = 0.2
    backoff_max: float = 5.0
    #: Guest only: a root-only file with the key shared with the host ("" = none); when set,
    #: a host that does not prove it knows the key in its HELLO is refused.
    key_file: str = ""
    #: Guest only, vsock: accept only host connections from a privileged source port
    #: (< 1024), which only the host's root can bind. "auto": only the host (CID 2), and a
    #: privileged port too under virtio without a key_file (KVM/QEMU; Firecracker and Cloud
    #: Hypervisor guests, also virtio, need a key_file); "on": both always; "off": anyone.
    #: vmbusify/mux/admission.py, docs/deploy.md "Who may connect to a guest".
    require_privileged_port: str = "auto"


@dataclass
class VMEntry:
    """One VM the host knows: its id and its hypervisor socket address."""

    vmid: str
    address: str
    #: The addresses (IPs or CIDRs) this VM may claim in its HELLO; [] = any address no
    #: other VM claims too and no other VM's ips cover. A claim outside the list is not
    #: taken; an address two VMs claim is held by neither (vmbusify/mux/addresses.py). The
    #: host's proxy never connects to these addresses for a VM (unless
    #: subnet.allow_vm_to_vm).
    ips: list[str] = field(default_factory=list)
    #: A root-only file holding a key shared with this VM's guest ("" = none). When set, the
    #: HELLO carries a challenge-response proving both ends know it (nothing secret on the
    #: wire); the guest refuses a host that cannot answer.
    key_file: str = ""


@dataclass
class HostConfig:
    """Host-only settings."""

    keep_connected: bool = True
    # Appended for issue 16 (VMs found, not listed; docs/discovery.md):
    #: Where else to find VMs besides [[vms]]: "libvirt" (running domains: their vsock CID or
    #: virtio-serial channel), "firecracker" / "cloud-hypervisor" (vsock Unix sockets
    #: matching socket_globs). Looked at every discover_interval seconds.
    discover: list[str] = field(default_factory=list)
    discover_interval: float = 5.0
    #: libvirt: the connection URI given to ``virsh -c`` and the virtio-serial channel name
    #: a domain without a vsock device is reached through.
    libvirt_uri: str = "qemu:///system"
    libvirt_channel: str = "org.vmbusify.0"
    #: Firecracker / Cloud Hypervisor: globs of the VMMs' vsock Unix sockets (the host side
    #: of each VM's vsock); the vmid is the socket's name without its extension ("stem") or
    #: the name of the directory holding it ("dir").
    socket_globs: list[str] = field(default_factory=list)
    socket_vmid: str = "stem"
    #: A root-only directory of shared keys for found VMs: ``<dir>/<vmid>.key`` when it
    #: exists ("" = found VMs get no key).
    discover_key_dir: str = ""

@dataclass
class ControlConfig:
    """The command listener (HTTP)."""

    #: ``unix:/path/control.sock`` (its directory is made root's, 0750 with ``group`` or
    #: 0700, the token beside the socket), or ``tcp:HOST:PORT`` for development (clients then
    #: check the listening socket's owner before they send the token).
    listen: str = DEFAULT_CONTROL_LISTEN
    #: Appended for issue 12: the group granted the socket and the token (like docker.sock)
    #: when it exists; "" = root only.
    group: str = DEFAULT_GROUP


@dataclass
class ProxyConfig:
    """The SOCKS / HTTP proxy worker."""

    listen: str = f"127.0.0.1:{DEFAULT_PROXY_PORT}"
    #: Egress policy of this endpoint's proxy server: CIDR[:PORTS] rules; deny wins.
    allow: list[str] = field(default_factory=lambda: ["0.0.0.0/0", "::/0"])
    deny: list[str] = field(default_factory=list)
    #: One RFC 1929 / Basic user and password accepted besides ``credentials_file``'s (the
    #: config file is often world-readable: prefer the file). On a guest, setting either
    #: makes every user give credentials (``access = "auto"``).
    username: str = ""
    password: str = ""
    connect_timeout: float = 10.0
    #: Refuse link-local / cloud-metadata addresses (and, on the host, its own loopback)
    #: before any allow rule is looked at (see vmbusify/workers/proxy/policy.py).
    default_deny: bool = True
    #: Resolve names for the proxy server from this hosts file only ("" = the system's
    #: resolver). The lab points the host at its own names so nothing asks real DNS.
    hosts_file: str = ""
    # Appended for issue 12 (who may use the proxy; docs/proxy.md "Who may use it"):
    #: "open": every local user; "group": root and members of ``group`` without
    #: credentials, other users with credentials only; "credentials": everyone with
    #: credentials; "auto": "group" on the host, on a guest "open" ("credentials" when some
    #: are configured). The connecting user is the owner of the client's socket.
    access: str = "auto"
    group: str = DEFAULT_GROUP
    #: A root-only file (mode 0600 or 0400) of ``user:password`` lines: credentials accepted
    #: from users who are not served without ("" = none).
    credentials_file: str = ""


@dataclass
class MetricsConfig:
    """Added for issue 16: the Prometheus endpoint (docs/metrics.md), served by the command
    listener on the host."""

    #: ``HOST:PORT`` to serve ``/metrics`` on ("" = off, the default). Anyone who can reach
    #: it reads every VM's name, state and counters: docs/security.md, "Metrics".
    listen: str = ""


@dataclass
class SubnetConfig:
    """The virtual subnet worker."""

    enabled: bool = True
    #: IPv4 subnet (the host is .1). 100.64.0.0/10 is carrier-grade NAT space: seldom on a LAN.
    cidr: str = "100.77.0.0/24"
    #: IPv6 ULA prefix ("" = no IPv6); used only where the host has IPv6.
    cidr6: str = "fd77:7662:7573::/64"
    mtu: int = 65000
    #: The TUN interface on both ends (unique per lab instance).
    ifname: str = "vmbus0"
    #: Host only: the nftables table (family inet) holding every rule of the subnet.
    table: str = "vmbusify"
    #: Hand 64 KiB TCP segments across the tunnel (TUN offloads); see docs/subnet.md.
    offload: bool = True
    #: Host: the metric of the guests' default routes, sent in the lease (any SDN route wins).
    route_metric: int = 65000
    #: Host only: let VMs reach each other through the host. One switch for the subnet (its
    #: firewall drops TUN -> TUN) and the host's proxy (its egress policy denies the subnet's
    #: ranges and every vms[].ips before any allow rule); false keeps VMs apart in both.
    allow_vm_to_vm: bool = False
    #: Host only: the interface NAT masquerades out of ("" = the default route's).
    uplink: str = ""
    #: Host only: upstream DNS servers ("" = the host's /etc/resolv.conf).
    dns_upstream: list[str] = field(default_factory=list)
    #: Guest only: point /etc/resolv.conf at the host while the subnet is up.
    manage_resolv_conf: bool = False


@dataclass
class LimitsConfig:
    """Caps that keep one VM (root in it is hostile) from taking what other VMs need.

    Per VM and per worker process on this endpoint, plus a total over every VM. At a cap the
    new stream or request is refused with the reason, the stream that overran is reset, the
    counter shows in ``vmbusifyctl status``; other VMs do not notice. docs/security.md.
    """

    #: Streams open at once with one VM (the mux refuses the next open) / with all VMs.
    streams_per_vm: int = 4096
    streams_total: int = 65536
    #: Bytes one worker holds for one VM: received and not yet read, or sent and not yet
    #: credited back by the peer (so also what waits in the mux for that VM). At least one
    #: stream window (8 MiB) plus one chunk (1 MiB).
    buffered_per_vm: int = 24 << 20
    #: With the defaults the host's worst case over every VM is about 3 x 384 MiB in the
    #: workers plus tunnel_backlog_total (512 MiB) in the mux: under 2 GB with 64 VMs or more.
    buffered_total: int = 384 << 20
    #: Requests (opens, exec starts, ...) one worker handles for one VM at once. Their
    #: payloads count with the VM's unread bytes (buffered_per_vm), so this bounds tasks,
    #: not bytes: 4096, like streams_per_vm, lets a burst of 1,000 proxy connections open at
    #: once (at 512 the host's proxy refused the burst's last opens: reply 1).
    requests_per_vm: int = 4096
    #: Bytes of packages waiting in the mux to be written to one VM's tunnel; a VM that
    #: stops reading past this is disconnected. Above what the host's three workers may have
    #: in flight to one VM together (3 x buffered_per_vm), so an honest VM that reads slowly
    #: is throttled by its credit, never cut off.
    tunnel_backlog: int = 96 << 20
    #: Packages the mux takes from one tunnel before it serves the others (fairness). 64:
    #: more than a 64 KiB read of subnet packets (~43), so real traffic never waits; beside
    #: a VM flooding tiny packages another VM's ping took 0.6 ms (idle 0.2), 2.5 ms at 256.
    read_budget: int = 64
    #: The subnet's DNS forwarder: TCP connections and queries in flight for one VM.
    dns_tcp_per_vm: int = 8
    dns_queries_per_vm: int = 64
    #: Warnings about one VM's bad input: at most this many lines a minute for each kind
    #: (then one line with the count), so a flood cannot flood the log.
    log_lines_per_minute: int = 10
    #: (mux) tunnel_backlog over every VM together: past it the VM with the most waiting is
    #: disconnected, so VMs that each stay under their own cap cannot together fill the host.
    tunnel_backlog_total: int = 512 << 20


@dataclass
class Config:
    """A whole endpoint's configuration."""

    role: Role = Role.GUEST
    run_dir: str = DEFAULT_RUN_DIR
    state_dir: str = DEFAULT_STATE_DIR
    log_level: str = "INFO"
    #: A name for this endpoint in logs and HELLO (defaults to the hostname).
    name: str = ""
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    host: HostConfig = field(default_factory=HostConfig)
    vms: list[VMEntry] = field(default_factory=list)
    control: ControlConfig = field(default_factory=ControlConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    subnet: SubnetConfig = field(default_factory=SubnetConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    #: Where this configuration was read from ("" when built in code).
    path: str = ""
    #: Appended for issue 16: the Prometheus endpoint (host only).
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def bus_endpoint(self) -> str:
        """The mux's ZeroMQ ROUTER endpoint (inside the root-only run_dir)."""
        return f"ipc://{self.run_dir}/bus.sock"

    @property
    def token_path(self) -> Path:
        """The command listener's bearer token file."""
        return Path(_token_path(self.state_dir, self.control.listen))

    def vm(self, vmid: str) -> VMEntry | None:
        """The configured VM with this id, if any."""
        return next((v for v in self.vms if v.vmid == vmid), None)


class _Problems:
    """Every problem found in one file, each a line ``FILE: KEY: what is wrong``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lines: list[str] = []

    def add(self, key: str, message: str) -> None:
        """Record one problem with ``key`` (dotted, e.g. ``proxy.allow[0]``; "" = the file)."""
        self.lines.append(f"{self.path}: {key}: {message}" if key else f"{self.path}: {message}")


def _build(cls: type, raw: Any, where: str, problems: _Problems) -> Any:
    """Build dataclass ``cls`` from a TOML table; an unknown key or a value of the wrong type
    is a problem, and the key keeps its default (None if a required key is missing)."""
    if not isinstance(raw, dict):
        problems.add(where, "expected a table")
        raw = {}
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        f = known.get(key)
        name = f"{where}.{key}" if where else key
        if f is None or key == "path":
            problems.add(where, f"unknown key {key!r}")
            continue
        try:
            kwargs[key] = _convert(f.type, value, name, problems)
        except ConfigError as exc:
            problems.add(name, str(exc))
    missing = [f.name for f in fields(cls) if f.name not in kwargs
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        problems.add(where, f"missing key {missing[0]!r}")
        return None
    return cls(**kwargs)


_SIMPLE: dict[str, type | tuple[type, ...]] = {
    "str": str, "float": (int, float), "int": int, "bool": bool,
}


def _convert(type_name: Any, value: Any, where: str, problems: _Problems) -> Any:
    """``value`` as a ``type_name``; ConfigError (without the key) when it is not one."""
    type_name = str(type_name)
    nested = {
        "TunnelConfig": TunnelConfig, "HostConfig": HostConfig, "ControlConfig": ControlConfig,
        "ProxyConfig": ProxyConfig, "SubnetConfig": SubnetConfig, "LimitsConfig": LimitsConfig,
        "MetricsConfig": MetricsConfig,
    }
    if type_name in nested:
        return _build(nested[type_name], value, where, problems)
    if type_name == "Role":
        try:
            return Role(value)
        except ValueError:
            raise ConfigError(f"must be 'host' or 'guest', not {value!r}") from None
    if type_name == "list[VMEntry]":
        if not isinstance(value, list):
            raise ConfigError("expected an array of tables")
        built = [_build(VMEntry, v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return [vm for vm in built if vm is not None]
    if type_name == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError("expected an array of strings")
        return list(value)
    expected = _SIMPLE.get(type_name)
    if expected is not None:
        if isinstance(value, bool) and type_name != "bool":
            raise ConfigError(f"expected {type_name}, got a boolean")
        if not isinstance(value, expected):
            raise ConfigError(f"expected {type_name}, got {type(value).__name__}")
        return float(value) if type_name == "float" else value  # type: ignore[arg-type]
    raise ConfigError(f"unsupported type {type_name}")  # pragma: no cover


def check_config(path: str | os.PathLike[str] | None = None) -> tuple[Config | None, list[str]]:
    """Read and check a configuration file (``path``, ``$VMBUSIFY_CONFIG`` or the default):
    the config (None when the file cannot be read) and every problem found, one line each
    (``FILE: KEY: what is wrong``), as ``vmbusify check-config`` prints them."""
    try:
        chosen, raw = read_config_file(path)
    except ConfigError as exc:
        return None, [str(exc)]
    problems = _Problems(chosen)
    config = _build(Config, raw, "", problems)
    config.path = chosen if os.path.exists(chosen) else ""
    _check_values(config, problems)
    return config, problems.lines


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the configuration from ``path``, ``$VMBUSIFY_CONFIG`` or the default path.

    A missing default file gives the defaults; a missing file that was asked for by name,
    unreadable TOML, an unknown key, a value of the wrong type or one that cannot work
    (check_config) raises ConfigError with the first problem (and how many more there are).
    """
    config, problems = check_config(path)
    if problems:
        more = len(problems) - 1
        raise ConfigError(problems[0] + (f" (and {more} more problem{'s' if more > 1 else ''}"
                                         ": vmbusify check-config lists them)" if more else ""))
    assert config is not None
    return config


#: What ``[proxy] access`` may say.
PROXY_ACCESS = ("auto", "open", "group", "credentials")
#: The levels ``log_level`` may name (any case).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: A network interface name as Linux takes it (IFNAMSIZ: 15 characters).
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
#: An nftables table name.
_NFT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
#: The MTU a subnet may have: IPv6's minimum to the largest IP packet (protocol/subnet.py's
#: MAX_PACKET, which a lease may carry; not imported: that module costs config's start 20 ms).
MTU_RANGE = (1280, 0xFFFF)


def _check_values(config: Config, problems: _Problems) -> None:
    """Values of the right type that still cannot work: say so now, on one line each,
    instead of letting a program fail later (with a traceback) or restart in a loop."""
    add = problems.add
    if config.log_level.upper() not in LOG_LEVELS:
        add("log_level", f"{config.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    for key in ("run_dir", "state_dir"):
        _check_path(getattr(config, key), key, problems, required=True)
    _check_tunnel(config, problems)
    _check_vms(config, problems)
    _check_limits(config.limits, problems)
    try:
        parse_control_listen(config.control.listen)
    except ConfigError as exc:
        add("control.listen", str(exc))
    else:
        if not config.control.listen.startswith("unix:"):
            _check_listen(config.control.listen.removeprefix("tcp:"), "control.listen",
                          problems)
    _check_proxy(config.proxy, problems)
    _check_subnet(config.subnet, problems)
    _check_discovery(config.host, problems)
    if config.metrics.listen:
        _check_metrics_listen(config.metrics.listen, problems)


def _check_path(value: str, key: str, problems: _Problems, required: bool = False) -> None:
    """A path in the file must be absolute (programs start in any directory)."""
    if not value and not required:
        return
    if not value.startswith("/") or "\0" in value:
        problems.add(key, f"{value!r} is not an absolute path")


def _check_listen(listen: str, key: str, problems: _Problems) -> None:
    """A ``HOST:PORT`` to listen on: the port 1-65535."""
    try:
        _host, port = split_listen(listen)
    except ConfigError as exc:
        problems.add(key, str(exc))
        return
    if not 0 < port <= 65535:
        problems.add(key, f"port {port} is not a port (1-65535)")


def _check_tunnel(config: Config, problems: _Problems) -> None:
    t = config.tunnel
    for key in ("ping_interval", "dead_after", "connect_timeout", "backoff_initial",
                "backoff_max"):
        if not getattr(t, key) > 0:
            problems.add(f"tunnel.{key}", f"must be > 0, not {getattr(t, key)!r}")
    if t.ping_interval > 0 and t.dead_after > 0 and t.dead_after <= t.ping_interval:
        problems.add("tunnel.dead_after", f"dead_after ({t.dead_after:g}) must be longer than "
                     f"ping_interval ({t.ping_interval:g})")
    if not MAX_CHUNK <= t.max_payload <= MAX_PAYLOAD_LIMIT:
        problems.add("tunnel.max_payload", f"must be between {MAX_CHUNK} (the largest stream "
                     f"chunk) and {MAX_PAYLOAD_LIMIT}, not {t.max_payload}")
    if t.require_privileged_port not in ("auto", "on", "off"):
        problems.add("tunnel.require_privileged_port", "must be 'auto', 'on' or 'off', not "
                     f"{t.require_privileged_port!r}")
    _check_path(t.key_file, "tunnel.key_file", problems)
    if config.role is Role.GUEST:
        try:
            parse_address(t.listen)
        except AddressError as exc:
            problems.add("tunnel.listen", str(exc))


def _check_vms(config: Config, problems: _Problems) -> None:
    seen: set[str] = set()
    for i, vm in enumerate(config.vms):
        key = f"vms[{i}]"
        if not vm.vmid or not vm.vmid.isprintable() or any(c in vm.vmid for c in " /"):
            problems.add(f"{key}.vmid", f"{vm.vmid!r} is not a VM id (printable, no spaces "
                         "or '/')")
        if vm.vmid in seen:
            problems.add(f"{key}.vmid", f"vmid {vm.vmid!r} appears twice")
        seen.add(vm.vmid)
        try:
            parse_address(vm.address)
        except AddressError as exc:
            problems.add(f"{key}.address", str(exc))
        for net in vm.ips:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                problems.add(f"{key}.ips", f"{net!r} is not an address or network")
        _check_path(vm.key_file, f"{key}.key_file", problems)


def _check_proxy(proxy: ProxyConfig, problems: _Problems) -> None:
    _check_listen(proxy.listen, "proxy.listen", problems)
    for key in ("allow", "deny"):
        for i, text in enumerate(getattr(proxy, key)):
            try:
                parse_rule(text)
            except ConfigError as exc:
                problems.add(f"proxy.{key}[{i}]", str(exc))
    if proxy.access not in PROXY_ACCESS:
        problems.add("proxy.access", f"must be one of {', '.join(PROXY_ACCESS)}, not "
                     f"{proxy.access!r}")
    if not proxy.connect_timeout > 0:
        problems.add("proxy.connect_timeout", f"must be > 0, not {proxy.connect_timeout!r}")
    for key in ("hosts_file", "credentials_file"):
        _check_path(getattr(proxy, key), f"proxy.{key}", problems)


def _check_subnet(sub: SubnetConfig, problems: _Problems) -> None:
    add = problems.add
    _check_network(sub.cidr, "subnet.cidr", ipaddress.IPv4Network, 30,
                   "(the host and one VM)", problems)
    if sub.cidr6:
        _check_network(sub.cidr6, "subnet.cidr6", ipaddress.IPv6Network, 126, "", problems)
    if not MTU_RANGE[0] <= sub.mtu <= MTU_RANGE[1]:
        add("subnet.mtu", f"must be between {MTU_RANGE[0]} and {MTU_RANGE[1]}, not {sub.mtu}")
    if not 0 <= sub.route_metric <= 2**32 - 1:
        add("subnet.route_metric", f"must be between 0 and {2**32 - 1}, not {sub.route_metric}")
    for key in ("ifname", "uplink"):
        value = getattr(sub, key)
        if (value or key == "ifname") and not _IFNAME.fullmatch(value):
            add(f"subnet.{key}", f"{value!r} is not an interface name (1-15 letters, digits, "
                "'_', '.', '-')")
    if not _NFT_NAME.fullmatch(sub.table):
        add("subnet.table", f"{sub.table!r} is not an nftables table name")
    for server in sub.dns_upstream:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            add("subnet.dns_upstream", f"{server!r} is not an IP address")


#: What ``[host] discover`` may name.
DISCOVERY_SOURCES = ("libvirt", "firecracker", "cloud-hypervisor")


def _check_discovery(host: HostConfig, problems: _Problems) -> None:
    for source in host.discover:
        if source not in DISCOVERY_SOURCES:
            problems.add("host.discover", f"{source!r} is not one of "
                         f"{', '.join(DISCOVERY_SOURCES)}")
    if not host.discover_interval > 0:
        problems.add("host.discover_interval", "must be > 0")
    if host.socket_vmid not in ("stem", "dir"):
        problems.add("host.socket_vmid", f"must be 'stem' or 'dir', not {host.socket_vmid!r}")
    sockets = {"firecracker", "cloud-hypervisor"} & set(host.discover)
    if sockets and not host.socket_globs:
        problems.add("host.discover", f"lists {min(sockets)!r}: host.socket_globs must name "
                     "where its vsock sockets are")
    _check_path(host.discover_key_dir, "host.discover_key_dir", problems)


def _check_metrics_listen(listen: str, problems: _Problems) -> None:
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        ok = bool(sep) and 0 < int(port) < 65536
    except ValueError:
        ok = False
    if not ok:
        problems.add("metrics.listen", "expected IP:PORT (e.g. 127.0.0.1:9641 or "
                     f"[::1]:9641), not {listen!r}")


def _check_network(text: str, key: str, kind: type[IPNetwork], longest: int, why: str,
                   problems: _Problems) -> None:
    """A subnet's network: of ``kind`` (IPv4Network or IPv6Network), no host bits, and a
    prefix no longer than ``longest``."""
    try:
        net = kind(text)
    except ValueError as exc:
        version = 4 if kind is ipaddress.IPv4Network else 6
        problems.add(key, f"{text!r} is not an IPv{version} network: {exc}")
        return
    if net.prefixlen > longest:
        problems.add(key, f"{text!r} is too small: a /{longest} at least {why}".rstrip())


def _check_limits(limits: LimitsConfig, problems: _Problems) -> None:
    add = problems.add
    for f in fields(limits):
        if not getattr(limits, f.name) > 0:
            add(f"limits.{f.name}", f"must be > 0, not {getattr(limits, f.name)!r}")
    floor = INITIAL_WINDOW + MAX_CHUNK
    if limits.buffered_per_vm < floor:
        add("limits.buffered_per_vm", f"at least {floor} (one stream window and one chunk)")
    for per_vm, total in (("streams_per_vm", "streams_total"),
                          ("buffered_per_vm", "buffered_total")):
        if getattr(limits, total) < getattr(limits, per_vm):
            add(f"limits.{total}", f"must be at least {per_vm}")
    if limits.tunnel_backlog < floor:
        add("limits.tunnel_backlog", f"at least {floor}")
    if limits.tunnel_backlog_total < limits.tunnel_backlog:
        add("limits.tunnel_backlog_total", "must be at least tunnel_backlog")


def as_dict(obj: Any) -> Any:
    """A plain-data view of a config object (for status output and tests)."""
    if is_dataclass(obj):
        return {f.name: as_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, list):
        return [as_dict(v) for v in obj]
    if isinstance(obj, Enum):
        return obj.value
    return obj
