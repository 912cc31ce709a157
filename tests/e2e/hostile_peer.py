"""A hostile guest: speaks the vmbus wire protocol (docs/protocol.md) with ``struct`` and
``msgpack`` only, never vmbusify's own classes, so what it sends is what root in a VM could.

It takes a lab VM's place: the lab's host mux connects to ``unix:<lab>/vmK/tunnel.sock``, so
once the VM's own guest mux is stopped, ``HostilePeer.listen()`` binds that path, accepts the
host's connection, answers its HELLO as a guest (with whatever addresses and hostname it is
told to claim) and its PINGs, and then sends whatever a test wants::

    peer = HostilePeer(path, ips=["198.19.1.10"], hostname="vm1")
    peer.listen()
    peer.wait_connected(30)
    rid = peer.request(PROXY_CLIENT, PROXY_OPEN, {"host": "198.18.0.2", "port": 80}, stream=7)
    ack = peer.wait_ack(rid, 10)
    peer.close()

One reader thread takes everything the host sends: PINGs are answered, ACKs kept by id,
requests and messages kept (bounded) for the test to look at, DATA counted and dropped, and
(unless told not to) credit given back, as an honest reader would. ``stop_reading()`` stops
reading the socket altogether (the host's writes then pile up on its side); a keep-alive
thread then sends PINGs of its own so the host still hears from this end and keeps the tunnel.

Nothing here does more than the wire allows; every wait has a deadline.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import hmac
import itertools
import os
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

# -- the wire format, written from docs/protocol.md --------------------------------------------

SIGNATURE = 0x564D4255
VERSION = 1
HEADER = struct.Struct(">IBBHHIHII")  # sig, version, type, flags, entity, id, msg id, stream, len
HEADER_SIZE = HEADER.size

# package types
MESSAGE, REQUEST, ACK, DATA, WINDOW = 1, 2, 3, 4, 5
# flags
EOF, RESET, ERROR = 1, 2, 4
# entities
TUNNEL, CMD_LISTENER, CMD_EXECUTOR, PROXY_CLIENT, PROXY_SERVER, IP_BEARER = 0, 1, 2, 3, 4, 5
# tunnel messages
HELLO, PING, PONG, BYE, WORKER_LOST, AUTH = 1, 2, 3, 4, 5, 6
#: The shared-key proof (docs/protocol.md, "The proof"): HMAC-SHA256(key, LABEL || role ||
#: NUL || host nonce || guest nonce), 32-byte nonces.
AUTH_LABEL = b"vmbusify tunnel auth v1\0"
# exec messages (vmbusify/protocol/exec.py)
EXEC_START, EXEC_DATA, EXEC_SIGNAL, EXEC_RESIZE, EXEC_EXIT, EXEC_KILL = 1, 2, 3, 4, 5, 6
# proxy messages (vmbusify/protocol/proxy.py)
PROXY_OPEN, PROXY_OPEN_ACK, PROXY_DATA, PROXY_CLOSE = 1, 2, 3, 4
# subnet messages (vmbusify/protocol/subnet.py)
BEARER_ATTACH, BEARER_DATA, BEARER_KEEPALIVE, BEARER_HOST_READY = 1, 2, 3, 4
#: Every application entity and the message ids it defines.
APPLICATION_MESSAGES: dict[int, tuple[int, ...]] = {
    CMD_LISTENER: (EXEC_START, EXEC_DATA, EXEC_SIGNAL, EXEC_RESIZE, EXEC_KILL),
    CMD_EXECUTOR: (EXEC_DATA, EXEC_EXIT),
    PROXY_CLIENT: (PROXY_OPEN, PROXY_DATA),
    PROXY_SERVER: (PROXY_OPEN_ACK, PROXY_DATA),
    IP_BEARER: (BEARER_ATTACH, BEARER_DATA, BEARER_KEEPALIVE, BEARER_HOST_READY),
}
#: The credit each receiver grants a stream at open (docs/protocol.md).
INITIAL_WINDOW = 8 << 20
MAX_WINDOW_INCREMENT = 0xFFFFFFFF
#: Keep at most this many packages of each kind the host sends us (a test looks at a few).
KEEP = 10_000


def pack(ptype: int, entity: int, message_id: int, payload: bytes = b"", *, pid: int = 0,
         stream: int = 0, flags: int = 0) -> bytes:
    """One whole package: header and payload."""
    return HEADER.pack(SIGNATURE, VERSION, ptype, flags, entity, pid, message_id, stream,
                       len(payload)) + payload


def body(obj: Any) -> bytes:
    """An application message body (msgpack, as the project encodes them)."""
    return msgpack.packb(obj, use_bin_type=True)


def window(n: int) -> bytes:
    """A WINDOW package's payload: a 4-byte big-endian increment."""
    return struct.pack(">I", n)


@dataclass(frozen=True)
class Received:
    """One package from the host."""

    type: int
    flags: int
    entity: int
    id: int
    message_id: int
    stream: int
    payload: bytes

    def decoded(self) -> Any:
        """The msgpack body (None if it is not msgpack)."""
        try:
            return msgpack.unpackb(self.payload, raw=False)
        except Exception:  # noqa: BLE001 - anything the host sent that is not msgpack
            return None

    @property
    def error(self) -> str | None:
        """An ERROR ACK's reason text; None when this is not an error."""
        if self.type == ACK and self.flags & ERROR:
            return self.payload.decode("utf-8", "replace")
        return None


class HarnessError(Exception):
    """The harness could not do what a test asked (not a finding about the host)."""


class HostilePeer:
    """A fake guest on a lab VM's tunnel socket (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], *, ips: Iterable[str] = (),
                 hostname: str = "hostile", give_credit: bool = True,
                 key_file: str | os.PathLike[str] | None = None) -> None:
        self.path = os.fspath(path)
        #: The VM's shared key: root in a guest can read its own key file, so a hostile
        #: guest passes the key check; it is what it does after that the tests are about.
        self.key = Path(key_file).read_bytes().strip() if key_file else b""
        self.ips = list(ips)
        self.hostname = hostname
        #: Grant credit back for DATA we read (an honest reader); False: never.
        self.give_credit = give_credit
        self.host_hello: dict[str, Any] | None = None
        self.connected = threading.Event()
        self.closed = threading.Event()
        self.bytes_in = 0
        self.data_in: collections.Counter[int] = collections.Counter()  # stream -> bytes
        self.requests: collections.deque[Received] = collections.deque(maxlen=KEEP)
        self.messages: collections.deque[Received] = collections.deque(maxlen=KEEP)
        self.resets: dict[int, str] = {}
        self.connections = 0
        self._acks: dict[int, Received] = {}
        self._acks_cv = threading.Condition()
        self._ids = itertools.count(1)
        self._nonce = itertools.count(1)
        self._listener: socket.socket | None = None
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._reading = threading.Event()
        self._reading.set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.error: BaseException | None = None
        #: send() raises when the tunnel is gone (default: it returns False, see send()).
        self.strict = False
        self.send_errors: list[str] = []

    # -- life ------------------------------------------------------------------------------
    def listen(self) -> None:
        """Bind the tunnel socket (a stale one is removed) and accept the host in a thread."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(self.path)
        os.chmod(self.path, 0o600)
        lsock.listen(4)
        lsock.settimeout(0.5)
        self._listener = lsock
        self._spawn(self._accept_loop, "hostile-accept")
        self._spawn(self._keepalive_loop, "hostile-keepalive")

    def wait_connected(self, timeout: float) -> None:
        """Until the host connected and the HELLOs crossed; HarnessError after ``timeout``."""
        if not self.connected.wait(timeout):
            raise HarnessError(f"the host did not connect to {self.path} within {timeout:g} s"
                               + (f" ({self.error!r})" if self.error else ""))

    def close(self) -> None:
        """Hang up, stop every thread, remove the socket file."""
        self._stop.set()
        self._reading.set()
        for s in (self._sock, self._listener):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
        for t in self._threads:
            t.join(5.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.closed.set()

    def hang_up(self) -> None:
        """Close the current connection only (the host sees the VM go away)."""
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def _spawn(self, target: Any, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._sock is not None:  # one tunnel at a time, as a guest mux
                with contextlib.suppress(OSError):
                    conn.sendall(pack(MESSAGE, TUNNEL, BYE, body({"reason": "busy"})))
                conn.close()
                continue
            self._sock = conn
            self.connections += 1
            try:
                self._serve(conn)
            except BaseException as exc:  # noqa: BLE001 - kept for the test to see
                if not self._stop.is_set():
                    self.error = exc
            finally:
                self.connected.clear()
                with contextlib.suppress(OSError):
                    conn.close()
                self._sock = None

    # -- reading ---------------------------------------------------------------------------
    def _recv_exact(self, sock: socket.socket, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            self._reading.wait()
            if self._stop.is_set():
                raise ConnectionError("harness stopping")
            chunk = sock.recv(min(n - got, 1 << 20))
            if not chunk:
                raise ConnectionError("the host closed the tunnel")
            parts.append(chunk)
            got += len(chunk)
        self.bytes_in += n
        return b"".join(parts)

    def _read_package(self, sock: socket.socket) -> Received:
        head = self._recv_exact(sock, HEADER_SIZE)
        sig, ver, ptype, flags, entity, pid, mid, stream, length = HEADER.unpack(head)
        if sig != SIGNATURE or ver != VERSION:
            raise HarnessError(f"bad header from the host: {head.hex()}")
        payload = self._recv_exact(sock, length) if length else b""
        return Received(ptype, flags, entity, pid, mid, stream, payload)

    def _serve(self, sock: socket.socket) -> None:
        first = self._read_package(sock)
        if first.type != MESSAGE or first.entity != TUNNEL or first.message_id != HELLO:
            raise HarnessError(f"the host's first package is not a HELLO: {first}")
        self.host_hello = first.decoded()
        hello: dict[str, Any] = {
            "role": "guest", "hostname": self.hostname, "software_version": "0-hostile",
            "protocol_version": VERSION, "ips": self.ips}
        nonce = os.urandom(32)
        if self.key:
            hello.update(nonce=nonce, features=["auth", "key"])
        if not self.send(pack(MESSAGE, TUNNEL, HELLO, body(hello))):
            raise ConnectionError("the host hung up before our HELLO")
        if self.key:
            self._prove(sock, nonce)
        self.connected.set()
        while not self._stop.is_set():
            self._on_package(self._read_package(sock))

    def _prove(self, sock: socket.socket, guest_nonce: bytes) -> None:
        """The key exchange after the HELLOs: the host's AUTH first, then ours."""
        host_nonce = (self.host_hello or {}).get("nonce", b"")
        auth = self._read_package(sock)
        if auth.entity != TUNNEL or auth.message_id != AUTH:
            raise HarnessError(f"the host sent no AUTH after the HELLOs: {auth}")
        proof = hmac.new(self.key, AUTH_LABEL + b"guest\0" + host_nonce + guest_nonce,
                         hashlib.sha256).digest()
        if not self.send(pack(MESSAGE, TUNNEL, AUTH, body({"proof": proof}))):
            raise ConnectionError("the host hung up before our AUTH")

    def _on_package(self, pkg: Received) -> None:
        if pkg.entity == TUNNEL and pkg.type == MESSAGE:
            if pkg.message_id == PING:
                nonce = (pkg.decoded() or {}).get("nonce", 0)
                self.send(pack(MESSAGE, TUNNEL, PONG, body({"nonce": nonce})))
            else:
                self.messages.append(pkg)
            return
        if pkg.type == ACK:
            with self._acks_cv:
                self._acks[pkg.id] = pkg
                if len(self._acks) > KEEP:  # nobody waits for the oldest
                    self._acks.pop(next(iter(self._acks)))
                self._acks_cv.notify_all()
        elif pkg.type == REQUEST:
            self.requests.append(pkg)
        elif pkg.type == MESSAGE:
            self.messages.append(pkg)
        elif pkg.type == DATA:
            if pkg.flags & RESET:
                self.resets[pkg.stream] = pkg.payload.decode("utf-8", "replace")
            if pkg.payload:
                self.data_in[pkg.stream] += len(pkg.payload)
                if self.give_credit:
                    self.send(pack(WINDOW, _peer_of(pkg.entity),
                                   pkg.message_id, window(len(pkg.payload)),
                                   stream=pkg.stream))

    def stop_reading(self) -> None:
        """Stop reading the socket (the host's writes pile up on its side)."""
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def _keepalive_loop(self) -> None:
        """While we do not read, send PINGs so the host still hears from us."""
        while not self._stop.wait(2.0):
            if self.connected.is_set() and not self._reading.is_set():
                self.ping()

    # -- sending ---------------------------------------------------------------------------
    def send(self, data: bytes) -> bool:
        """Write raw bytes (whole packages) to the host; False if the tunnel is gone (the host
        may hang up on a VM that misbehaves: a defence, not a harness failure), recorded in
        ``send_errors``. ``strict``: raise instead."""
        sock = self._sock
        try:
            if sock is None:
                raise ConnectionError("not connected")
            with self._send_lock:
                sock.sendall(data)
        except OSError as exc:
            if self.strict:
                raise
            if len(self.send_errors) < 100:
                self.send_errors.append(repr(exc))
            return False
        return True

    def next_id(self) -> int:
        return next(self._ids) & 0xFFFFFFFF or next(self._ids)

    def ping(self) -> bool:
        return self.send(pack(MESSAGE, TUNNEL, PING, body({"nonce": next(self._nonce)})))

    def message(self, entity: int, message_id: int, obj: Any, *, stream: int = 0) -> None:
        """A one-way application MESSAGE."""
        self.send(pack(MESSAGE, entity, message_id, body(obj), pid=self.next_id(),
                       stream=stream))

    def request(self, entity: int, message_id: int, obj: Any, *, stream: int = 0,
                raw: bytes | None = None) -> int:
        """A REQUEST; returns its id (wait_ack(id) for the answer)."""
        rid = self.next_id()
        self.send(pack(REQUEST, entity, message_id, body(obj) if raw is None else raw,
                       pid=rid, stream=stream))
        return rid

    def wait_ack(self, rid: int, timeout: float) -> Received | None:
        """The ACK of request ``rid``, or None if none came within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._acks_cv:
            while rid not in self._acks:
                left = deadline - time.monotonic()
                if left <= 0 or self.closed.is_set():
                    return None
                self._acks_cv.wait(min(left, 0.5))
            return self._acks.pop(rid)

    def grant(self, entity: int, message_id: int, stream: int, total: int) -> None:
        """Send WINDOW packages granting ``total`` bytes of credit on ``stream``."""
        parts = []
        while total > 0:
            n = min(total, MAX_WINDOW_INCREMENT // 2)
            parts.append(pack(WINDOW, entity, message_id, window(n), stream=stream))
            total -= n
        self.send(b"".join(parts))

    def open_proxy(self, host: str, port: int, stream: int, timeout: float = 15.0
                   ) -> Received | None:
        """A real PROXY-OPEN REQUEST on ``stream``; its ACK (None: none in ``timeout``)."""
        rid = self.request(PROXY_CLIENT, PROXY_OPEN, {"host": host, "port": port, "cmd": 1},
                           stream=stream)
        return self.wait_ack(rid, timeout)


def flood(peer: HostilePeer, batch: bytes, per_batch: int, *, rate: float,
          stop: threading.Event, seconds: float) -> int:
    """Send ``batch`` (``per_batch`` packages) again and again, at ``rate`` packages a second
    (0: as fast as the socket takes them), for at most ``seconds`` or until ``stop`` is set or
    the host hangs up; returns how many packages went."""
    sent = 0
    start = time.monotonic()
    end = start + seconds
    while not stop.is_set() and time.monotonic() < end:
        if not peer.send(batch):
            break
        sent += per_batch
        if rate:
            ahead = start + sent / rate - time.monotonic()
            if ahead > 0:
                stop.wait(ahead)
    return sent


def _peer_of(entity: int) -> int:
    """The entity we answer a stream's DATA as (proxy-server -> proxy-client, ...)."""
    return {PROXY_SERVER: PROXY_CLIENT, PROXY_CLIENT: PROXY_SERVER,
            CMD_LISTENER: CMD_EXECUTOR, CMD_EXECUTOR: CMD_LISTENER}.get(entity, entity)


def open_ack(ack: Received | None) -> tuple[int | None, str]:
    """(reply code, reason) of a PROXY-OPEN's ACK: None for no ACK; an ERROR ACK gives -1."""
    if ack is None:
        return None, "no ACK"
    if ack.error is not None:
        return -1, ack.error
    d = ack.decoded()
    if not isinstance(d, dict):
        return -1, f"undecodable ACK payload {ack.payload[:100]!r}"
    return int(d.get("reply", -1)), str(d.get("reason", ""))
