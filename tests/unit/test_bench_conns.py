"""bench/conns.py's proof of where the burst's connect time goes: the client's held mode
(every open first), the SOCKS5 server that does no work, and the floor for the median."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.conns import (
    CLIENT,
    ECHO_SERVER,
    NULL_SOCKS,
    best_case_ms,
    floor_ms,
    floor_text,
)


@pytest.fixture
def null_socks(tmp_path: Path) -> Iterator[int]:
    """NULL_SOCKS listening on 127.0.0.1; yields its port."""
    script = tmp_path / "null.py"
    script.write_text(NULL_SOCKS)
    proc = subprocess.Popen([sys.executable, str(script), "127.0.0.1"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready[0] == "ready"
        yield int(ready[1])
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("hold", [False, True])
def test_the_client_through_the_null_socks_server_gets_every_byte_back(
        null_socks: int, tmp_path: Path, hold: bool) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    argv = [sys.executable, str(script), f"127.0.0.1:{null_socks}", "192.0.2.1", "9", "40",
            "4", "1" if hold else "0"]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        if hold:
            # Nothing is sent until every connection is connected and the caller says go.
            assert proc.stdout.readline().strip() == "held"
            proc.stdin.write("go\n")
            proc.stdin.flush()
        out, _ = proc.communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["intact"] == 40, result
    assert set(result["phases_ms"]) == {"tcp", "greeting"}
    assert result["client_cpu_ms_per_open"] > 0
    run, wait = result["client_sched_ms"]
    assert run > 0 and wait >= 0


def test_the_echo_server_gives_each_burst_a_port_of_its_own(tmp_path: Path) -> None:
    """Bursts back to back to one port wait on each other's TIME_WAIT connections."""
    script = tmp_path / "echo.py"
    script.write_text(ECHO_SERVER)
    client = tmp_path / "client.py"
    client.write_text(CLIENT)
    proc = subprocess.Popen([sys.executable, str(script), "127.0.0.1", "3"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready[0] == "ready" and len(set(ready[1:])) == 3
        for port in ready[1:]:
            out = subprocess.run([sys.executable, str(client), "", "127.0.0.1", port, "20", "2",
                                  "0"], capture_output=True, text=True, timeout=60, check=True)
            assert json.loads(out.stdout.strip().splitlines()[-1])["intact"] == 20
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_floor_is_half_the_burst_of_opens_over_the_cores() -> None:
    f = {"direct": {"connect_median_ms": 50.0},
         "held": {"connect_median_ms": 300.0, "client_cpu_ms_per_open": 0.1,
                  "cpu_ms_per_open": {"guest proxy": 0.2, "host proxy": 0.1}},
         "null_socks": {"connect_median_ms": 60.0}}
    # (0.2 + 0.1 + 0.1) ms x 500 opens / 2 cores
    assert floor_ms(f, 1000, 2) == pytest.approx(100.0)
    text = floor_text(f, 1000, 2)
    assert "100 ms = 2.00 x direct" in text
    assert "300.0 ms = 6.00 x direct" in text
    assert "60.0 ms = 1.20 x direct" in text
    # the null server's median + the path's CPU (0.3 ms) x 500 opens / 2 cores
    assert best_case_ms(f, 1000, 2) == pytest.approx(135.0)
    assert "= 135 ms = 2.70 x direct" in text
