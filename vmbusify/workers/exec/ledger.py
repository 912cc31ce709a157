"""The executor's ledger of attached execs, so a killed executor leaves no orphans behind.

An executor that stops kills every attached exec's tree itself; one killed with SIGKILL
cannot, and its programs (in sessions of their own, so supervisord's killasgroup misses
them) would run on with nobody to read their output or stop them. So each attached exec is
written down while it runs: one file per exec in ``<run_dir>/exec-attached/``, named by its
tag (``VMBUSIFY_EXEC_ID``) and holding its pid. The next executor, on start, kills every
process carrying the tag of an exec still written down, then clears the ledger. Detached
execs (``-d``) are never written down: they are meant to live on.

The run directory is a tmpfs, root-only: after a reboot the ledger is empty.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from pathlib import Path

import psutil

from vmbusify.workers.exec.process import TAG_VAR

log = logging.getLogger(__name__)

_TAG_RE = re.compile(r"^[0-9a-f]{32}$")


class Ledger:
    """The attached execs running under this run directory."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(run_dir) / "exec-attached"

    def add(self, tag: str, pid: int) -> None:
        """Write down a started attached exec."""
        try:
            self.dir.mkdir(mode=0o700, exist_ok=True)
            (self.dir / tag).write_text(f"{pid}\n")
        except OSError as exc:  # the exec still runs; only a crash would leave it behind
            log.warning("cannot record exec %s in %s: %s", tag, self.dir, exc.strerror)

    def remove(self, tag: str) -> None:
        """Strike out an exec whose tree has ended (or was killed)."""
        try:
            (self.dir / tag).unlink(missing_ok=True)
        except OSError:
            pass

    def sweep(self) -> int:
        """Kill every process of the execs a previous executor left written down; how many
        were killed. Called once, before serving.

        Only processes carrying one of those tags are killed: a random 128-bit value nothing
        foreign has (pids alone could have been reused since).
        """
        try:
            tags = {e.name for e in self.dir.iterdir() if _TAG_RE.match(e.name)}
        except OSError:
            return 0
        killed = 0
        if tags:
            for proc in psutil.process_iter():
                try:
                    if proc.pid != os.getpid() and proc.environ().get(TAG_VAR) in tags:
                        proc.send_signal(signal.SIGKILL)
                        killed += 1
                except psutil.Error:
                    continue
        for entry in self.dir.iterdir():
            entry.unlink(missing_ok=True)
        if killed:
            log.warning("killed %d process(es) of %d exec(s) left running by an executor that "
                        "died", killed, len(tags))
        return killed
