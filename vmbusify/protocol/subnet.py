"""The virtual subnet's messages (ip-bearer: docs/subnet.md), sans-I/O.

Theory of operation
-------------------
Each VM's IP traffic rides one credit-windowed *stream* between the guest's and the host's
``Entity.IP_BEARER``. The guest opens it with an ATTACH request (the stream id is in the
package header); the host's reply is the VM's ``Lease``. From then on both ends write
*batches* to the stream: every IP packet that queued up since the last write, each framed as::

    offset size field
    0      4    length      big-endian: bytes that follow (virtio-net header + IP packet)
    4      10   vnet header struct virtio_net_hdr as the TUN device reads and writes it
                            (little-endian: flags, gso_type, hdr_len, gso_size,
                            csum_start, csum_offset); all zero for a plain packet
    14     ...  IP packet   IPv4 or IPv6, no link-layer header

The virtio-net header is what lets a 64 KiB TCP segment cross as one frame and be cut into
MTU-sized packets only when it leaves the host (GSO), which is where the speed comes from
(docs/subnet.md). A stream is a byte stream, so frames may straddle DATA packages:
``FrameDecoder`` reassembles them and refuses a frame longer than ``MAX_FRAME``.

This module imports no socket, asyncio or zmq.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from vmbusify.errors import LocalProtocolError, RemoteProtocolError
from vmbusify.protocol.entities import Entity
from vmbusify.protocol.message import Message, body_map, limit, optional

#: struct virtio_net_hdr (no num_buffers): what IFF_VNET_HDR puts before each packet.
VNET_HDR_SIZE = 10
#: Largest IP packet (the IPv4/IPv6 total-length field is 16 bits; no jumbograms).
MAX_PACKET = 0xFFFF
MAX_FRAME = VNET_HDR_SIZE + MAX_PACKET
_LENGTH = struct.Struct(">I")
#: A virtio-net header for a packet with no offload (GSO_NONE, no checksum to complete).
PLAIN_VNET_HDR = bytes(VNET_HDR_SIZE)


class SubnetMessage(IntEnum):
    """Message ids of Entity.IP_BEARER."""

    #: REQUEST guest -> host, announcing the bearer stream (its id in the header); reply: Lease.
    ATTACH = 1
    #: Stream DATA of the bearer stream (both directions): batches of frames.
    DATA = 2
    #: REQUEST guest -> host every few seconds: {"stream": id}; an error reply means "attach again".
    KEEPALIVE = 3
    #: MESSAGE host -> guest: the host's subnet worker (re)started; attach again now.
    HOST_READY = 4


class IPVersion(IntEnum):
    """The version nibble of an IP packet."""

    V4 = 4
    V6 = 6


@dataclass(frozen=True, slots=True)
class Attach(Message, entity=Entity.IP_BEARER, message_id=SubnetMessage.ATTACH, name="ATTACH"):
    """ATTACH: what a guest says when it attaches (the package's stream: the bearer)."""

    #: The guest's name (for logs; the host knows the VM by the tunnel's vmid).
    name: str = field(default="", metadata=limit(255))
    #: Whether the guest's TUN hands out GSO packets (informational).
    offload: bool = True


@dataclass(frozen=True, slots=True)
class Lease(Message, entity=Entity.IP_BEARER, message_id=SubnetMessage.ATTACH, name="lease"):
    """A VM's place on the subnet: the host's reply to ATTACH (the same one every time); also
    what `vmbusifyctl status` shows."""

    vmid: str
    address: str
    prefixlen: int
    gateway: str
    mtu: int
    #: Metric of the guest's default routes (high: any SDN default route wins).
    metric: int
    dns: list[str] = field(default_factory=list)
    #: IPv6 (empty when the host has no IPv6).
    address6: str = ""
    prefixlen6: int = 0
    gateway6: str = ""

    @classmethod
    def from_body(cls, body: Any) -> Lease:
        """Parse and validate a lease from the host; RemoteProtocolError if malformed."""
        body = body_map(body, cls.NAME)
        dns = optional(body, "dns", list, cls.NAME, [])
        try:
            lease = cls(
                vmid=_str(body, "vmid"), address=_str(body, "address"),
                prefixlen=_int(body, "prefixlen", 1, 30), gateway=_str(body, "gateway"),
                mtu=_int(body, "mtu", 1280, MAX_PACKET), metric=_int(body, "metric", 0, 2**32 - 1),
                dns=[str(ipaddress.ip_address(a)) for a in dns],
                address6=_str(body, "address6", ""), prefixlen6=_int(body, "prefixlen6", 0, 126),
                gateway6=_str(body, "gateway6", ""),
            )
            v4 = ipaddress.IPv4Interface(f"{lease.address}/{lease.prefixlen}")
            if ipaddress.IPv4Address(lease.gateway) not in v4.network:
                raise ValueError("gateway outside the subnet")
            if lease.address6:
                v6 = ipaddress.IPv6Interface(f"{lease.address6}/{lease.prefixlen6}")
                if ipaddress.IPv6Address(lease.gateway6) not in v6.network:
                    raise ValueError("IPv6 gateway outside the prefix")
        except (ValueError, TypeError) as exc:
            raise RemoteProtocolError(f"lease: {exc}") from None
        return lease


@dataclass(frozen=True, slots=True)
class Keepalive(Message, entity=Entity.IP_BEARER, message_id=SubnetMessage.KEEPALIVE,
                name="KEEPALIVE"):
    """KEEPALIVE: the guest's bearer ``stream`` is still in use (an error reply: attach again)."""

    stream: int


@dataclass(frozen=True, slots=True)
class KeepaliveReply(Message, entity=Entity.IP_BEARER, message_id=SubnetMessage.KEEPALIVE,
                     name="KEEPALIVE reply"):
    """The host's answer to a KEEPALIVE for a bearer it still has."""

    ok: bool = True


@dataclass(frozen=True, slots=True)
class HostReady(Message, entity=Entity.IP_BEARER, message_id=SubnetMessage.HOST_READY,
                name="HOST_READY"):
    """HOST_READY: the host's subnet worker (re)started; attach again now. An empty map."""


def _str(body: dict[str, Any], key: str, default: str | None = None) -> str:
    value = body.get(key, default)
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string")
    return value


def _int(body: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = body.get(key, 0 if lo == 0 else None)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{key} must be an integer in {lo}..{hi}")
    return value


# --- frames -----------------------------------------------------------------------------------


def encode_frames(frames: Iterable[bytes | bytearray | memoryview]) -> bytes:
    """One batch: every frame (virtio-net header + IP packet) behind its 4-byte length."""
    parts: list[bytes | bytearray | memoryview] = []
    for frame in frames:
        n = len(frame)
        if not VNET_HDR_SIZE < n <= MAX_FRAME:
            raise LocalProtocolError(
                f"frame of {n} bytes (must be {VNET_HDR_SIZE + 1}..{MAX_FRAME})")
        parts.append(_LENGTH.pack(n))
        parts.append(frame)
    return b"".join(parts)


def frame_header(n: int) -> bytes:
    """The 4-byte length that precedes a frame of ``n`` bytes (for callers that batch)."""
    return _LENGTH.pack(n)


def frame_header_into(buffer: memoryview, offset: int, n: int) -> None:
    """``frame_header(n)`` written into ``buffer`` at ``offset`` (a batch built in place)."""
    _LENGTH.pack_into(buffer, offset, n)


class FrameDecoder:
    """Reassembles frames from stream chunks (sans-I/O). Holds at most one partial frame.

    ``feed(chunk)`` returns every whole frame; when the chunk holds only whole frames (the
    usual case: one batch per DATA package) they are views into it, with no copy.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[memoryview]:
        """Frames completed by ``chunk``; RemoteProtocolError for a bad length."""
        if self._buf:
            self._buf += chunk
            data = memoryview(bytes(self._buf))
            self._buf.clear()
        else:
            data = memoryview(chunk)
        out: list[memoryview] = []
        pos, end = 0, len(data)
        while end - pos >= 4:
            (n,) = _LENGTH.unpack_from(data, pos)
            if not VNET_HDR_SIZE < n <= MAX_FRAME:
                raise RemoteProtocolError(f"ip-bearer frame of {n} bytes")
            if end - pos - 4 < n:
                break
            out.append(data[pos + 4:pos + 4 + n])
            pos += 4 + n
        if pos < end:
            self._buf += data[pos:]
        return out


def iter_frames(batch: bytes) -> Iterator[memoryview]:
    """The frames of one whole batch; RemoteProtocolError if it ends mid-frame."""
    decoder = FrameDecoder()
    yield from decoder.feed(batch)
    if decoder.buffered:
        raise RemoteProtocolError("ip-bearer batch ends inside a frame")


# --- packet headers ---------------------------------------------------------------------------


def packet_version(frame: bytes | memoryview) -> int:
    """The IP version of a frame's packet (0 if too short to tell)."""
    return frame[VNET_HDR_SIZE] >> 4 if len(frame) > VNET_HDR_SIZE else 0


def packet_addresses(frame: bytes | memoryview) -> tuple[bytes, bytes] | None:
    """(source, destination) of a frame's packet as packed bytes; None if not IPv4/IPv6."""
    o = VNET_HDR_SIZE
    version = packet_version(frame)
    if version == IPVersion.V4 and len(frame) >= o + 20:
        return bytes(frame[o + 12:o + 16]), bytes(frame[o + 16:o + 20])
    if version == IPVersion.V6 and len(frame) >= o + 40:
        return bytes(frame[o + 8:o + 24]), bytes(frame[o + 24:o + 40])
    return None


def packet_destination(frame: bytes | memoryview) -> bytes | None:
    """The destination address of a frame's packet, packed; None if not IPv4/IPv6."""
    o = VNET_HDR_SIZE
    version = packet_version(frame)
    if version == IPVersion.V4 and len(frame) >= o + 20:
        return bytes(frame[o + 16:o + 20])
    if version == IPVersion.V6 and len(frame) >= o + 40:
        return bytes(frame[o + 24:o + 40])
    return None
