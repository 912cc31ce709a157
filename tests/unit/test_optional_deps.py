"""aiohttp and uvloop are host extras (vmbusify[host]): a guest installed from Debian's
packages runs without them, and says so in one line."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from vmbusify.cli.programs import listener_missing
from vmbusify.runtime import run_async


async def _answer() -> int:
    return 42


def test_without_uvloop_asyncio_runs_and_one_line_says_so(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    with caplog.at_level(logging.INFO, logger="vmbusify.runtime"):
        assert run_async(_answer()) == 42
    lines = [r.getMessage() for r in caplog.records if r.name == "vmbusify.runtime"]
    assert lines == [("uvloop (0.18 or later) is not installed: running on asyncio's own "
                     "event loop (same behaviour, more CPU per package)")]


def test_listener_needs_aiohttp_3_9(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiohttp", None)
    assert listener_missing() == "aiohttp is not installed"
    old = types.ModuleType("aiohttp")
    old.__version__ = "3.8.4"  # type: ignore[attr-defined]  # Debian 12's
    web = types.ModuleType("aiohttp.web")  # no web.AppKey before 3.9
    old.web = web  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "aiohttp", old)
    monkeypatch.setitem(sys.modules, "aiohttp.web", web)
    assert listener_missing() == "aiohttp 3.8.4 is older than 3.9"


def test_control_without_aiohttp_says_why_and_waits_for_sigterm(tmp_path: Path) -> None:
    """Under supervisord an exit would be restarted over and over: the program stays up,
    says once why there is no listener, and exits 0 when stopped."""
    config = tmp_path / "guest.toml"
    config.write_text(f'role = "guest"\nrun_dir = "{tmp_path}/run"\n'
                      f'state_dir = "{tmp_path}/state"\n')
    code = ("import sys; sys.modules['aiohttp'] = None\n"
            "from vmbusify.cli.main import main\n"
            f"main(['control', '--config', {str(config)!r}])\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = ""
        deadline = time.monotonic() + 20
        while "command listener is off" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "the program ended without saying why"
        assert " WARNING control[" in line
        assert "the command listener is off: aiohttp is not installed" in line
        time.sleep(0.3)
        assert proc.poll() is None  # still up: supervisord sees it RUNNING, not crashing
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "Traceback" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
