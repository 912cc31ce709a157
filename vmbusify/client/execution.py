"""Exec for the Python API: one program run on a VM, its streams, exit status, timeout and
signals (docs/api.md, "Exec"; the wire is docs/exec.md's, spoken by vmbusify.client.wire)."""

from __future__ import annotations

import json
import signal as signals
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Self

from vmbusify.client.wire import request_body
from vmbusify.control.exec_wire import Failure, Listener, open_exec, parse_status
from vmbusify.errors import VMBusifyError
from vmbusify.protocol.exec_api import FORWARDABLE, Channel, ExitReason
from vmbusify.protocol.websocket import FrameDecoder, Opcode, close_payload, encode_frame

#: How much one receive takes from the listener's socket.
READ_SIZE = 1 << 20


class Stream(str, Enum):
    """Which of the program's outputs a chunk came from."""

    STDOUT = "stdout"
    STDERR = "stderr"


@dataclass(frozen=True)
class ExecRequest:
    """What to run and how (the listener checks it: ``ExecSpec.from_body``)."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    user: str = ""
    #: Seconds after which the whole remote process tree is killed (exit 124).
    timeout: float | None = None
    stdin: bool = False
    tty: bool = False
    rows: int = 0
    cols: int = 0
    term: str = ""

    def body(self) -> dict[str, object]:
        """The JSON request, fields at their defaults left out (as ExecSpec.to_body does)."""
        doc = {"argv": self.argv, "env": self.env, "cwd": self.cwd, "user": self.user,
               "timeout": self.timeout, "stdin": self.stdin, "tty": self.tty,
               "rows": self.rows, "cols": self.cols, "term": self.term}
        return {key: value for key, value in doc.items() if value}


def argv_of(command: str | Sequence[str]) -> list[str]:
    """The argv of a command: a string is a shell command line (``/bin/sh -c``)."""
    if isinstance(command, str):
        return ["/bin/sh", "-c", command]
    argv = [str(arg) for arg in command]
    if not argv:
        raise ValueError("an exec needs a program: the argv is empty")
    return argv


def signal_name(sig: str | int) -> str:
    """The name a signal is forwarded by (``"INT"``), from ``"INT"``, ``"SIGINT"``, 2 or
    ``signal.SIGINT``; ValueError for one the listener does not forward."""
    if isinstance(sig, int):
        name = signals.Signals(sig).name.removeprefix("SIG")
    else:
        name = sig.upper().removeprefix("SIG")
    if name not in FORWARDABLE:
        raise ValueError(f"signal {sig!r} cannot be forwarded (one of {', '.join(FORWARDABLE)})")
    return name


@dataclass(frozen=True)
class ExecResult:
    """How an exec ended, with the output it gathered (empty when streamed by the caller)."""

    vmid: str
    exit_code: int
    reason: ExitReason
    #: The listener's or executor's explanation when the program did not exit on its own.
    message: str = ""
    stdout: bytes = b""
    stderr: bytes = b""

    @property
    def ok(self) -> bool:
        """Whether the program exited with status 0."""
        return self.exit_code == 0 and self.reason is ExitReason.EXITED

    def check(self) -> ExecResult:
        """Itself if ok, else ExecFailed (a VMBusifyError) naming the status."""
        if not self.ok:
            raise ExecFailed(self)
        return self


class ExecFailed(VMBusifyError):
    """A program run by ``Client.run(check=True)`` did not exit with 0; ``result`` has its
    status and output."""

    def __init__(self, result: ExecResult) -> None:
        why = result.message or f"{result.reason.value} with status {result.exit_code}"
        super().__init__(f"{result.vmid}: {why}")
        self.result = result


def _reason(text: str, exit_code: int) -> ExitReason:
    try:
        return ExitReason(text)
    except ValueError:  # a reason this release does not know: say what the status says
        return ExitReason.EXITED if exit_code < 128 else ExitReason.LOST


class ExecProcess:
    """A program running on a VM (``Client.start``): write its stdin, read its output,
    signal it, wait for its status. Closing it before the status arrives kills the remote
    process tree (the listener sees the client go).

    Reading is for one thread at a time; ``write``, ``close_stdin``, ``signal`` and
    ``resize`` may be called from any thread (one lock keeps frames whole).
    """

    def __init__(self, listener: Listener, vmid: str, request: ExecRequest,
                 connect_timeout: float = 30.0) -> None:
        self.vmid = vmid
        self.request = request
        self._decoder = FrameDecoder()
        self._sock: socket.socket | None = open_exec(
            listener, vmid, request_body(request.body()), self._decoder, connect_timeout)
        self._send_lock = threading.Lock()
        self.result: ExecResult | None = None

    # -- sending -----------------------------------------------------------------------------
    def _send(self, payload: bytes, opcode: Opcode = Opcode.BINARY) -> None:
        with self._send_lock:
            if self._sock is None:
                raise Failure(f"{self.vmid}: the exec is closed")
            self._sock.sendall(encode_frame(opcode, payload))

    def write(self, data: bytes) -> None:
        """Send bytes to the program's stdin (the exec must be started with ``stdin=True``);
        blocks while the listener holds a full window."""
        view = memoryview(data)
        for at in range(0, len(view), 256 << 10):
            self._send(bytes([Channel.STDIN]) + view[at:at + (256 << 10)])

    def close_stdin(self) -> None:
        """Close the program's stdin (it reads EOF)."""
        self._send(bytes([Channel.CLOSE, Channel.STDIN]))

    def signal(self, sig: str | int) -> None:
        """Send a signal to the program's process group (``"INT"``, ``signal.SIGTERM``...)."""
        self._send(bytes([Channel.SIGNAL]) + json.dumps({"signal": signal_name(sig)}).encode())

    def resize(self, rows: int, cols: int) -> None:
        """Tell the program's terminal its new size (with ``tty=True``)."""
        self._send(bytes([Channel.RESIZE]) + json.dumps({"rows": rows, "cols": cols}).encode())

    # -- receiving ---------------------------------------------------------------------------
    def read(self, timeout: float | None = None) -> tuple[Stream, bytes] | None:
        """The next chunk of output, or None once the program's status has arrived (then in
        ``result``). TimeoutError if nothing came within ``timeout`` seconds; Failure if the
        exec could not start or was lost (unknown or unreachable VM, tunnel or listener
        gone: status 255, reason ``lost``; ``result`` has it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.result is None:
            while (frame := self._decoder.next_frame()) is not None:
                chunk = self._on_frame(frame.opcode, frame.payload)
                if chunk is not None:
                    return chunk
                if self.result is not None:
                    self.close()
                    return None
            self._receive(deadline)
        return None

    def __iter__(self) -> Iterator[tuple[Stream, bytes]]:
        """Every chunk of output until the status."""
        while (chunk := self.read()) is not None:
            yield chunk

    def _receive(self, deadline: float | None) -> None:
        sock = self._sock
        if sock is None:
            raise Failure(f"{self.vmid}: the exec is closed")
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.vmid}: no output or status within the timeout")
            sock.settimeout(left)
        try:
            data = sock.recv(READ_SIZE)
        except TimeoutError:
            raise TimeoutError(f"{self.vmid}: no output or status within the timeout") from None
        except OSError:
            data = b""
        finally:
            if deadline is not None and self._sock is not None:
                self._sock.settimeout(None)
        if not data:
            self.close()
            raise Failure(f"{self.vmid}: lost the connection to the command listener")
        self._decoder.receive_data(data)

    def _on_frame(self, opcode: Opcode, payload: bytes) -> tuple[Stream, bytes] | None:
        if opcode is Opcode.BINARY and payload:
            channel = payload[0]
            if channel == Channel.STDOUT:
                return Stream.STDOUT, payload[1:]
            if channel == Channel.STDERR:
                return Stream.STDERR, payload[1:]
            if channel == Channel.STATUS:
                code, reason, message = parse_status(payload[1:])
                self.result = ExecResult(self.vmid, code, _reason(reason, code), message)
                if self.result.reason is ExitReason.LOST:  # VMBusify's failure, not the program's
                    self.close()
                    raise Failure(message or f"{self.vmid}: the exec was lost", code)
        elif opcode is Opcode.PING:
            self._send(payload, Opcode.PONG)
        elif opcode is Opcode.CLOSE:
            code, reason = close_payload(payload)
            self.close()
            raise Failure(f"{self.vmid}: the command listener closed the exec ({code}"
                          f"{': ' + reason if reason else ''})")
        return None

    def wait(self, timeout: float | None = None) -> ExecResult:
        """Read to the status (output read here is dropped) and return it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.read(None if deadline is None else max(0.0, deadline - time.monotonic())):
            pass
        assert self.result is not None
        return self.result

    def communicate(self, stdin: bytes | None = None, timeout: float | None = None
                    ) -> ExecResult:
        """Send ``stdin`` (then EOF, from a thread of its own, so a program that writes
        before it reads cannot block it), gather stdout and stderr, return the result with
        them."""
        writer = None
        if stdin is not None:
            writer = threading.Thread(target=self._feed, args=(stdin,), daemon=True,
                                      name=f"exec-stdin-{self.vmid}")
            writer.start()
        out: dict[Stream, list[bytes]] = {Stream.STDOUT: [], Stream.STDERR: []}
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while (chunk := self.read(None if deadline is None
                                      else max(0.0, deadline - time.monotonic()))):
                out[chunk[0]].append(chunk[1])
        except BaseException:
            self.close()
            raise
        assert self.result is not None
        self.result = ExecResult(self.vmid, self.result.exit_code, self.result.reason,
                                 self.result.message, b"".join(out[Stream.STDOUT]),
                                 b"".join(out[Stream.STDERR]))
        return self.result

    def _feed(self, data: bytes) -> None:
        try:
            if data:
                self.write(data)
            self.close_stdin()
        except (OSError, Failure):
            pass  # the exec ended or went away: read() says how

    def close(self) -> None:
        """Hang up. Before the status, the remote process tree is killed."""
        with self._send_lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
