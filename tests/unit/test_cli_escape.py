"""The terminal session's escape sequence (~. and ~~ at the start of a line)."""

from __future__ import annotations

from vmbusify.cli.escape import EscapeFilter


def typed(*chunks: bytes) -> tuple[bytes, bool]:
    f, out = EscapeFilter(), b""
    for chunk in chunks:
        sent, stop = f.feed(chunk)
        out += sent
        if stop:
            return out, True
    return out, False


def test_tilde_dot_at_a_line_start_disconnects() -> None:
    assert typed(b"~.") == (b"", True)  # the session's first keys are at a line start
    assert typed(b"ls\r", b"~", b".") == (b"ls\r", True)
    assert typed(b"echo hi\r~.rest") == (b"echo hi\r", True)  # nothing after it is sent
    assert typed(b"a\n~.") == (b"a\n", True)


def test_tilde_elsewhere_or_before_other_keys_is_sent_as_typed() -> None:
    assert typed(b"cd ~/x; echo ~.\r") == (b"cd ~/x; echo ~.\r", False)
    assert typed(b"~/bin/run\r") == (b"~/bin/run\r", False)
    assert typed(b"~", b"x") == (b"~x", False)
    assert typed(b"~\r~.") == (b"~\r", True)  # "~" then Enter: a line start again


def test_tilde_tilde_types_one_tilde_and_the_line_has_begun() -> None:
    assert typed(b"~~.") == (b"~.", False)
    assert typed(b"~~", b"~.") == (b"~~.", False)


def test_plain_typing_passes_through_unchanged() -> None:
    keys = bytes(range(256)).replace(b"~", b"")
    assert typed(keys, keys) == (keys + keys, False)
