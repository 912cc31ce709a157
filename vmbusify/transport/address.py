"""One address syntax for every hypervisor socket VMBusify can use.

Theory of operation: an address is a short string that a person writes in the config file
or on the command line. ``parse_address`` turns it into one of six frozen dataclasses,
each tagged with a ``TransportKind``; ``str()`` of a parsed address gives it back in
canonical form, so ``parse_address(str(a)) == a`` always holds::

    vsock:CID[:PORT]          AF_VSOCK. CID >= 2, or ``any`` (listen) or ``host`` (= 2)
    hyperv:VMID[:PORT]        AF_HYPERV on a Windows host; VMID a GUID or a well-known name
    fc:/path/v.sock[:PORT]    Firecracker / Cloud Hypervisor hybrid vsock (a Unix socket)
    unix:/path                plain Unix socket
    tcp:HOST:PORT             TCP, for development and tests (IPv6 as ``tcp:[::1]:PORT``)
    vport:NAME                a guest's virtio-serial port by name (/dev/virtio-ports/NAME)
    vport:/dev/vport0p1       ... or by device path; the guest listens on it, never connects

The port defaults to ``DEFAULT_TUNNEL_PORT`` where it is optional. Parsing is strict: every
part is checked, nothing may trail, and an ``AddressError`` names the part that is wrong.
This module does no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

from vmbusify.config_file import DEFAULT_TUNNEL_PORT
from vmbusify.errors import AddressError

#: AF_VSOCK "any CID": what a listener binds to.
VMADDR_CID_ANY = 0xFFFFFFFF
#: AF_VSOCK CID of the host, seen from a guest (and of the peer, seen from a hv_sock guest).
VMADDR_CID_HOST = 2
#: AF_VSOCK "any port": bind() picks one; never a port to connect to.
VMADDR_PORT_ANY = 0xFFFFFFFF

#: Hyper-V VM-id wildcards (the HV_GUID_* constants of hvsocket.h).
HV_GUID_WILDCARD = "00000000-0000-0000-0000-000000000000"
HV_GUID_CHILDREN = "90DB8B89-0D35-4F79-8CE9-49EA0AC8B7CD"
HV_GUID_LOOPBACK = "E0E16197-DD56-4A10-9195-5EE7A155A838"
HV_GUID_PARENT = "A42E7CDA-D03F-480C-9CC2-A4DE20ABB878"

#: Names accepted in place of a VM id, and how they render.
HV_VMID_NAMES: dict[str, str] = {
    "wildcard": HV_GUID_WILDCARD,
    "children": HV_GUID_CHILDREN,
    "loopback": HV_GUID_LOOPBACK,
    "parent": HV_GUID_PARENT,
}
_HV_NAME_OF = {guid: name for name, guid in HV_VMID_NAMES.items()}

#: The service GUID template that hv_sock uses to map a vsock port onto Hyper-V.
_HV_SERVICE_TEMPLATE = "%08X-FACB-11E6-BD58-64006A7986D3"

_VSOCK_PORT_MAX = 0xFFFFFFFE  # 0xFFFFFFFF is VMADDR_PORT_ANY
_IP_PORT_MAX = 65535
# sun_path holds 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107

_GUID_RE = re.compile(r"[0-9A-Fa-f]{8}-(?:[0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12}")
_HOSTNAME_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_DIGITS_RE = re.compile(r"[0-9]+")


class TransportKind(str, Enum):
    """Which kind of socket an address names; the value is its scheme."""

    VSOCK = "vsock"
    HYPERV = "hyperv"
    FC = "fc"
    UNIX = "unix"
    TCP = "tcp"
    #: A virtio-serial port in the guest (the host reaches it through QEMU's chardev
    #: socket, a ``unix:`` address): vmbusify/transport/vport.py.
    VPORT = "vport"


def service_guid(port: int) -> str:
    """The Hyper-V service GUID (upper case) that hv_sock maps vsock ``port`` to."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFFFFFF:
        raise AddressError(f"vsock port {port!r} does not fit in 32 bits")
    return _HV_SERVICE_TEMPLATE % port


def _check_port(port: int, maximum: int, what: str) -> None:
    """Raise AddressError unless ``port`` is an int in 1..maximum."""
    if isinstance(port, bool) or not isinstance(port, int):
        raise AddressError(f"{what} port must be an integer, not {port!r}")
    if not 1 <= port <= maximum:
        hint = " (0xFFFFFFFF is VMADDR_PORT_ANY)" if port == VMADDR_PORT_ANY else ""
        raise AddressError(f"{what} port {port} is out of range 1..{maximum}{hint}")


def _check_path(path: str, what: str) -> None:
    """Raise AddressError unless ``path`` is an absolute path that fits in sun_path."""
    if not path:
        raise AddressError(f"{what} needs a socket path")
    if not path.startswith("/"):
        raise AddressError(f"{what} path {path!r} must be absolute")
    if "\0" in path:
        raise AddressError(f"{what} path must not contain NUL")
    if len(path.encode()) > UNIX_PATH_MAX:
        raise AddressError(f"{what} path is longer than {UNIX_PATH_MAX} bytes")


@dataclass(frozen=True, slots=True)
class VsockAddress:
    """An AF_VSOCK address: a context id (VM) and a 32-bit port."""

    kind: ClassVar[TransportKind] = TransportKind.VSOCK
    cid: int
    port: int = DEFAULT_TUNNEL_PORT

    def __post_init__(self) -> None:
        if isinstance(self.cid, bool) or not isinstance(self.cid, int):
            raise AddressError(f"vsock CID must be an integer, not {self.cid!r}")
        # CID 0 is the hypervisor, 1 is local loopback; neither is a VM to reach.
        if not VMADDR_CID_HOST <= self.cid <= VMADDR_CID_ANY:
            raise AddressError(f"vsock CID {self.cid} is out of range (2 and up, or 'any')")
        _check_port(self.port, _VSOCK_PORT_MAX, "vsock")

    def __str__(self) -> str:
        if self.cid == VMADDR_CID_ANY:
            cid = "any"
        elif self.cid == VMADDR_CID_HOST:
            cid = "host"
        else:
            cid = str(self.cid)
        return f"vsock:{cid}:{self.port}"

    @property
    def sockaddr(self) -> tuple[int, int]:
        """The ``(cid, port)`` tuple that AF_VSOCK sockets take."""
        return (self.cid, self.port)


@dataclass(frozen=True, slots=True)
class HypervAddress:
    """An AF_HYPERV address: a VM id and the port whose service GUID it maps to."""

    kind: ClassVar[TransportKind] = TransportKind.HYPERV
    #: The VM id, an upper-case GUID (the well-known names are stored as their GUIDs).
    vmid: str
    port: int = DEFAULT_TUNNEL_PORT

    def __post_init__(self) -> None:
        if not isinstance(self.vmid, str) or not _GUID_RE.fullmatch(self.vmid):
            raise AddressError(f"hyperv VM id {self.vmid!r} is not a GUID")
        if self.vmid != self.vmid.upper():
            # Normalise so that equal GUIDs compare equal.
            object.__setattr__(self, "vmid", self.vmid.upper())
        _check_port(self.port, _VSOCK_PORT_MAX, "hyperv")

    def __str__(self) -> str:
        return f"hyperv:{_HV_NAME_OF.get(self.vmid, self.vmid)}:{self.port}"

    @property
    def service_id(self) -> str:
        """The service GUID for this address's port."""
        return service_guid(self.port)

    @property
    def sockaddr(self) -> tuple[str, str]:
        """The ``(vm_id, service_id)`` tuple that AF_HYPERV sockets take."""
        return (self.vmid, self.service_id)


@dataclass(frozen=True, slots=True)
class FirecrackerAddress:
    """A Firecracker / Cloud Hypervisor hybrid-vsock address: the VMM's Unix socket + port."""

    kind: ClassVar[TransportKind] = TransportKind.FC
    uds_path: str
    port: int = DEFAULT_TUNNEL_PORT

    def __post_init__(self) -> None:
        _check_path(self.uds_path, "fc")
        _check_port(self.port, _VSOCK_PORT_MAX, "fc")

    def __str__(self) -> str:
        return f"fc:{self.uds_path}:{self.port}"

    @property
    def listen_path(self) -> str:
        """Where the host listens for guest-initiated connections to this port."""
        return f"{self.uds_path}_{self.port}"


@dataclass(frozen=True, slots=True)
class UnixAddress:
    """A plain Unix stream socket."""

    kind: ClassVar[TransportKind] = TransportKind.UNIX
    path: str

    def __post_init__(self) -> None:
        _check_path(self.path, "unix")

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True, slots=True)
class TcpAddress:
    """A TCP address; meant for development and tests on loopback."""

    kind: ClassVar[TransportKind] = TransportKind.TCP
    #: A host name (lower case), an IPv4 address or an IPv6 address (without brackets).
    host: str
    port: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", _normalise_host(self.host))
        _check_port(self.port, _IP_PORT_MAX, "tcp")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


#: A virtio-serial port name: what QEMU's ``virtserialport,name=`` and libvirt's
#: ``<target type='virtio' name=.../>`` accept in practice (e.g. ``org.vmbusify.0``).
_VPORT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True, slots=True)
class VportAddress:
    """A guest's virtio-serial port: by its name (``org.vmbusify.0``), or by the path of
    its character device (``/dev/vport0p1``; also how tests hand in a stand-in)."""

    kind: ClassVar[TransportKind] = TransportKind.VPORT
    #: The port name, or an absolute device path (starts with ``/``).
    port: str

    def __post_init__(self) -> None:
        if not isinstance(self.port, str) or not self.port:
            raise AddressError("vport needs a port name (as in vport:org.vmbusify.0) or a "
                               "device path")
        if self.port.startswith("/"):
            if "\0" in self.port or len(self.port.encode()) > 4095:
                raise AddressError("vport device path is not a usable path")
        elif not _VPORT_NAME_RE.fullmatch(self.port):
            raise AddressError(f"vport port name {self.port!r} must be letters, digits, "
                               "'.', '_' or '-' (at most 128), or an absolute device path")

    def __str__(self) -> str:
        return f"vport:{self.port}"

    @property
    def is_path(self) -> bool:
        """Whether ``port`` is a device path rather than a port name."""
        return self.port.startswith("/")


#: Any parsed address; ``address.kind`` says which.
Address = (VsockAddress | HypervAddress | FirecrackerAddress | UnixAddress | TcpAddress
           | VportAddress)


def _normalise_host(host: str) -> str:
    """Canonical form of a TCP host: compressed IP, or a lower-case host name."""
    if not isinstance(host, str) or not host:
        raise AddressError("tcp needs a host")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if ":" in host or "%" in host:
        raise AddressError(f"tcp host {host!r} is not a valid IPv6 address")
    labels = host.rstrip(".").split(".") if host != "." else [""]
    if len(host) > 253 or not all(_HOSTNAME_LABEL_RE.fullmatch(label) for label in labels):
        raise AddressError(f"tcp host {host!r} is not a valid host name or IP address")
    if labels[-1].isdigit():
        # "10.1" would reach the resolver as a legacy inet_aton() form: refuse it.
        raise AddressError(f"tcp host {host!r} is not a valid IPv4 address")
    return host.lower()


def _parse_int(text: str, what: str) -> int:
    """A decimal integer with no sign, space or underscore, else AddressError."""
    if not _DIGITS_RE.fullmatch(text):
        raise AddressError(f"{what} {text!r} is not a decimal number")
    if len(text) > 20:
        # Also keeps int() clear of its limit on huge digit strings.
        raise AddressError(f"{what} {text[:20]}... is out of range")
    return int(text)


def _parse_vsock(rest: str) -> VsockAddress:
    parts = rest.split(":")
    if len(parts) > 2:
        raise AddressError(f"trailing {':' + ':'.join(parts[2:])!r} after the port")
    cid_text = parts[0]
    port = _parse_int(parts[1], "vsock port") if len(parts) == 2 else DEFAULT_TUNNEL_PORT
    name = cid_text.lower()
    if name == "any":
        cid = VMADDR_CID_ANY
    elif name == "host":
        cid = VMADDR_CID_HOST
    elif not cid_text:
        raise AddressError("vsock needs a CID (a number >= 2, 'any' or 'host')")
    else:
        if not _DIGITS_RE.fullmatch(cid_text):
            raise AddressError(
                f"vsock CID {cid_text!r} is not a number >= 2, 'any' or 'host'")
        cid = _parse_int(cid_text, "vsock CID")
        if cid == VMADDR_CID_ANY:
            raise AddressError("vsock CID 4294967295 is VMADDR_CID_ANY: write 'any'")
    return VsockAddress(cid, port)


def _parse_hyperv(rest: str) -> HypervAddress:
    parts = rest.split(":")
    if len(parts) > 2:
        raise AddressError(f"trailing {':' + ':'.join(parts[2:])!r} after the port")
    vmid_text = parts[0]
    port = _parse_int(parts[1], "hyperv port") if len(parts) == 2 else DEFAULT_TUNNEL_PORT
    vmid = HV_VMID_NAMES.get(vmid_text.lower())
    if vmid is None:
        if not _GUID_RE.fullmatch(vmid_text):
            names = ", ".join(HV_VMID_NAMES)
            raise AddressError(
                f"hyperv VM id {vmid_text!r} is not a GUID "
                f"(like (Get-VM NAME).Id) or one of {names}")
        vmid = vmid_text
    return HypervAddress(vmid, port)


def _parse_fc(rest: str) -> FirecrackerAddress:
    # The path may not hold a colon: that keeps "fc:/v.sock:65x" an error, not a path.
    parts = rest.split(":")
    if len(parts) > 2:
        raise AddressError(f"fc path {':'.join(parts[:-1])!r} must not contain ':'")
    port = _parse_int(parts[1], "fc port") if len(parts) == 2 else DEFAULT_TUNNEL_PORT
    return FirecrackerAddress(parts[0], port)


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def _parse_tcp(rest: str) -> TcpAddress:
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise AddressError("tcp IPv6 host is missing its closing ']'")
        host, after = rest[1:close], rest[close + 1:]
        if not after.startswith(":"):
            junk = f"trailing {after!r} after the host" if after else "tcp needs a port"
            raise AddressError(junk)
        if not _is_ipv6(host):
            raise AddressError(f"tcp host [{host}] is not an IPv6 address")
        port_text = after[1:]
    else:
        if rest.count(":") > 1:
            if _is_ipv6(rest.rpartition(":")[0]) or _is_ipv6(rest):
                raise AddressError("tcp IPv6 hosts need brackets, as in tcp:[::1]:PORT")
            host, _, tail = rest.partition(":")
            raise AddressError(f"trailing {':' + tail.partition(':')[2]!r} after the port")
        host, sep, port_text = rest.partition(":")
        if not sep:
            raise AddressError("tcp needs a port, as in tcp:127.0.0.1:PORT")
    return TcpAddress(host, _parse_int(port_text, "tcp port"))


_PARSERS: dict[TransportKind, Callable[[str], Address]] = {
    TransportKind.VSOCK: _parse_vsock,
    TransportKind.HYPERV: _parse_hyperv,
    TransportKind.FC: _parse_fc,
    TransportKind.UNIX: UnixAddress,
    TransportKind.TCP: _parse_tcp,
    TransportKind.VPORT: VportAddress,
}


def parse_address(text: str) -> Address:
    """Parse a transport address; raise AddressError with a one-line reason if it is bad.

    The message starts with the address as given and then names the part that is wrong.
    """
    if not isinstance(text, str):
        raise AddressError(f"an address must be a string, not {type(text).__name__}")
    shown = text if len(text) <= 200 else text[:200] + "..."
    if not text.isprintable():
        raise AddressError(f"address {shown!r}: contains control characters")
    if text != text.strip():
        raise AddressError(f"address {shown!r}: has leading or trailing whitespace")
    scheme, sep, rest = text.partition(":")
    try:
        kind = TransportKind(scheme.lower())
    except ValueError:
        schemes = ", ".join(k.value for k in TransportKind)
        what = f"unknown scheme {scheme!r}" if sep else "missing a scheme"
        raise AddressError(f"address {shown!r}: {what} (expected one of {schemes})") from None
    try:
        return _PARSERS[kind](rest)
    except AddressError as exc:
        raise AddressError(f"address {shown!r}: {exc}") from None


def as_address(address: Address | str) -> Address:
    """Return ``address`` parsed if it is a string, unchanged if it is already parsed."""
    if isinstance(address, str):
        return parse_address(address)
    if isinstance(address, Address):
        return address
    raise AddressError(f"not an address: {address!r}")
