"""Hypervisor sockets: one address syntax, and asyncio streams over each kind.

``parse_address`` reads ``vsock:``, ``hyperv:``, ``fc:``, ``unix:``, ``tcp:`` and ``vport:``
(a guest's virtio-serial port) addresses;
``connect`` and ``listen`` open them. Every failure is a TransportError (AddressError for a
malformed address) carrying a one-line reason that names the address.
"""

from vmbusify.transport._streams import STREAM_LIMIT, ClientConnected, Streams, take_over
from vmbusify.transport.address import (
    HV_GUID_CHILDREN,
    HV_GUID_LOOPBACK,
    HV_GUID_PARENT,
    HV_GUID_WILDCARD,
    VMADDR_CID_ANY,
    VMADDR_CID_HOST,
    Address,
    FirecrackerAddress,
    HypervAddress,
    TcpAddress,
    TransportKind,
    UnixAddress,
    VportAddress,
    VsockAddress,
    as_address,
    parse_address,
    service_guid,
)
from vmbusify.transport.sockets import connect, listen
from vmbusify.transport.vport import PortDevice, VportListener, find_port, port_path
from vmbusify.transport.vsock import local_cid

__all__ = [
    "HV_GUID_CHILDREN", "HV_GUID_LOOPBACK", "HV_GUID_PARENT", "HV_GUID_WILDCARD",
    "STREAM_LIMIT", "VMADDR_CID_ANY", "VMADDR_CID_HOST",
    "Address", "ClientConnected", "FirecrackerAddress", "HypervAddress", "PortDevice",
    "Streams", "TcpAddress", "TransportKind", "UnixAddress", "VportAddress", "VportListener",
    "VsockAddress", "as_address", "connect", "find_port", "listen", "local_cid",
    "parse_address", "port_path", "service_guid", "take_over",
]
