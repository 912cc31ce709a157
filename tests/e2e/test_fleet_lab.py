"""Fleet features in the lab (root): a reload that adds vm3 and drops vm2 while an exec
streams output from vm1, and /metrics scraped with curl (docs/metrics.md, docs/discovery.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vmbusify.lab.access import command
from vmbusify.lab.layout import METRICS_PORT
from vmbusify.lab.testing import BIN, LabHandle, vmbusify

EXEC = str(BIN / "vmbusifyexec")


@pytest.fixture
def lab3(lab: LabHandle) -> Iterator[tuple[LabHandle, Path, str]]:
    """The lab with vm3 too; its host config file and text, put back (and reloaded) after."""
    if "vm3" not in lab.vmids:
        vmbusify("lab", "-q", "up", "--vms", "3")
        lab.refresh()
    lab.wait_connected(["vm1", "vm2", "vm3"])
    path = Path(command("host", ["true"])[1]["VMBUSIFY_CONFIG"])
    original = path.read_text()
    yield lab, path, original
    path.write_text(original)
    lab.ctl("reload", check=False)
    lab.wait_connected(["vm1", "vm2", "vm3"])


def _with_vms(text: str, keep: set[str]) -> str:
    """The lab's host config with only the [[vms]] blocks of ``keep``."""
    head, *blocks = text.split("\n[[vms]]\n")
    kept = [b for b in blocks if any(f'vmid = "{v}"' in b for v in keep)]
    return head + "".join(f"\n[[vms]]\n{b}" for b in kept)


def _status(lab: LabHandle) -> dict[str, Any]:
    return dict(json.loads(lab.ctl("status", "--json").stdout))


def test_reload_adds_vm3_and_drops_vm2_while_an_exec_on_vm1_streams(
        lab3: tuple[LabHandle, Path, str]) -> None:
    lab, path, original = lab3
    path.write_text(_with_vms(original, {"vm1", "vm2"}))
    assert "dropped vm3" in lab.ctl("reload").stdout
    count = 60  # lines, one every 0.1 s: the reload happens in the middle
    env = command("host", ["true"])[1]
    proc = subprocess.Popen(
        [EXEC, "vm1", "--", "sh", "-c", (f"i=1; while [ $i -le {count} ]; do echo line $i; "
                                         "i=$((i+1)); sleep 0.1; done")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        first = [proc.stdout.readline() for _ in range(10)]
        assert first[-1] == b"line 10\n"
        path.write_text(_with_vms(original, {"vm1", "vm3"}))
        out = lab.ctl("reload").stdout
        assert "added vm3; dropped vm2; kept 1" in out, out
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = b"".join(first) + rest
    assert lines == b"".join(f"line {i}\n".encode() for i in range(1, count + 1)), err
    assert proc.returncode == 0, err
    st = lab.wait_connected(["vm1", "vm3"])
    assert {v["vmid"] for v in st["vms"]} == {"vm1", "vm3"}
    vm1 = next(v for v in st["vms"] if v["vmid"] == "vm1")
    assert vm1["connects"] == 1  # the same tunnel all along
    got = subprocess.run([EXEC, "vm3", "--", "cat", "/proc/sys/kernel/hostname"], env=env,
                         capture_output=True, timeout=30, check=False)
    assert got.returncode == 0, got.stderr
    gone = subprocess.run([EXEC, "vm2", "--", "true"], env=env, capture_output=True,
                          timeout=30, check=False)
    assert gone.returncode != 0 and b"vm2" in gone.stderr


def _scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics with curl; every sample by (name, labels)."""
    text = subprocess.run(["curl", "-sf", f"http://127.0.0.1:{METRICS_PORT}/metrics"],
                          capture_output=True, text=True, timeout=30, check=True).stdout
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _get(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str,
         **labels: str) -> float | None:
    return samples.get((metric, frozenset(labels.items())))


def test_metrics_scraped_with_curl(lab: LabHandle) -> None:
    env = command("host", ["true"])[1]
    before = _scrape()
    assert _get(before, "vmbusify_vm_up", vm="vm1") == 1
    failed = _get(before, "vmbusify_exec_total", **{"class": "failed"}) or 0
    done = subprocess.run([EXEC, "vm1", "--", "sh", "-c", "exit 3"], env=env,
                          capture_output=True, timeout=30, check=False)
    assert done.returncode == 3
    deadline = time.monotonic() + 30
    while True:  # the guest's STATS come every 10 s
        after = _scrape()
        started = _get(after, "vmbusify_guest_stat", vm="vm1", name="exec.started")
        if (started is not None and started >= 1) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert _get(after, "vmbusify_exec_total", **{"class": "failed"}) == failed + 1
    assert started is not None and started >= 1, "no STATS from vm1's guest"
    assert (_get(after, "vmbusify_guest_stats_age_seconds", vm="vm1") or 99) < 30
    assert (_get(after, "vmbusify_vm_received_bytes_total", vm="vm1") or 0) > 0
    assert (_get(after, "vmbusify_vm_rtt_seconds", vm="vm1") or 0) > 0
    assert _get(after, "vmbusify_program_running", program="mux") == 1
    assert _get(after, "vmbusify_worker_up", worker="proxy") == 1
    # A tunnel down shows as 0 (what the example alert fires on), and comes back.
    lab.ctl("disconnect", "vm2")
    try:
        assert _get(_scrape(), "vmbusify_vm_up", vm="vm2") == 0
        assert _get(_scrape(), "vmbusify_vm_state", vm="vm2", state="disconnected") == 1
    finally:
        lab.ctl("connect", "vm2")
    assert _get(_scrape(), "vmbusify_vm_up", vm="vm2") == 1
    assert (_get(_scrape(), "vmbusify_vm_reconnects_total", vm="vm2") or 0) >= 1


def test_a_worker_restart_shows_in_metrics(lab: LabHandle) -> None:
    """SIGKILL the host's proxy: supervisord starts it again, the mux sees it register with
    another pid, and /metrics counts it (and the program's start time moves)."""
    before = _scrape()
    restarts = _get(before, "vmbusify_worker_restarts_total", worker="proxy") or 0
    started = _get(before, "vmbusify_program_start_time_seconds", program="proxy")
    pid = lab.program_pid("host", "proxy")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        after = _scrape()
        if (_get(after, "vmbusify_worker_restarts_total", worker="proxy") or 0) > restarts:
            break
        assert time.monotonic() < deadline, "the proxy's restart never showed"
        time.sleep(0.5)
    assert _get(after, "vmbusify_worker_up", worker="proxy") == 1
    moved = _get(after, "vmbusify_program_start_time_seconds", program="proxy")
    assert started is not None and moved is not None and moved > started
