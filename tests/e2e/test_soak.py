"""Soak: ten minutes of mixed load, then every process's memory and open fds must be flat
(root; the lab; marked ``soak``, so not in the default run).

    VMBUSIFY_LAB_INSTANCE=... .venv/bin/pytest -m soak tests/e2e/test_soak.py -s
    VMBUSIFY_SOAK_SECONDS=120 ...   # shorter

Round after round, the mixed load of the fault suite (an exec streaming lines, a proxied
download and a download over the subnet, every byte checked) runs against vm1, with 50
short execs and 50 short proxied requests between rounds. Every program of the host and vm1
is sampled (RSS, open fds) each round. "Flat": the median of the last quarter's samples is at
most the median of the first quarter's plus a little (RSS: 10 % + 8 MB; fds: 8), no program
was restarted, and every round's bytes were intact.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.e2e.mixed_load import PROGRAMS, Client, Load, WebServer, running_load
from vmbusify.lab.testing import LabHandle

SOAK_SECONDS = float(os.environ.get("VMBUSIFY_SOAK_SECONDS", "600"))
TARGETS = ("host", "vm1")
RSS_SLACK = (1.10, 8 << 20)
FD_SLACK = 8

pytestmark = [pytest.mark.soak, pytest.mark.timeout(SOAK_SECONDS + 600)]


@pytest.fixture(scope="module")
def web(lab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    server = WebServer(lab, tmp_path_factory.mktemp("soak-www"), 48 << 20)
    server.start()
    yield server
    server.stop()


def sample(lab: LabHandle) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(target, program) -> (pid, rss, open fds)."""
    out = {}
    for target in TARGETS:
        for name in PROGRAMS:
            pid = lab.program_pid(target, name)
            if pid:
                p = psutil.Process(pid)
                out[(target, name)] = (pid, p.memory_info().rss, p.num_fds())
    return out


def test_mixed_load_leaves_memory_and_fds_flat(lab: LabHandle, web: WebServer) -> None:
    samples: list[dict[tuple[str, str], tuple[int, int, int]]] = []
    failures: list[str] = []
    rounds = 0
    deadline = time.monotonic() + SOAK_SECONDS
    load = Load(lab, web, "vm1", seconds=3.0)
    while time.monotonic() < deadline:
        with running_load(load):
            outcomes = load.finish()
        failures += [o.describe() for o in outcomes.values() if not o.ok]
        for i in range(50):
            client = Client.EXEC if i % 2 else Client.PROXY
            ok, why = load.round_trip(client)
            if not ok:
                failures.append(why)
        samples.append(sample(lab))
        rounds += 1
    assert rounds >= 4, f"only {rounds} rounds in {SOAK_SECONDS:g} s"
    assert not failures, f"{len(failures)} failures in {rounds} rounds: {failures[:5]}"
    quarter = max(1, len(samples) // 4)
    first, last = samples[:quarter], samples[-quarter:]
    report, grown = [], []
    for key, (pid, _, _) in samples[0].items():
        pids = {s[key][0] for s in samples if key in s}
        if pids != {pid}:
            grown.append(f"{key[0]} {key[1]} restarted during the soak (pids {sorted(pids)})")
            continue
        rss0 = statistics.median(s[key][1] for s in first)
        rss1 = statistics.median(s[key][1] for s in last)
        fds0 = statistics.median(s[key][2] for s in first)
        fds1 = statistics.median(s[key][2] for s in last)
        report.append(f"{key[0]:>4} {key[1]:<8} rss {rss0 / 1e6:6.1f} -> {rss1 / 1e6:6.1f} MB"
                      f"  fds {fds0:.0f} -> {fds1:.0f}")
        if rss1 > rss0 * RSS_SLACK[0] + RSS_SLACK[1]:
            grown.append(f"{key} RSS grew {rss0 / 1e6:.1f} -> {rss1 / 1e6:.1f} MB")
        if fds1 > fds0 + FD_SLACK:
            grown.append(f"{key} open fds grew {fds0:.0f} -> {fds1:.0f}")
    print(f"\nsoak: {rounds} rounds in {SOAK_SECONDS:g} s\n" + "\n".join(report))
    (Path(os.environ.get("VMBUSIFY_SOAK_REPORT", "/dev/null"))).write_text("\n".join(report))
    assert not grown, "\n".join(grown)
