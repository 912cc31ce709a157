"""Command execution messages (docs/exec.md): command listener <-> command executor. Sans-I/O;
every message a ``vmbusify.protocol.message.Message``. What vmbusifyexec and the listener
share (channels, exit codes, reasons) is in ``vmbusify.protocol.exec_api``.

Theory of operation
-------------------
The listener (host, Entity.CMD_LISTENER) opens two streams to the executor (guest,
Entity.CMD_EXECUTOR): *main* (stdin down, stdout or the pty up) and *side* (stderr up; down,
nothing but the EOF at the very end, so the executor's read of it fails the moment the exec is
aborted, whether by a reset, a lost tunnel or a restarted mux). It announces both with one
START request whose package header carries the main stream's id and whose body
(``ExecSpec.to_body``) names the side stream. The executor answers
with ``StartReply``: the pid, or why the program could not start (exit code 126/127).

While the program runs, SIGNAL, RESIZE and KILL messages go down (one-way, MESSAGE). KILL
(the client went away) comes with a reset of both streams. When the program has
ended and both output streams reached EOF, one EXIT message comes up (``ExitStatus``). EXIT is
a control message and may overtake the last DATA packages on the tunnel, so the listener
reports the status only after both output streams ended. An exec is named on both ends by
its main stream id. KILL, a reset stream or a lost tunnel makes the executor kill the whole
process tree.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field
from enum import IntEnum
from signal import Signals
from typing import Any

from vmbusify.errors import RemoteProtocolError
from vmbusify.protocol.entities import Entity
from vmbusify.protocol.exec_api import (
    EXIT_FAILURE,
    FORWARDABLE,
    SIGNAL_BASE,
    ExitReason,
)
from vmbusify.protocol.message import Message, body_map, limit, optional

#: Limits on what one exec request may carry (the listener refuses more).
MAX_ARGS = 4096
MAX_ENV = 4096
MAX_STRING = 128 << 10
MAX_TIMEOUT = 366 * 86400.0


class ExecMessage(IntEnum):
    """Message ids of the command listener and the command executor."""

    #: REQUEST listener -> executor: start a program; header stream = the main stream.
    START = 1
    #: DATA / WINDOW of the exec streams (both directions).
    DATA = 2
    #: MESSAGE listener -> executor: deliver a signal to the running program.
    SIGNAL = 3
    #: MESSAGE listener -> executor: the client's terminal changed size.
    RESIZE = 4
    #: MESSAGE executor -> listener: the program ended (ExitStatus).
    EXIT = 5
    #: MESSAGE listener -> executor: the client went away: kill the whole process tree.
    KILL = 6


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RemoteProtocolError(f"{what} must be a string")
    if "\0" in value:
        raise RemoteProtocolError(f"{what} contains a NUL byte")
    if len(value) > MAX_STRING:
        raise RemoteProtocolError(f"{what} is longer than {MAX_STRING} characters")
    return value


@dataclass(frozen=True)
class ExecSpec(Message, entity=Entity.CMD_LISTENER, message_id=ExecMessage.START, name="START"):
    """What to run, and how: the client's request, and the body of START."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    user: str = ""
    tty: bool = False
    stdin: bool = False
    #: Seconds before the whole process tree is killed (exit 124); None: no limit.
    timeout: float | None = None
    detach: bool = False
    rows: int = 0
    cols: int = 0
    #: TERM for the remote pty (from the client's environment).
    term: str = ""
    #: START only: the id of the side stream (stderr up, lifeline down); 0 when detached.
    side_stream: int = 0

    def to_body(self) -> dict[str, Any]:
        """The plain-data form (JSON for the client's request, msgpack in START)."""
        body: dict[str, Any] = {"argv": list(self.argv)}
        for key in ("env", "cwd", "user", "tty", "stdin", "timeout", "detach", "rows", "cols",
                    "term", "side_stream"):
            value = getattr(self, key)
            if value:
                body[key] = value
        return body

    @classmethod
    def from_body(cls, d: Any, what: str = "exec request") -> ExecSpec:
        """Validate a request; RemoteProtocolError with a one-line reason if it is malformed."""
        if not isinstance(d, dict):
            raise RemoteProtocolError(f"{what}: expected a JSON object")
        unknown = set(d) - {"argv", "env", "cwd", "user", "tty", "stdin", "timeout", "detach",
                            "rows", "cols", "term", "side_stream"}
        if unknown:
            raise RemoteProtocolError(f"{what}: unknown field {min(unknown)!r}")
        argv = d.get("argv")
        if not isinstance(argv, list) or not argv:
            raise RemoteProtocolError(f"{what}: 'argv' must be a non-empty list of strings")
        if len(argv) > MAX_ARGS:
            raise RemoteProtocolError(f"{what}: more than {MAX_ARGS} arguments")
        argv = [_string(a, f"{what}: argument {i}") for i, a in enumerate(argv)]
        if not argv[0]:
            raise RemoteProtocolError(f"{what}: the program name is empty")
        env = optional(d, "env", dict, what, {}) or {}
        if len(env) > MAX_ENV:
            raise RemoteProtocolError(f"{what}: more than {MAX_ENV} environment variables")
        for k, v in env.items():
            _string(k, f"{what}: environment name")
            _string(v, f"{what}: environment value of {k!r}")
            if not k or "=" in k:
                raise RemoteProtocolError(f"{what}: bad environment name {k!r}")
        timeout = optional(d, "timeout", (int, float), what)
        if timeout is not None and not (0 < timeout <= MAX_TIMEOUT and math.isfinite(timeout)):
            raise RemoteProtocolError(f"{what}: 'timeout' must be a number of seconds > 0")
        rows = optional(d, "rows", int, what, 0) or 0
        cols = optional(d, "cols", int, what, 0) or 0
        if not (0 <= rows <= 0xFFFF and 0 <= cols <= 0xFFFF):
            raise RemoteProtocolError(f"{what}: 'rows' and 'cols' must be in 0..65535")
        side_stream = optional(d, "side_stream", int, what, 0) or 0
        if not 0 <= side_stream <= 0xFFFFFFFF:
            raise RemoteProtocolError(f"{what}: bad 'side_stream'")
        spec = cls(
            argv=argv, env=dict(env), cwd=_string(d.get("cwd") or "", f"{what}: 'cwd'"),
            user=_string(d.get("user") or "", f"{what}: 'user'"),
            tty=bool(optional(d, "tty", bool, what, False)),
            stdin=bool(optional(d, "stdin", bool, what, False)),
            timeout=float(timeout) if timeout is not None else None,
            detach=bool(optional(d, "detach", bool, what, False)), rows=rows, cols=cols,
            term=_string(d.get("term") or "", f"{what}: 'term'")[:64], side_stream=side_stream,
        )
        if spec.detach and (spec.tty or spec.stdin):
            raise RemoteProtocolError(f"{what}: a detached exec takes no stdin and no TTY")
        return spec


@dataclass(frozen=True)
class StartReply(Message, entity=Entity.CMD_EXECUTOR, message_id=ExecMessage.START,
                 name="START reply"):
    """The executor's answer to START (the ACK's payload): the pid, or why the program did
    not start."""

    pid: int = 0
    exit_code: int = 0
    message: str = ""

    @property
    def started(self) -> bool:
        return self.pid > 0

    def to_body(self) -> dict[str, Any]:
        """``{"pid": N}`` or ``{"exit_code": N, "message": text}``."""
        if self.started:
            return {"pid": self.pid}
        return {"exit_code": self.exit_code, "message": self.message}

    @classmethod
    def from_body(cls, body: Any) -> StartReply:
        """Check the executor's answer; RemoteProtocolError if malformed."""
        d = body_map(body, cls.NAME)
        if "pid" in d:
            pid = optional(d, "pid", int, cls.NAME)
            if pid is None or pid <= 0:
                raise RemoteProtocolError(f"{cls.NAME}: bad pid")
            return cls(pid=pid)
        code = optional(d, "exit_code", int, cls.NAME, EXIT_FAILURE)
        return cls(exit_code=code, message=optional(d, "message", str, cls.NAME, "")[:2000])


@dataclass(frozen=True)
class ExitStatus(Message, entity=Entity.CMD_EXECUTOR, message_id=ExecMessage.EXIT, name="EXIT"):
    """How an exec ended (the EXIT message, and the STATUS channel to the client)."""

    exit_code: int
    reason: ExitReason
    message: str = ""
    #: The exec's main stream id (EXIT only).
    id: int = 0
    #: The signal that killed the program, if any.
    signal: int = 0

    def to_body(self) -> dict[str, Any]:
        """The EXIT map (fields at their defaults left out)."""
        body: dict[str, Any] = {"exit_code": self.exit_code, "reason": self.reason.value}
        if self.message:
            body["message"] = self.message
        if self.id:
            body["id"] = self.id
        if self.signal:
            body["signal"] = self.signal
        return body

    @classmethod
    def from_body(cls, body: Any, what: str = "EXIT") -> ExitStatus:
        """Check an EXIT; RemoteProtocolError if malformed."""
        d = body_map(body, what)
        code = optional(d, "exit_code", int, what)
        if code is None or not 0 <= code <= 255:
            raise RemoteProtocolError(f"{what}: 'exit_code' must be in 0..255")
        try:
            reason = ExitReason(d.get("reason"))
        except ValueError:
            raise RemoteProtocolError(f"{what}: unknown reason {d.get('reason')!r}") from None
        return cls(code, reason, optional(d, "message", str, what, "")[:2000],
                   optional(d, "id", int, what, 0) or 0, optional(d, "signal", int, what, 0) or 0)


def status_from_returncode(returncode: int, exec_id: int = 0) -> ExitStatus:
    """The ExitStatus of a program that ended with ``returncode`` (negative: killed by -N)."""
    if returncode < 0:
        sig = -returncode
        return ExitStatus(SIGNAL_BASE + sig, ExitReason.SIGNALED, f"killed by {signal_name(sig)}",
                          exec_id, sig)
    return ExitStatus(returncode & 0xFF, ExitReason.EXITED, "", exec_id)


def signal_name(signum: int) -> str:
    """``SIGINT`` for 2; ``signal 99`` for numbers without a name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def parse_signal(name: Any) -> signal.Signals:
    """A forwardable signal by name (``INT`` or ``SIGINT``); RemoteProtocolError otherwise."""
    if not isinstance(name, str):
        raise RemoteProtocolError("signal: expected a name like 'INT'")
    short = name.upper().removeprefix("SIG")
    if short not in FORWARDABLE:
        raise RemoteProtocolError(f"signal {name!r} cannot be forwarded")
    return signal.Signals[f"SIG{short}"]


@dataclass(frozen=True)
class Resize(Message, entity=Entity.CMD_LISTENER, message_id=ExecMessage.RESIZE, name="RESIZE"):
    """A terminal size change: the RESIZE message (``id``: the exec), and the client's RESIZE
    channel (no ``id``)."""

    rows: int
    cols: int
    #: The exec's main stream id (the RESIZE message only).
    id: int = 0
    #: Bytes of stdin the listener had sent on the main stream before this (the RESIZE
    #: message only): the executor applies it after them (see ``SendSignal.after``).
    after: int = 0

    def to_body(self) -> dict[str, Any]:
        """``{"id": N, "rows": R, "cols": C, "after": B}`` (no ``id`` nor ``after`` when 0)."""
        body: dict[str, Any] = {"id": self.id} if self.id else {}
        body.update(rows=self.rows, cols=self.cols)
        if self.after:
            body["after"] = self.after
        return body

    @classmethod
    def from_body(cls, body: Any, what: str = "RESIZE") -> Resize:
        """Check a size change; RemoteProtocolError if malformed or out of range."""
        d = body_map(body, what)
        rows, cols = optional(d, "rows", int, what, 0), optional(d, "cols", int, what, 0)
        if not (0 < rows <= 0xFFFF and 0 < cols <= 0xFFFF):
            raise RemoteProtocolError(f"{what}: 'rows' and 'cols' must be in 1..65535")
        return cls(rows, cols, optional(d, "id", int, what, 0), _after(d, what))


@dataclass(frozen=True)
class SendSignal(Message, entity=Entity.CMD_LISTENER, message_id=ExecMessage.SIGNAL, name="SIGNAL"):
    """SIGNAL: deliver ``signal`` (a forwardable name, ``INT``) to the exec ``id``."""

    id: int
    signal: str
    #: Bytes of stdin the listener had sent on the exec's main stream before the signal.
    #: SIGNAL is a control message and may overtake them (on the bus's lanes, the tunnel's
    #: queue, the executor's stdin writer): the executor delivers it only once that many
    #: bytes went into the program's stdin (docs/exec.md, "Signals, and no orphans").
    #: 0 (and an old listener, which sends none): at once.
    after: int = 0

    @property
    def signum(self) -> Signals:
        """The signal to deliver."""
        return parse_signal(self.signal)

    def to_body(self) -> dict[str, Any]:
        """``{"id": N, "signal": S, "after": B}`` (no ``after`` when 0: the bytes of 0.1.0)."""
        body: dict[str, Any] = {"id": self.id, "signal": self.signal}
        if self.after:
            body["after"] = self.after
        return body

    @classmethod
    def from_body(cls, body: Any) -> SendSignal:
        """Check a SIGNAL; RemoteProtocolError if malformed or not a forwardable signal."""
        msg = super().from_body(body)
        parse_signal(msg.signal)
        _after(body, cls.NAME)
        return msg


def _after(d: dict[str, Any], what: str) -> int:
    """A message's ``after`` (stdin bytes it follows), checked: 0 when absent."""
    after = optional(d, "after", int, what, 0)
    if after < 0:
        raise RemoteProtocolError(f"{what}: 'after' must not be negative")
    return int(after)


@dataclass(frozen=True)
class Kill(Message, entity=Entity.CMD_LISTENER, message_id=ExecMessage.KILL, name="KILL"):
    """KILL: the client of the exec ``id`` went away; kill the whole process tree."""

    id: int
    reason: str = field(default="killed by the listener", metadata=limit(200))
