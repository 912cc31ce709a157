"""The executor's ledger: what a SIGKILLed executor left running is ended by the next one."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from vmbusify.workers.exec.ledger import Ledger
from vmbusify.workers.exec.process import TAG_VAR

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def tagged(tag: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(SLEEPER, env={**os.environ, TAG_VAR: tag}, start_new_session=True)


def test_sweep_kills_only_the_written_down_tags(tmp_path: Path) -> None:
    left, ended, foreign = (uuid.uuid4().hex for _ in range(3))
    procs = {t: tagged(t) for t in (left, ended, foreign)}
    try:
        ledger = Ledger(tmp_path)
        ledger.add(left, procs[left].pid)
        ledger.add(ended, procs[ended].pid)
        ledger.remove(ended)  # ended normally: what it left on purpose lives on
        assert Ledger(tmp_path).sweep() == 1  # a new executor, after a SIGKILL
        assert procs[left].wait(5) == -9
        assert procs[ended].poll() is None and procs[foreign].poll() is None
        assert list(ledger.dir.iterdir()) == []
        assert Ledger(tmp_path).sweep() == 0
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


def test_sweep_ignores_junk_and_a_missing_directory(tmp_path: Path) -> None:
    assert Ledger(tmp_path / "nowhere").sweep() == 0
    ledger = Ledger(tmp_path)
    ledger.dir.mkdir()
    (ledger.dir / "not-a-tag").write_text("1\n")  # never a reason to kill pid 1
    (ledger.dir / ("a" * 32)).write_text("garbage")
    assert ledger.sweep() == 0
    assert list(ledger.dir.iterdir()) == []
