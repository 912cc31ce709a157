"""AF_VSOCK: a KVM/QEMU host reaching a guest by CID, and any Linux guest listening.

A Linux guest on Hyper-V uses this module too: its hv_sock transport is AF_VSOCK, with
ports mapped to service GUIDs (see ``address.service_guid``).

Buffer sizes are set before connect() and listen() because hv_sock sizes its VMBus ring
buffers from SO_SNDBUF/SO_RCVBUF at that moment (accepted sockets inherit the listener's),
and virtio sizes its credit window from SO_VM_SOCKETS_BUFFER_SIZE the same way.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import socket
import struct
from enum import Enum
from pathlib import Path

from vmbusify.errors import TransportError
from vmbusify.transport._streams import (
    ClientConnected,
    Streams,
    check_timeout,
    connect_nonblocking,
    open_streams,
    serve,
    timeout_error,
    transport_error,
)
from vmbusify.transport.address import VMADDR_CID_ANY, VMADDR_CID_HOST, VsockAddress

AF_VSOCK = 40
#: SO_SNDBUF/SO_RCVBUF request. The kernel doubles it; hv_sock caps its rings at 64 pages.
SOCKET_BUFFER = 256 << 10
#: virtio-vsock receive window (the kernel default and cap are 256 KiB).
VSOCK_BUFFER = 1 << 20
_BACKLOG = 64
# Linux <linux/vm_sockets.h> values, for Pythons built without them.
_SO_VM_SOCKETS_BUFFER_SIZE = getattr(socket, "SO_VM_SOCKETS_BUFFER_SIZE", 0)
_SO_VM_SOCKETS_BUFFER_MAX_SIZE = getattr(socket, "SO_VM_SOCKETS_BUFFER_MAX_SIZE", 2)
_IOCTL_GET_LOCAL_CID = getattr(socket, "IOCTL_VM_SOCKETS_GET_LOCAL_CID", 0x7B9)

log = logging.getLogger(__name__)

#: vsock ports up to this one can be bound only with CAP_NET_BIND_SERVICE (the kernel's
#: LAST_RESERVED_PORT): a guest that sees such a source port knows the host's root opened it.
LAST_RESERVED_PORT = 1023

_NO_VSOCK = ("this kernel has no AF_VSOCK support (load vhost_vsock on a KVM host; "
             "vmw_vsock_virtio_transport or hv_sock in a guest)")


def _connect_hint(address: VsockAddress, err: int | None) -> str:
    """What a connect errno means for vsock, in words a user can act on."""
    if err == errno.ECONNRESET:
        # virtio answers a connect to a closed port with a reset, not a refusal.
        return f"nothing listens on vsock port {address.port} in CID {address.cid}"
    if err == errno.ECONNREFUSED:
        return f"nothing listens on vsock port {address.port} in CID {address.cid}"
    if err == errno.ENODEV:
        return (f"no VM with CID {address.cid} is running here, or no vsock transport "
                "is loaded (modprobe vhost_vsock)")
    if err == errno.ETIMEDOUT:
        return f"CID {address.cid} did not answer (is the VM up, with a vsock device?)"
    if err == errno.EAFNOSUPPORT:
        return _NO_VSOCK
    return ""


def _listen_hint(address: VsockAddress, err: int | None) -> str:
    """What a bind/listen errno means for vsock."""
    if err == errno.EADDRINUSE:
        return f"vsock port {address.port} is already taken"
    if err == errno.EACCES:
        return "ports below 1024 need CAP_NET_BIND_SERVICE"
    if err == errno.EADDRNOTAVAIL:
        return f"CID {address.cid} is not this machine's; listen on vsock:any:{address.port}"
    if err == errno.EAFNOSUPPORT:
        return _NO_VSOCK
    return ""


def new_socket() -> socket.socket:
    """A non-blocking AF_VSOCK stream socket with its buffers sized (raises OSError)."""
    family = getattr(socket, "AF_VSOCK", AF_VSOCK)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # CPython passes every AF_VSOCK option as a 64-bit integer; the kernel reads the
        # first 4 bytes for SOL_SOCKET options, which is right on little-endian hosts.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        try:
            sock.setsockopt(family, _SO_VM_SOCKETS_BUFFER_MAX_SIZE, VSOCK_BUFFER)
            sock.setsockopt(family, _SO_VM_SOCKETS_BUFFER_SIZE, VSOCK_BUFFER)
        except OSError:
            pass  # a larger window is an optimisation; the default works
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def local_cid() -> int:
    """This machine's own vsock CID (a guest's CID as the host sees it)."""
    try:
        with open("/dev/vsock", "rb") as dev:
            raw = fcntl.ioctl(dev, _IOCTL_GET_LOCAL_CID, b"\0" * 4)
    except OSError as exc:
        raise transport_error("/dev/vsock", "reading the local CID", exc) from None
    return int(struct.unpack("I", raw)[0])


class GuestTransport(str, Enum):
    """Which vsock transport carries a guest's connections to and from its host."""

    #: virtio-vsock: KVM/QEMU (vhost-vsock), Firecracker, Cloud Hypervisor.
    VIRTIO = "virtio"
    #: Hyper-V sockets (hv_sock).
    HYPERV = "hyperv"
    UNKNOWN = "unknown"


def guest_transport(sys_root: str = "/sys") -> GuestTransport:
    """The transport this guest's vsock device uses, from sysfs.

    virtio when a virtio device is bound to ``vmw_vsock_virtio_transport``; Hyper-V when the
    machine has a VMBus and no such device; otherwise unknown. Under virtio the guest cannot
    tell QEMU from Firecracker or Cloud Hypervisor: all three look the same from inside.
    """
    root = Path(sys_root)
    virtio = root / "bus/virtio/drivers/vmw_vsock_virtio_transport"
    try:
        if virtio.is_dir() and any(p.name.startswith("virtio") for p in virtio.iterdir()):
            return GuestTransport.VIRTIO
        vmbus = root / "bus/vmbus/devices"
        if vmbus.is_dir() and any(vmbus.iterdir()):
            return GuestTransport.HYPERV
    except OSError:
        pass
    return GuestTransport.UNKNOWN


def bind_privileged(sock: socket.socket, top: int = LAST_RESERVED_PORT) -> int | None:
    """Bind ``sock`` to the highest free vsock port at or below ``top`` (and above 0), so a
    guest sees a source port only the host's root can have; returns the port.

    Ports in use are skipped. None when no port is free or this process may not bind one
    (not root: EACCES); the caller then connects from an ordinary port.
    """
    for port in range(top, 0, -1):
        try:
            sock.bind((VMADDR_CID_ANY, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            if exc.errno in (errno.EACCES, errno.EPERM):
                return None
            raise
        return port
    return None


_warned_unprivileged = False


async def _attempt(address: VsockAddress) -> Streams:
    """One connect attempt from a privileged source port when this process may bind one;
    raises OSError as the kernel reports it."""
    global _warned_unprivileged
    sock = new_socket()
    try:
        if bind_privileged(sock) is None and not _warned_unprivileged:
            _warned_unprivileged = True
            log.warning("%s: connecting from an ordinary vsock port (no privileged port free, "
                        "or not running as root, uid %d): a guest that requires a privileged "
                        "port (tunnel.require_privileged_port) will refuse", address,
                        os.geteuid())
        await connect_nonblocking(sock, address.sockaddr)
    except BaseException:
        sock.close()
        raise
    return await open_streams(sock)


async def connect_vsock(address: VsockAddress, timeout: float) -> Streams:
    """Connect to ``(cid, port)``; TransportError on failure or after ``timeout`` seconds.

    Only the host's mux connects over vsock: it does so from a privileged source port
    (``bind_privileged``), which a guest may require (docs/deploy.md, "Who may connect to a
    guest").

    The kernel gives up on an unanswered connect after 2 s and Python cannot change that
    (the option is a timeval), so an ETIMEDOUT is retried until ``timeout`` runs out.
    """
    check_timeout(address, timeout)
    if address.cid == VMADDR_CID_ANY:
        raise TransportError(f"{address}: 'any' is for listening; connect needs a CID")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await asyncio.wait_for(_attempt(address), max(deadline - loop.time(), 0))
        except TimeoutError as exc:
            if exc.errno != errno.ETIMEDOUT:  # asyncio's own timeout has no errno
                raise timeout_error(address, "connect", timeout,
                                    _connect_hint(address, errno.ETIMEDOUT)) from None
            if loop.time() >= deadline:
                raise timeout_error(address, "connect", timeout,
                                    _connect_hint(address, errno.ETIMEDOUT)) from None
            await asyncio.sleep(min(0.1, max(deadline - loop.time(), 0)))
        except OSError as exc:
            raise transport_error(address, "connect", exc,
                                  _connect_hint(address, exc.errno)) from None


async def listen_vsock(address: VsockAddress, client_connected_cb: ClientConnected
                       ) -> asyncio.AbstractServer:
    """Listen on ``(cid, port)``; a guest listens on ``vsock:any:PORT``."""
    try:
        sock = new_socket()
    except OSError as exc:
        raise transport_error(address, "listen", exc, _listen_hint(address, exc.errno)) from None
    try:
        sock.bind(address.sockaddr)
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise transport_error(address, "listen", exc, _listen_hint(address, exc.errno)) from None
    try:
        return await serve(sock, client_connected_cb)
    except OSError as exc:
        raise transport_error(address, "listen", exc) from None


__all__ = ["AF_VSOCK", "LAST_RESERVED_PORT", "VMADDR_CID_ANY", "VMADDR_CID_HOST",
           "GuestTransport", "bind_privileged", "connect_vsock", "guest_transport",
           "listen_vsock", "local_cid", "new_socket"]
