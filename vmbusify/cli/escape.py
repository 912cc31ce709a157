"""The escape sequence of a terminal session, as ssh has it: typed at the start of a line,
``~.`` ends the session from this end, ``~~`` types one ``~``; a ``~`` before anything else
is sent as typed. Sans-I/O: it sees the keys and says what to send on and when to stop.

It is the way out of a session whose program ignores Ctrl-C or whose tunnel stalled: in raw
mode Ctrl-C is a key for the remote terminal, not a signal to vmbusifyexec.
"""

from __future__ import annotations

ESCAPE = ord("~")
DISCONNECT = ord(".")
#: What ends a line as a terminal in raw mode sends it: Enter is CR; LF from a paste.
_LINE_ENDS = b"\r\n"


class EscapeFilter:
    """Keys in, keys out; ``feed`` says when ``~.`` was typed."""

    def __init__(self) -> None:
        self._line_start = True
        self._pending = False  # a "~" typed at a line start, waiting for the next key

    def feed(self, keys: bytes) -> tuple[bytes, bool]:
        """(the keys to send on, whether ``~.`` was typed: disconnect, send nothing more)."""
        if not keys:
            return b"", False
        if not self._pending and ESCAPE not in keys:  # nearly always: nothing to look at
            self._line_start = keys[-1] in _LINE_ENDS
            return keys, False
        out = bytearray()
        for key in keys:
            if self._pending:
                self._pending = False
                if key == DISCONNECT:
                    return bytes(out), True
                if key == ESCAPE:  # "~~": one "~", and the line has begun
                    out.append(ESCAPE)
                    self._line_start = False
                    continue
                out.append(ESCAPE)  # not an escape: the "~" was meant, then this key
            elif self._line_start and key == ESCAPE:
                self._pending = True
                continue
            out.append(key)
            self._line_start = key in _LINE_ENDS
        return bytes(out), False
