"""Text from a peer in logs and on terminals, and warnings a peer can trigger at will."""

from __future__ import annotations

import io
import logging

from vmbusify.logs import OneLineFormatter, RateLimitedLog, printable


def test_printable_escapes_what_could_forge_a_line_or_drive_a_terminal() -> None:
    assert printable("a\nb\r\x1b[2J\x7f\x9b\u2028c\\d") == \
        "a\\x0ab\\x0d\\x1b[2J\\x7f\\x9b\\u2028c\\\\d"
    assert printable(b"caf\xc3\xa9 \xff") == "café \\xff"
    assert printable("x" * 300, limit=10) == "x" * 10 + "..."
    assert printable("plain text, üñí") == "plain text, üñí"


def test_a_log_record_stays_one_line_whatever_a_peer_put_in_it() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(OneLineFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("test.oneline")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.warning("open %s failed", "evil.lab\nINFO forged line\x1b[31m")
    assert out.getvalue() == "WARNING open evil.lab\\x0aINFO forged line\\x1b[31m failed\n"


def test_rate_limited_log_counts_what_it_held_back() -> None:
    now = [0.0]
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("test.ratelimit")
    logger.handlers[:] = [Keep()]
    logger.propagate = False
    limited = RateLimitedLog(logger, per_minute=3, clock=lambda: now[0])
    logged = [limited.warning(("vm1", "bad"), "bad package %d", i) for i in range(10)]
    assert logged == [True] * 3 + [False] * 7
    assert limited.warning(("vm2", "bad"), "other vm")  # another key has its own lines
    now[0] = 61.0
    assert limited.warning(("vm1", "bad"), "bad package %d", 10)
    assert records == ["bad package 0", "bad package 1", "bad package 2", "other vm",
                       "bad package 10 (and 7 more like it not logged)"]
