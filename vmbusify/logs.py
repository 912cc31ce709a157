"""Logging for every VMBusify program: one line per event on stdout, supervisord keeps it."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Hashable

from vmbusify.text import UNSAFE_IN_LOG, printable

__all__ = ["OneLineFormatter", "RateLimitedLog", "printable", "setup_logging"]


def setup_logging(program: str, level: str = "INFO") -> None:
    """Log to stdout as ``time level program: message`` (context like vm=... in the message)."""
    # supervisord reads our stdout through a pipe: flush every line, or logs lag behind.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(OneLineFormatter(
        f"%(asctime)s %(levelname)s {program}[%(process)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)


# -- text from the other side is data ------------------------------------------------------


class OneLineFormatter(logging.Formatter):
    """A log record is one line, whatever its message holds: control characters in the
    message (a peer's host name with a newline, an escape sequence) are escaped, so text
    from a guest can neither forge a log line nor drive the terminal of whoever reads the
    log. A traceback we log ourselves still follows on lines of its own."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = record.message.translate(UNSAFE_IN_LOG)
        return super().formatMessage(record)


class RateLimitedLog:
    """At most ``per_minute`` lines for each key (a VM and a kind of problem) every minute;
    what was held back is counted and said in the next line that gets through.

    A hostile VM can send a bad package a microsecond: without this, one warning each is a
    way to fill the host's disk and bury everything else in the log.
    """

    def __init__(self, logger: logging.Logger, per_minute: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.per_minute = per_minute
        self._clock = clock
        self._windows: dict[Hashable, list[float | int]] = {}  # key -> [start, lines, held]

    def log(self, level: int, key: Hashable, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``key`` used up its lines this minute; True if logged."""
        now = self._clock()
        w = self._windows.get(key)
        if w is None or now - w[0] >= 60.0:
            held = int(w[2]) if w is not None else 0
            w = self._windows[key] = [now, 0, held]
            if len(self._windows) > 4096:  # keys come from peers too: keep the table small
                self._forget(now)
        if w[1] >= self.per_minute:
            w[2] = int(w[2]) + 1
            return False
        w[1] = int(w[1]) + 1
        if w[2]:
            msg = f"{msg} (and {int(w[2])} more like it not logged)"
            w[2] = 0
        self.logger.log(level, msg, *args)
        return True

    def warning(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def _forget(self, now: float) -> None:
        for k in [k for k, w in self._windows.items() if now - w[0] >= 60.0 and not w[2]]:
            del self._windows[k]
