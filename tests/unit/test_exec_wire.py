"""The one exec wire (vmbusify/control/exec_wire.py), as its two kinds of caller see it: the
exec clients (vmbusifyexec, vmbusify.client: a Failure with the exit status) and a copy's
transport (vmbusify/files/channel.py: the error class of the listener's ErrorCode).

A real Unix listener on a socket of this test's own answers each connection with one canned
answer, as the command listener would refuse an exec."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmbusify.config import Config, ControlConfig
from vmbusify.control.exec_wire import Failure, Listener, open_exec, read_head
from vmbusify.errors import ControlError, ErrorCode, UnknownVMError
from vmbusify.files.channel import ExecChannel
from vmbusify.protocol.websocket import FrameDecoder


class CannedListener:
    """Accepts connections on ``path`` and answers each with ``answer`` (then closes it);
    ``requests`` has the head of each request it got."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.answer = b""
        self.requests: list[bytes] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):  # the client may hang up first
                buf = b""
                while b"\r\n\r\n" not in buf and (data := conn.recv(65536)):
                    buf += data
                self.requests.append(buf.partition(b"\r\n\r\n")[0])
                conn.sendall(self.answer)

    def refuse(self, status: int, doc: object | None) -> None:
        body = b"" if doc is None else json.dumps(doc).encode()
        self.answer = (f"HTTP/1.1 {status} No\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[CannedListener]:
    tmp_path.chmod(0o700)
    (tmp_path / "control.token").write_text("sekrit\n")
    canned = CannedListener(tmp_path / "control.sock")
    yield canned
    canned.close()


def _exec_listener(canned: CannedListener) -> Listener:
    return Listener("unix", str(canned.path), 0, "sekrit", os.geteuid())


def _channel(canned: CannedListener) -> ExecChannel:
    config = Config(state_dir=str(canned.path.parent),
                    control=ControlConfig(listen=f"unix:{canned.path}"))
    return ExecChannel(config, "no-such-vm", ["true"], timeout=5)


UNKNOWN_VM = {"error": "no such VM: no-such-vm", "code": int(ErrorCode.UNKNOWN_VM)}


def test_a_refusal_is_a_failure_with_the_listener_s_reason_and_code(
        listener: CannedListener) -> None:
    listener.refuse(404, UNKNOWN_VM)
    with pytest.raises(Failure) as info:
        open_exec(_exec_listener(listener), "no-such-vm", b"{}", FrameDecoder(), 5)
    assert str(info.value) == "no such VM: no-such-vm"
    assert info.value.exit_status == 255 and info.value.code is ErrorCode.UNKNOWN_VM
    head = listener.requests[-1].decode()
    assert head.startswith("GET /v1/vms/no-such-vm/exec HTTP/1.1\r\n")
    assert "Authorization: Bearer sekrit" in head and "Upgrade: websocket" in head


def test_a_copy_gets_the_error_class_of_the_listener_s_code(listener: CannedListener) -> None:
    listener.refuse(404, UNKNOWN_VM)
    channel = _channel(listener)
    with pytest.raises(UnknownVMError) as info:
        channel.open()
    assert str(info.value) == "no such VM: no-such-vm"
    assert channel.sock is None
    assert "Authorization: Bearer sekrit" in listener.requests[-1].decode()


@pytest.mark.parametrize(("status", "doc", "reason"), [
    (401, {"error": "bad token"}, "bad token"),  # no code: the listener's plain refusal
    (500, None, "HTTP 500"),                      # no body at all
    (400, "not an object", "HTTP 400"),
])
def test_a_refusal_without_a_code_is_a_control_error_for_both(
        listener: CannedListener, status: int, doc: object, reason: str) -> None:
    listener.refuse(status, doc)
    with pytest.raises(Failure) as info:
        open_exec(_exec_listener(listener), "vm1", b"{}", FrameDecoder(), 5)
    assert (str(info.value), info.value.exit_status, info.value.code) == (
        reason, 255, ErrorCode.CONTROL)
    with pytest.raises(ControlError) as error:
        _channel(listener).open()
    assert type(error.value) is ControlError and str(error.value) == reason


def test_a_detached_start_s_status_is_the_exit_status(listener: CannedListener) -> None:
    listener.refuse(400, {"error": "no such program", "exit_code": 127})
    with pytest.raises(Failure) as info:
        open_exec(_exec_listener(listener), "vm1", b"{}", FrameDecoder(), 5)
    assert info.value.exit_status == 127 and str(info.value) == "no such program"


@pytest.mark.parametrize(("answer", "reason"), [
    (b"", "the command listener closed the connection"),
    (b"HTTP/1.1 2xx OK\r\n\r\n", "the command listener sent a bad status line 'HTTP/1.1 2xx OK'"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000, "the command listener sent an oversized answer"),
    (b"HTTP/1.1 101 Switching\r\nSec-WebSocket-Accept: wrong\r\n\r\n",
     "the command listener answered the upgrade wrongly"),
])
def test_a_broken_answer_is_one_clear_line_for_both(listener: CannedListener, answer: bytes,
                                                     reason: str) -> None:
    listener.answer = answer
    with pytest.raises(Failure) as failure:
        open_exec(_exec_listener(listener), "vm1", b"{}", FrameDecoder(), 5)
    assert str(failure.value) == reason and failure.value.exit_status == 255
    with pytest.raises(ControlError) as error:
        _channel(listener).open()
    assert str(error.value) == reason


def test_read_head_keeps_the_bytes_behind_the_head() -> None:
    a, b = socket.socketpair()
    with a, b:
        for piece in (b"HTTP/1.1 101 Switching\r\nUpg", b"rade: websocket\r\n\r\n\x82\x01x"):
            a.sendall(piece)
        status, headers, rest = read_head(b)
    assert (status, headers, rest) == (101, {"upgrade": "websocket"}, b"\x82\x01x")
