"""A guest's own counters reach the host over the tunnel (STATS, feature ``stats``;
docs/metrics.md), and never reach a host of the previous release, which would take the
unknown tunnel message for a protocol error (docs/protocol.md, "Versions")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import Pair, link_for, make_pair, wait_state
from tests.integration.test_tunnel_auth import _old_release
from vmbusify.protocol.entities import Entity


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


@pytest.fixture
def started() -> Iterator[list[Pair]]:
    """The pairs a test started, stopped after it."""
    made: list[Pair] = []
    yield made
    for p in made:
        p.stop()


def test_the_guests_counters_arrive_soon_after_it_connects(tmp_path: Path,
                                                           started: list[Pair]) -> None:
    pair = make_pair(tmp_path)
    started.append(pair)

    async def scenario() -> dict[str, Any]:
        host = await link_for(pair.host, "t-host", [Entity.CMD_LISTENER])
        try:
            deadline = time.monotonic() + 15
            while True:
                vm = await wait_state(host, "vm1", "connected")
                if vm["guest_stats"] or time.monotonic() > deadline:
                    return dict(vm)
                await asyncio.sleep(0.2)
        finally:
            await host.close()

    vm = run(scenario())
    stats = vm["guest_stats"]
    assert stats, "no STATS within 15 s"
    assert stats["mux.connects"] == 1 and stats["mux.bytes_in"] > 0
    assert vm["guest_stats_at"] > 0


def test_a_guest_sends_no_stats_to_a_host_of_the_previous_release(
        tmp_path: Path, started: list[Pair]) -> None:
    old = _old_release(tmp_path / "old")
    pair = make_pair(tmp_path, keep_connected=True)
    pair.host.kill()
    pair.host.extra_env = {"PYTHONPATH": str(old)}
    pair.host.start()
    started.append(pair)

    async def scenario() -> dict[str, Any]:
        guest = await link_for(pair.guest, "t-guest", [Entity.CMD_EXECUTOR])
        try:
            await wait_state(guest, "host", "connected")
            await asyncio.sleep(3.5)  # past the first STATS a newer host would get
            return dict(await wait_state(guest, "host", "connected"))
        finally:
            await guest.close()

    host = run(scenario())
    assert host["connects"] == 1, host  # never cut for an unknown message
    assert host["peer_version"] == "0.1.0"
    log = pair.host.log()
    assert "unknown tunnel message" not in log and "Traceback" not in log, log
