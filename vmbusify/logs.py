"""Logging for every VMBusify program: one line per event on stdout, supervisord keeps it."""

from __future__ import annotations

import logging
import sys


def setup_logging(program: str, level: str = "INFO") -> None:
    """Log to stdout as ``time level program: message`` (context like vm=... in the message)."""
    # supervisord reads our stdout through a pipe: flush every line, or logs lag behind.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s {program}[%(process)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
