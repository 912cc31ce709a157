"""Text from the other side is data: a peer's strings made fit for a log line or a terminal.

It imports nothing, on purpose: ``vmbusifyexec`` starts once per command and prints the listener's
and the guest's error texts through this (docs/exec.md, "A light client").
"""

from __future__ import annotations

#: Control characters (C0, DEL, C1) and the Unicode line and paragraph separators: in a log
#: line or on a terminal any of them can forge a line or move the cursor.
_UNSAFE = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_UNSAFE.update({0x2028: "\\u2028", 0x2029: "\\u2029", ord("\\"): "\\\\"})
# Bytes that are not UTF-8, as "surrogateescape" decodes them (U+DC80..U+DCFF): \xNN.
_UNSAFE.update({0xDC00 + b: f"\\x{b:02x}" for b in range(0x80, 0x100)})
#: In a whole log message a backslash stays as it is (our own messages hold Windows paths
#: and regexes); only what can break the line or the terminal is escaped.
UNSAFE_IN_LOG = {k: v for k, v in _UNSAFE.items() if k != ord("\\")}


def printable(text: object, limit: int = 200) -> str:
    """``text`` (a peer's string, or bytes) fit for a log line or a terminal: control
    characters escaped, a backslash doubled, at most ``limit`` characters (then ``...``)."""
    if isinstance(text, bytes | bytearray | memoryview):
        text = bytes(text).decode("utf-8", "surrogateescape")
    s = str(text)
    cut = len(s) > limit
    s = s[:limit].translate(_UNSAFE)
    return s + "..." if cut else s


#: What a terminal must not be sent from a peer: the control characters that move the cursor,
#: change modes or set the title (ESC, CSI, BEL...). Newlines and tabs stay: our own
#: multi-line messages use them, and they cannot rewrite what is already on the screen.
_UNSAFE_ON_TERMINAL = {k: v for k, v in UNSAFE_IN_LOG.items() if k not in (0x09, 0x0A)}


def for_terminal(text: str, limit: int = 4000) -> str:
    """A message for the operator's terminal: control characters but newline and tab
    escaped, at most ``limit`` characters (then ``...``)."""
    cut = len(text) > limit
    s = text[:limit].translate(_UNSAFE_ON_TERMINAL)
    return s + "..." if cut else s
