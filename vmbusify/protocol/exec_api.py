"""The exec API between vmbusifyexec and the command listener: channels, exit codes, reasons.

Standard library only, and no dataclasses: ``vmbusifyexec`` starts once per command and
imports this module, never ``vmbusify.protocol.exec`` (the listener <-> executor messages),
whose dataclasses alone would cost it ~9 ms of CPU. docs/exec.md describes the API.

Exit codes (what vmbusifyexec exits with)::

    0..125   the program's own exit status
    124      --timeout expired: the whole remote process tree was killed
    126      the program could not be started (not executable, bad -w or -u)
    127      the program was not found
    128+N    the program died of signal N
    255      vmbusifyexec itself failed: usage, the command listener, unknown/unreachable/lost VM
"""

from __future__ import annotations

from enum import Enum, IntEnum

EXIT_TIMEOUT = 124
EXIT_CANNOT_RUN = 126
EXIT_NOT_FOUND = 127
SIGNAL_BASE = 128
EXIT_FAILURE = 255

#: Signals a client may forward (by name, so the two ends need not agree on numbers).
FORWARDABLE = ("INT", "TERM", "HUP", "QUIT", "KILL", "USR1", "USR2", "WINCH", "CONT", "STOP")


class ExitReason(str, Enum):
    """Why an exec ended."""

    EXITED = "exited"
    SIGNALED = "signaled"
    TIMEOUT = "timeout"
    NOT_FOUND = "not-found"
    CANNOT_RUN = "cannot-run"
    #: The tunnel, the listener or the client went away.
    LOST = "lost"


class Channel(IntEnum):
    """First byte of every binary WebSocket message between vmbusifyexec and the listener."""

    #: client -> listener: bytes for the program's stdin.
    STDIN = 0
    #: listener -> client: the program's stdout (or its pty, with a TTY).
    STDOUT = 1
    #: listener -> client: the program's stderr.
    STDERR = 2
    #: listener -> client: JSON ``{"exit_code": N, "reason": ..., "message": ...}``, then close.
    STATUS = 3
    #: client -> listener: JSON ``{"rows": R, "cols": C}``.
    RESIZE = 4
    #: client -> listener: JSON ``{"signal": "INT"}``.
    SIGNAL = 5
    #: client -> listener: JSON ``{"op": "read" | "write", "offset": O, "count": N}``: the
    #: client hands the listener an open regular file (docs/exec.md, "A file by descriptor"):
    #: "read": N bytes of it from O become the program's stdin; "write": the next N bytes of
    #: the program's stdout go into it at O (not to the client).
    FD_OPEN = 6
    #: listener -> client: send the descriptor now (one byte with SCM_RIGHTS).
    FD_READY = 7
    #: listener -> client: JSON ``{"bytes": n, "end": bool, "error": str}``: progress of the
    #: FD_OPEN transfer; the one with ``"end": true`` is its last.
    FD_DONE = 8
    #: client -> listener: ``b"\\xff\\x00"``: stdin reached EOF (close the remote stdin).
    CLOSE = 255
