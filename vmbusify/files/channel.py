"""One attached exec, driven by a program rather than a terminal: the transport of a copy.

It speaks the command listener's exec API (docs/exec.md: a WebSocket whose binary messages
start with a channel byte) on a connection checked before the token goes out, through the
exec wire vmbusifyexec and vmbusify.client speak too (control/exec_wire.py). The copy's data
rides the exec's stdin and stdout streams, so it has their credit windows (memory stays
bounded at both ends) and the tunnel's fairness (a copy does not make other execs and proxy
streams wait).

Client frames are masked with the key 0 (RFC 6455 wants a random key, against proxies that
cache; the listener is a local Unix socket with no proxy between): the masking is then a copy
the client can skip, which matters at 1 GiB.
"""

from __future__ import annotations

import array
import json
import select
import socket
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vmbusify.control.client import ControlClient
from vmbusify.control.exec_wire import Failure, open_exec, parse_status
from vmbusify.errors import (
    ControlError,
    NotConnectedError,
    TunnelError,
    UnknownVMError,
    VMBusifyError,
    error_from,
)
from vmbusify.protocol.exec_api import EXIT_NOT_FOUND, Channel, ExitReason
from vmbusify.protocol.websocket import FrameDecoder, Opcode, close_payload, encode_frame
from vmbusify.protocol.window import MAX_CHUNK

if TYPE_CHECKING:
    from vmbusify.config import Config

#: The largest message the listener takes (its max_msg_size is MAX_CHUNK + 1024).
MAX_MESSAGE = MAX_CHUNK + 512
READ_SIZE = 1 << 20
_ZERO_KEY = b"\0\0\0\0"


def _fd_done(data: bytes) -> dict[str, object]:
    """An FD_DONE message's JSON, checked: ``{"bytes": int, "end": bool, "error": str}``."""
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or type(doc.get("bytes")) is not int:
        return {"bytes": 0, "end": True, "error": "a malformed FD_DONE from the listener"}
    code = doc.get("errno")
    return {"bytes": doc["bytes"], "end": bool(doc.get("end")),
            "error": str(doc.get("error") or "")[:500],
            "errno": code if type(code) is int else 0}


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

    ``received`` events are ``(Channel.STDOUT, bytes)``, ``(Channel.STDERR, bytes)``,
    during a file handed over by descriptor (``hand_over``) ``(Channel.FD_READY, b"")`` and
    ``(Channel.FD_DONE, dict)``, and, last, ``(Channel.STATUS, Status)``.
    """

    def __init__(self, where: Config | ControlClient, vm: str, argv: Sequence[str], *,
                 user: str = "", stdin: bool = True, timeout: float = 30.0) -> None:
        #: ``where``: the endpoint's configuration, or a client of its listener already made
        #: (vmbusifyctl's, which reads only the listener's keys: its start is shorter).
        self.client = where if isinstance(where, ControlClient) else ControlClient(
            where, timeout=timeout)
        self.vm = vm
        self.request = {"argv": list(argv), "stdin": stdin, **({"user": user} if user else {})}
        self.sock: socket.socket | None = None
        self.decoder = FrameDecoder()
        self.status: Status | None = None
        #: Events received after FD_READY, handed out by the next receive().
        self.pending_events: list[tuple[Channel, object]] = []

    def open(self) -> None:
        """Connect, upgrade and send the request (no wait in between)."""
        body = json.dumps(self.request).encode()
        if len(body) > MAX_MESSAGE:
            raise ControlError(f"the copy's request is too large ({len(body)} bytes)")
        try:
            self.sock = open_exec(self.client.listener(), self.vm, body, self.decoder,
                                  self.client.timeout)
        except Failure as exc:  # a refusal: its class by the listener's ErrorCode
            raise error_from(exc.code, str(exc)) from None
        except OSError as exc:
            raise ControlError(f"lost the command listener: {exc.strerror or exc}") from None

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

    def hand_over(self, op: str, fd: int, offset: int, count: int
                  ) -> tuple[bool, list[tuple[Channel, object]]]:
        """Give the listener the open file ``fd`` (Channel.FD_OPEN, docs/exec.md): "read":
        its ``count`` bytes from ``offset`` become the program's stdin; "write": the next
        ``count`` bytes of its stdout go into it at ``offset``. Returns whether the listener
        took it, and the events received meanwhile (the caller's to handle; a refusal is
        an FD_DONE among them). FD_DONE events follow, the last with ``"end": true``."""
        assert self.sock is not None
        payload = bytes([Channel.FD_OPEN]) + json.dumps(
            {"op": op, "offset": offset, "count": count}).encode()
        try:
            self.sock.sendall(_head(len(payload)) + payload)
        except OSError as exc:
            raise TunnelError(f"lost the command listener: {exc.strerror or exc}") from None
        events: list[tuple[Channel, object]] = []
        while True:
            for i, (channel, data) in enumerate(got := self.receive()):
                if channel is Channel.FD_READY:
                    events += got[:i]
                    self.pending_events = got[i + 1:]
                    try:
                        self.sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                     array.array("i", [fd]))])
                    except OSError as exc:
                        raise TunnelError(f"lost the command listener: "
                                          f"{exc.strerror or exc}") from None
                    return True, events
                if channel is Channel.STATUS or (channel is Channel.FD_DONE
                                                  and isinstance(data, dict)
                                                  and data.get("end")):
                    return False, events + got
            events += got

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
        if self.decoder.buffered or self.pending_events:
            return True
        return bool(select.select([self.sock], [], [], 0)[0])

    def receive(self) -> list[tuple[Channel, object]]:
        """The next messages (blocks for at least one read); STATUS is the last."""
        assert self.sock is not None
        out: list[tuple[Channel, object]] = self.pending_events
        self.pending_events = []
        while not out:
            while (frame := self.decoder.next_frame()) is not None:
                if frame.opcode is Opcode.BINARY and frame.payload:
                    channel, data = frame.payload[0], frame.payload[1:]
                    if channel in (Channel.STDOUT, Channel.STDERR):
                        out.append((Channel(channel), data))
                    elif channel == Channel.STATUS:
                        self.status = Status(*parse_status(data))
                        out.append((Channel.STATUS, self.status))
                        return out
                    elif channel == Channel.FD_READY:
                        out.append((Channel.FD_READY, b""))
                        return out  # nothing may be read past it before the fd is sent
                    elif channel == Channel.FD_DONE:
                        out.append((Channel.FD_DONE, _fd_done(data)))
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
