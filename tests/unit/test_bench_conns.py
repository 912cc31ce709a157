"""bench/conns.py's proof of where the burst's connect time goes: the client's held mode
(every open first), the SOCKS5 server that does no work, and the floor for the median."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.conns import CLIENT, NULL_SOCKS, floor_ms, floor_text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def null_socks(tmp_path: Path) -> Iterator[int]:
    """NULL_SOCKS listening on 127.0.0.1; yields its port."""
    script = tmp_path / "null.py"
    script.write_text(NULL_SOCKS)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(script), "127.0.0.1", str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield port
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
