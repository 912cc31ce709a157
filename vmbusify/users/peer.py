"""Which local user is at the other end of a socket: Unix (SO_PEERCRED) or loopback TCP.

One small question answered in one place, for the host proxy and ``vmbusifyctl forward``
(who connected to me?) and for the command listener's clients (who listens there?). A TCP
socket's owner is the uid of the process that created it (``sk_uid``), which the kernel
shows per connection: asked once per connection through sock_diag (one netlink round trip,
an exact lookup of that socket, no table scan), or, where sock_diag is not available,
found in /proc/net/tcp{,6} (one scan). The answer is about the socket at the other end of
*this* connection, identified by its four addresses, so nobody else's socket can stand in.

Light on purpose (os, socket and struct only): ``vmbusifyexec`` imports it.
"""

from __future__ import annotations

import os
import socket
import struct


class PeerSocket:
    """What the kernel tells of the socket at the other end (a plain class: see above)."""

    __slots__ = ("inode", "state", "uid")

    def __init__(self, uid: int, state: int, inode: int) -> None:
        self.uid = uid
        self.state = state
        self.inode = inode

    def __repr__(self) -> str:
        return f"PeerSocket(uid={self.uid}, state={self.state}, inode={self.inode})"


#: TCP states as the kernel numbers them (include/net/tcp_states.h).
TCP_ESTABLISHED = 1
TCP_LISTEN = 10

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NOCOOKIE = 0xFFFFFFFF
_NLMSGHDR = struct.Struct("=IHHII")
#: inet_diag_req_v2: family, protocol, ext, pad, states, then the inet_diag_sockid.
_REQ = struct.Struct("=BBBxI")
#: inet_diag_msg up to the uid and inode: family, state, timer, retrans, sockid (48 bytes),
#: expires, rqueue, wqueue, uid, inode.
_MSG = struct.Struct("=BBBB48sIIIII")


def unix_peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)[1]


def _packed(family: int, host: str) -> bytes:
    return socket.inet_pton(family, host.split("%", 1)[0])


def _forms(family: int, src: str, dst: str) -> list[tuple[int, str, str]]:
    """The (family, src, dst) the socket at the other end may have: an IPv4 peer of an IPv6
    socket appears IPv4-mapped (``::ffff:127.0.0.1``) on one side and plain on the other."""
    forms = [(family, src, dst)]
    if family == socket.AF_INET6 and src.lower().startswith("::ffff:") and "." in src:
        forms.append((socket.AF_INET, src[7:], dst[7:] if "." in dst else dst))
    elif family == socket.AF_INET:
        forms.append((socket.AF_INET6, f"::ffff:{src}", f"::ffff:{dst}"))
    return forms


def _sockid(family: int, src: str, sport: int, dst: str, dport: int) -> bytes:
    """An inet_diag_sockid naming the socket whose local end is src:sport."""
    s, d = _packed(family, src).ljust(16, b"\0"), _packed(family, dst).ljust(16, b"\0")
    return struct.pack("!HH", sport, dport) + s + d + struct.pack("=III", 0, _NOCOOKIE,
                                                                  _NOCOOKIE)


def _diag(family: int, src: str, sport: int, dst: str, dport: int) -> PeerSocket | None:
    """The socket with local end src:sport and remote end dst:dport, asked of sock_diag;
    None if there is none; OSError if sock_diag cannot be asked."""
    sockid = _sockid(family, src, sport, dst, dport)
    body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid
    msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST,
                         1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2)
        nl.sendto(msg, (0, 0))
        data = nl.recv(65536)
    if len(data) < _NLMSGHDR.size:
        raise OSError("short sock_diag answer")
    _length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data)
    if kind == _NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", data, _NLMSGHDR.size)
        if -err in (2, 22):  # ENOENT: no such socket; EINVAL: none of that family
            return None
        raise OSError(-err, os.strerror(-err))
    if kind != _SOCK_DIAG_BY_FAMILY or len(data) < _NLMSGHDR.size + _MSG.size:
        raise OSError(f"unexpected sock_diag answer type {kind}")
    _fam, state, _t, _r, got, _e, _rq, _wq, uid, inode = _MSG.unpack_from(data, _NLMSGHDR.size)
    # The kernel falls back to a listener when no connection matches: only the exact
    # socket counts (a listener's remote port is 0, so it never matches).
    if got[:36] != sockid[:36]:
        return None
    return PeerSocket(uid, state, inode)


def _proc_hex(family: int, host: str, port: int) -> str:
    """An address as /proc/net/tcp{,6} prints it: 32-bit words in host order, then the port."""
    raw = _packed(family, host)
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def _proc(family: int, src: str, sport: int, dst: str, dport: int) -> PeerSocket | None:
    """The same question answered from /proc/net/tcp{,6} (one scan of the table)."""
    local, remote = _proc_hex(family, src, sport), _proc_hex(family, dst, dport)
    name = "/proc/net/tcp6" if family == socket.AF_INET6 else "/proc/net/tcp"
    with open(name, encoding="ascii") as fh:
        next(fh, None)
        for line in fh:
            f = line.split()
            if len(f) > 9 and f[1] == local and f[2] == remote:
                return PeerSocket(int(f[7]), int(f[3], 16), int(f[9]))
    return None


def tcp_socket_of(family: int, src: str, sport: int, dst: str, dport: int
                  ) -> PeerSocket | None:
    """The TCP socket in this network namespace whose local end is src:sport and remote end
    dst:dport (its owner, state and inode), or None if there is none."""
    for fam, a, b in _forms(family, src, dst):
        try:
            found = _diag(fam, a, sport, b, dport)
        except OSError:  # no sock_diag here (a container without the module): scan /proc
            try:
                found = _proc(fam, a, sport, b, dport)
            except OSError:
                found = None
        if found is not None:
            return found
    return None


def tcp_peer(sock: socket.socket) -> PeerSocket | None:
    """The socket at the other end of the connected TCP socket ``sock``, if it is local."""
    mine, theirs = sock.getsockname(), sock.getpeername()
    return tcp_socket_of(sock.family, theirs[0], theirs[1], mine[0], mine[1])


def tcp_peer_uid(sock: socket.socket) -> int | None:
    """Which local uid owns the other end of this loopback TCP connection; None when it is
    not a local socket some process holds (remote, gone, closed already: a closed socket's
    remains show uid 0 and inode 0, which must not read as root)."""
    try:
        peer = tcp_peer(sock)
    except OSError:
        return None
    if peer is None or peer.inode == 0:
        return None
    return int(peer.uid)
