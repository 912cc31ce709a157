"""One attached exec, driven by a program rather than a terminal: the transport of a copy.

It speaks the command listener's exec API (docs/exec.md: a WebSocket whose binary messages
start with a channel byte) on a connection checked before the token goes out
(ControlClient.connection). The copy's data rides the exec's stdin and stdout streams, so it
has their credit windows (memory stays bounded at both ends) and the tunnel's fairness (a
copy does not make other execs and proxy streams wait).

Client frames are masked with the key 0 (RFC 6455 wants a random key, against proxies that
cache; the listener is a local Unix socket with no proxy between): the masking is then a copy
the client can skip, which matters at 1 GiB.
"""

from __future__ import annotations

import json
import select
import socket
import struct
from collections.abc import Sequence

from vmbusify.config import Config
from vmbusify.control.client import ControlClient, q
from vmbusify.errors import (
    ControlError,
    NotConnectedError,
    TunnelError,
    UnknownVMError,
    VMBusifyError,
    error_from,
)
from vmbusify.protocol.exec_api import EXIT_NOT_FOUND, Channel, ExitReason
from vmbusify.protocol.websocket import (
    FrameDecoder,
    Opcode,
    close_payload,
    encode_frame,
    expected_accept,
    handshake_key,
)
from vmbusify.protocol.window import MAX_CHUNK

#: The largest message the listener takes (its max_msg_size is MAX_CHUNK + 1024).
MAX_MESSAGE = MAX_CHUNK + 512
READ_SIZE = 1 << 20
_ZERO_KEY = b"\0\0\0\0"


class Status:
    """The exec's end, as the listener's STATUS message says it."""

    def __init__(self, exit_code: int, reason: str, message: str) -> None:
        self.exit_code, self.reason, self.message = exit_code, reason, message


def _head(n: int) -> bytes:
    """A final binary frame's header, masked with the zero key."""
    if n < 126:
        return bytes([0x82, 0x80 | n]) + _ZERO_KEY
    if n < 1 << 16:
        return bytes([0x82, 0x80 | 126]) + struct.pack(">H", n) + _ZERO_KEY
    return bytes([0x82, 0x80 | 127]) + struct.pack(">Q", n) + _ZERO_KEY


class ExecChannel:
    """``open()``, then ``send()`` stdin and ``receive()`` what comes back until the STATUS.

    ``received`` events are ``(Channel.STDOUT, bytes)``, ``(Channel.STDERR, bytes)`` and,
    last, ``(Channel.STATUS, Status)``.
    """

    def __init__(self, config: Config, vm: str, argv: Sequence[str], *, user: str = "",
                 stdin: bool = True, timeout: float = 30.0) -> None:
        self.client = ControlClient(config, timeout=timeout)
        self.vm = vm
        self.request = {"argv": list(argv), "stdin": stdin, **({"user": user} if user else {})}
        self.sock: socket.socket | None = None
        self.decoder = FrameDecoder()
        self.status: Status | None = None

    def open(self) -> None:
        """Connect, upgrade and send the request (no wait in between)."""
        conn = self.client.connection()
        sock = conn.sock
        assert isinstance(sock, socket.socket)
        self.sock = sock
        key = handshake_key()
        token = self.client.headers()["Authorization"]
        hello = (f"GET /v1/vms/{q(self.vm)}/exec HTTP/1.1\r\nHost: localhost\r\n"
                 f"Authorization: {token}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
        body = json.dumps(self.request).encode()
        if len(body) > MAX_MESSAGE:
            raise ControlError(f"the copy's request is too large ({len(body)} bytes)")
        try:
            sock.sendall(hello + encode_frame(Opcode.TEXT, body))
            status, headers, rest = self._read_head()
        except OSError as exc:
            raise ControlError(f"lost the command listener: {exc.strerror or exc}") from None
        if status != 101:
            raise self._http_error(status, headers, rest)
        if headers.get("sec-websocket-accept") != expected_accept(key):
            raise ControlError("the command listener answered the upgrade wrongly")
        sock.settimeout(None)
        self.decoder.receive_data(rest)

    def _read_head(self) -> tuple[int, dict[str, str], bytes]:
        assert self.sock is not None
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ControlError("the command listener closed the connection")
            buf += chunk
            if len(buf) > 65536:
                raise ControlError("the command listener sent an oversized answer")
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise ControlError("the command listener sent a bad status line") from None
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers, rest

    def _http_error(self, status: int, headers: dict[str, str], rest: bytes) -> VMBusifyError:
        assert self.sock is not None
        length = min(int(headers.get("content-length", "0") or 0), 65536)
        try:
            while len(rest) < length:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                rest += chunk
        except OSError:
            pass
        try:
            doc = json.loads(rest[:length])
        except ValueError:
            doc = None
        reason = doc.get("error") if isinstance(doc, dict) else None
        code = doc.get("code") if isinstance(doc, dict) else None
        text = str(reason or f"HTTP {status}")
        return error_from(code, text) if isinstance(code, int) else ControlError(text)

    # -- sending ----------------------------------------------------------------------------
    def send(self, pieces: Sequence[bytes | memoryview]) -> None:
        """One stdin message made of ``pieces`` (at most MAX_MESSAGE - 1 bytes in all)."""
        assert self.sock is not None
        n = 1 + sum(len(p) for p in pieces)
        parts = [memoryview(_head(n) + bytes([Channel.STDIN]))]
        parts += [memoryview(p) for p in pieces]
        try:
            while parts:
                sent = self.sock.sendmsg(parts)
                while parts and sent >= len(parts[0]):
                    sent -= len(parts[0])
                    parts.pop(0)
                if parts and sent:
                    parts[0] = parts[0][sent:]
        except OSError as exc:
            raise TunnelError(f"lost the command listener while sending: "
                              f"{exc.strerror or exc}") from None

    def close_stdin(self) -> None:
        """EOF on the remote program's stdin."""
        assert self.sock is not None
        payload = bytes([Channel.CLOSE, Channel.STDIN])
        try:
            self.sock.sendall(_head(len(payload)) + payload)
        except OSError:
            pass  # the receive side reports the end

    # -- receiving --------------------------------------------------------------------------
    def readable(self) -> bool:
        """Whether ``receive()`` would not block."""
        assert self.sock is not None
        if self.decoder.buffered:
            return True
        return bool(select.select([self.sock], [], [], 0)[0])

    def receive(self) -> list[tuple[Channel, object]]:
        """The next messages (blocks for at least one read); STATUS is the last."""
        assert self.sock is not None
        out: list[tuple[Channel, object]] = []
        while not out:
            while (frame := self.decoder.next_frame()) is not None:
                if frame.opcode is Opcode.BINARY and frame.payload:
                    channel, data = frame.payload[0], frame.payload[1:]
                    if channel in (Channel.STDOUT, Channel.STDERR):
                        out.append((Channel(channel), data))
                    elif channel == Channel.STATUS:
                        self.status = _status(data)
                        out.append((Channel.STATUS, self.status))
                        return out
                elif frame.opcode is Opcode.PING:
                    self._pong(frame.payload)
                elif frame.opcode is Opcode.CLOSE:
                    code, why = close_payload(frame.payload)
                    raise TunnelError(f"the command listener closed the copy ({code}"
                                      f"{': ' + why if why else ''})")
            if out:
                return out
            try:
                data = self.sock.recv(READ_SIZE)
            except OSError:
                data = b""
            if not data:
                raise TunnelError("lost the connection to the command listener")
            self.decoder.receive_data(data)
        return out

    def _pong(self, payload: bytes) -> None:
        assert self.sock is not None
        try:
            self.sock.sendall(encode_frame(Opcode.PONG, payload))
        except OSError:
            pass

    def close(self) -> None:
        """Drop the connection (before the STATUS, the remote process tree is killed)."""
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def explain(self, status: Status) -> VMBusifyError:
        """The error for an exec that ended without the helper's answer."""
        if status.exit_code == EXIT_NOT_FOUND and status.reason == ExitReason.NOT_FOUND:
            return ControlError(f"{self.vm}: the guest has no python3 on PATH, which "
                                "vmbusifyctl cp runs there")
        if status.reason == ExitReason.LOST:
            return self._vm_error(status.message or "the exec was lost")
        return TunnelError(status.message or f"the copy's helper in {self.vm} ended with "
                           f"status {status.exit_code} ({status.reason})")

    def _vm_error(self, message: str) -> VMBusifyError:
        """Why an exec was lost: no such VM, not connected, or the message as it is."""
        try:
            vms = self.client.request("GET", "/v1/vms")
        except VMBusifyError:
            return TunnelError(message)
        for vm in vms if isinstance(vms, list) else []:
            if isinstance(vm, dict) and (vm.get("vmid") == self.vm or self.vm in (
                    vm.get("ips") or [])):
                if vm.get("state") != "connected":
                    return NotConnectedError(f"{self.vm}: not connected ({message})")
                return TunnelError(message)
        return UnknownVMError(f"no such VM: {self.vm}")


def _status(payload: bytes) -> Status:
    try:
        doc = json.loads(payload)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("exit_code"), int):
        raise ControlError("the command listener sent a malformed exit status")
    return Status(doc["exit_code"], str(doc.get("reason", "")), str(doc.get("message", ""))[:2000])
