"""Which connections a guest takes as its host, before a byte is read (sans-I/O).

On vsock a guest can tell who opened a connection: the host itself is CID 2, and a source
port below 1024 can be bound only by the host's root (CAP_NET_BIND_SERVICE). Under
KVM/QEMU (vhost-vsock) that keeps every other host user out. Firecracker and Cloud
Hypervisor give every host connection a port from 2^30 up, and Hyper-V one derived from a
random GUID, so there the port says nothing and the shared key (tunnel.key_file) is the
guard. docs/deploy.md, "Who may connect to a guest".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vmbusify.config import TunnelConfig
from vmbusify.transport.address import VMADDR_CID_HOST, TransportKind, parse_address
from vmbusify.transport.vsock import LAST_RESERVED_PORT, GuestTransport


@dataclass(frozen=True)
class Admission:
    """The rule a guest's listener applies to each new connection."""

    #: Only connections from the host (CID 2) are taken.
    host_cid_only: bool
    #: Only connections from a source port <= 1023 are taken.
    privileged_port: bool
    #: Why, in words, for the start-up log line.
    why: str

    def refusal(self, peername: Any) -> str | None:
        """Why a connection from ``peername`` (a vsock ``(cid, port)``) is refused, or None.

        Anything that is not a vsock address (a Unix socket in tests) passes: the rule is
        only ever on for vsock listeners.
        """
        if not (self.host_cid_only or self.privileged_port):
            return None
        if not (isinstance(peername, tuple) and len(peername) == 2
                and all(isinstance(v, int) for v in peername)):
            return f"peer address {peername!r} is not a vsock address"
        cid, port = peername
        if self.host_cid_only and cid != VMADDR_CID_HOST:
            return (f"connection from CID {cid}, not from the host (CID {VMADDR_CID_HOST}): "
                    "only the host may connect")
        if self.privileged_port and port > LAST_RESERVED_PORT:
            return (f"connection from port {port}: this guest takes only the host's root, "
                    f"from a port <= {LAST_RESERVED_PORT} (tunnel.require_privileged_port; "
                    "under Firecracker, Cloud Hypervisor or Hyper-V set it to \"off\" and "
                    "use tunnel.key_file, docs/deploy.md)")
        return None


def admission(tunnel: TunnelConfig, transport: GuestTransport) -> Admission:
    """The rule for a guest listening on ``tunnel.listen`` over ``transport``.

    ``require_privileged_port``: "off" takes every connection; "on" takes only CID 2 from a
    privileged port; "auto" takes only CID 2, and requires a privileged port under virtio
    when the guest has no key (a guest with a key is guarded by it, and that is what
    Firecracker and Cloud Hypervisor guests, also virtio, need). An unknown transport is
    treated as virtio: refusing a host with a clear line is better than taking anyone.
    """
    setting = tunnel.require_privileged_port
    if parse_address(tunnel.listen).kind is not TransportKind.VSOCK:
        return Admission(False, False, f"{tunnel.listen} is not vsock: no port rule")
    if setting == "off":
        return Admission(False, False, "require_privileged_port = off")
    if setting == "on":
        return Admission(True, True, "require_privileged_port = on")
    if tunnel.key_file:
        return Admission(True, False, "auto: a key_file is set, the key guards the tunnel")
    if transport is GuestTransport.HYPERV:
        return Admission(True, False, "auto: Hyper-V gives host connections other ports")
    return Admission(True, True, f"auto: {transport.value} vsock and no key_file")
