"""vir-ethio (docs/subnet.md): a TUN device that reads and writes frames with a virtio-net header.

The device is opened with ``IFF_TUN | IFF_NO_PI | IFF_VNET_HDR``: every read gives, and every
write takes, a 10-byte ``virtio_net_hdr`` followed by one IP packet (see
vmbusify.protocol.subnet). With ``offload`` the kernel is told this end can take
checksum-partial and TSO packets (``TUNSETOFFLOAD``), so a TCP sender behind the device hands
over 64 KiB segments instead of MTU-sized packets. The device is not persistent: it
disappears, with its addresses and routes, when the worker's descriptor closes, even after
kill -9.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct

from vmbusify.errors import SubnetError
from vmbusify.protocol.subnet import MAX_FRAME, VNET_HDR_SIZE

log = logging.getLogger(__name__)

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
#: Interface names are at most 15 bytes (IFNAMSIZ 16 with the NUL).
MAX_IFNAME = 15
#: A read buffer big enough for any frame (a GSO packet is at most 64 KiB).
READ_SIZE = MAX_FRAME + 64


def check_ifname(name: str) -> str:
    """``name`` if it is a valid interface name; SubnetError otherwise."""
    if not name or len(name.encode()) > MAX_IFNAME or any(c in name for c in "/ \t\n:") \
            or name in (".", ".."):
        raise SubnetError(f"invalid interface name {name!r} (1..{MAX_IFNAME} characters, "
                          "no '/', ':' or spaces)")
    return name


class TunDevice:
    """An open TUN device: non-blocking reads and writes of whole frames."""

    def __init__(self, fd: int, name: str, offload: bool) -> None:
        self.fd = fd
        self.name = name
        self.offload = offload
        self.read_errors = 0
        self.write_errors = 0

    @classmethod
    def open(cls, name: str, offload: bool = True) -> TunDevice:
        """Create (or attach to) TUN interface ``name``; SubnetError if that cannot be done."""
        check_ifname(name)
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise SubnetError(f"cannot open {TUN_PATH}: {exc.strerror} (needs root and the "
                              "tun module)") from None
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
            if offload:
                fcntl.ioctl(fd, TUNSETOFFLOAD,
                            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
        except OSError as exc:
            os.close(fd)
            why = ("it exists and is not a free TUN device (another worker holds it?)"
                   if exc.errno in (errno.EBUSY, errno.EINVAL, errno.EPERM) else exc.strerror)
            raise SubnetError(f"cannot create TUN interface {name}: {why}") from None
        log.info("tun=%s opened (offload %s)", name, "on" if offload else "off")
        return cls(fd, name, offload)

    def read_frames(self, max_frames: int, max_bytes: int) -> list[bytes]:
        """Frames the kernel has queued now (up to the limits); never blocks."""
        out: list[bytes] = []
        total = 0
        read = os.read
        fd = self.fd
        while len(out) < max_frames and total < max_bytes:
            try:
                frame = read(fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                self.read_errors += 1
                log.debug("tun=%s read failed: %s", self.name, exc)
                break
            if len(frame) > VNET_HDR_SIZE:
                out.append(frame)
                total += len(frame)
        return out

    def write_frame(self, frame: bytes | memoryview) -> bool:
        """Hand one frame to the kernel; False (and counted) if it refused it."""
        try:
            os.write(self.fd, frame)
            return True
        except OSError as exc:
            self.write_errors += 1
            if self.write_errors in (1, 10, 100) or self.write_errors % 10000 == 0:
                log.warning("tun=%s: kernel refused a packet (%s); %d so far", self.name,
                            exc.strerror, self.write_errors)
            return False

    def close(self) -> None:
        """Close the descriptor: the interface, its addresses and routes go away."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            log.info("tun=%s closed", self.name)
