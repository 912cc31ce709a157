"""bench/subnet.py's slirp4netns anchor: a bare namespace that reaches the host's loopback and
nothing else, and that is gone (namespace, slirp4netns, iperf3 server) on every exit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from bench.subnet import SLIRP_GATEWAY, iperf, slirp_anchor
from vmbusify.lab import netns as ip

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(shutil.which("slirp4netns") is None
                                 or shutil.which("iperf3") is None,
                                 reason="slirp4netns or iperf3 not installed (bin/setup)")]

NAME = f"vbt-slirp{os.getpid() % 10000}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_iperf3_reaches_the_host_loopback_and_nothing_else_then_all_is_gone() -> None:
    with slirp_anchor(NAME) as (netns, port, pids):
        assert len(pids) == 2 and all(_alive(p) for p in pids)  # slirp4netns, iperf3 -s
        routes = ip.run(["ip", "-n", netns, "-j", "route"]).stdout
        assert [r["dst"] for r in json.loads(routes)] == ["10.0.2.0/24"]  # no way out
        assert iperf(netns, SLIRP_GATEWAY, 1, False, port) > 0
        assert iperf(netns, SLIRP_GATEWAY, 1, True, port) > 0
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                                   text=True, check=True).stdout
        assert "127.0.0.1" in listening
    assert not ip.netns_exists(netns)
    assert not any(_alive(p) for p in pids)
    assert subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                          check=True).stdout.strip() == ""


def test_an_error_inside_still_removes_everything() -> None:
    made: list[int] = []

    def fail() -> None:
        with slirp_anchor(NAME) as anchor:
            made.extend(anchor.pids)
            raise RuntimeError("the benchmark failed")

    with pytest.raises(RuntimeError):
        fail()
    assert len(made) == 2
    assert not ip.netns_exists(NAME)
    assert not any(_alive(p) for p in made)
