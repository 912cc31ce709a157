"""What an idle tunnel costs (issue 18): between two ends of this release one PING (and its
PONG) crosses per ping_interval, the host's, not one from each end; both still learn their
rtt; the guest takes over when the host's PINGs stop; a silent peer is still declared dead
after dead_after."""

from __future__ import annotations

import asyncio
import socket
from typing import cast

import pytest

from vmbusify.config import TunnelConfig
from vmbusify.mux.tunnel import RTT_EVERY, Tunnel
from vmbusify.protocol.package import Package
from vmbusify.protocol.tunnel import Hello, Ping
from vmbusify.runtime import run_async

INTERVAL = 0.05
CONFIG = TunnelConfig(ping_interval=INTERVAL, dead_after=INTERVAL * 8)


class CountingTunnel(Tunnel):
    """A Tunnel that counts the PINGs it sends."""

    pings_sent = 0

    def send_package(self, pkg: Package) -> None:
        if pkg.entity == Ping.ENTITY and pkg.message_id == Ping.MESSAGE_ID:
            self.pings_sent += 1
        super().send_package(pkg)


async def _pair() -> tuple[CountingTunnel, CountingTunnel]:
    a, b = socket.socketpair()
    ends = []
    for s, label in ((a, "host"), (b, "guest")):
        reader, writer = await asyncio.open_connection(sock=s)
        ends.append(CountingTunnel(reader, writer, CONFIG, label, lambda t, p: None,
                                   lead=label == "host"))
    host, guest = ends
    hello = Hello(role="host", hostname="h", software_version="0")
    shake = asyncio.ensure_future(host.handshake(hello, 5))
    await guest.receive_hello(5)
    guest.answer(Hello(role="guest", hostname="g", software_version="0"))
    await shake
    return host, guest


@pytest.mark.timeout(30)
def test_two_idle_ends_send_one_ping_per_interval_between_them_and_both_know_their_rtt(
) -> None:
    async def scenario() -> None:
        host, guest = await _pair()
        runs = [asyncio.ensure_future(t.run()) for t in (host, guest)]
        seconds = INTERVAL * RTT_EVERY * 6
        await asyncio.sleep(seconds)
        intervals = seconds / INTERVAL
        total = host.pings_sent + guest.pings_sent
        # Before: each end pinged every interval (2 per interval). Now the host's, plus the
        # guest's rtt refresh once in RTT_EVERY intervals; timers drift: some slack.
        assert total <= intervals * (1 + 1 / RTT_EVERY) + 3, (host.pings_sent,
                                                               guest.pings_sent)
        assert host.pings_sent >= intervals * 0.6
        assert guest.pings_sent <= intervals / RTT_EVERY + 2
        assert host.rtt_ms is not None and guest.rtt_ms is not None
        assert not host.closed.is_set() and not guest.closed.is_set()
        for t in (host, guest):
            t.close()
        await asyncio.gather(*runs)
    run_async(scenario())


@pytest.mark.timeout(30)
def test_the_guest_pings_when_the_host_stops() -> None:
    async def scenario() -> None:
        host, guest = await _pair()
        run = asyncio.ensure_future(guest.run())
        host._writing = True  # the host end is driven by hand: it answers, never pings
        host._running = True
        await asyncio.sleep(INTERVAL * 6)
        # No PING from the host: the guest pings every interval after the grace.
        assert guest.pings_sent >= 3
        assert not guest.closed.is_set()
        assert guest.rtt_ms is not None
        host.close()
        guest.close()
        await run
    run_async(scenario())


@pytest.mark.timeout(30)
def test_a_silent_peer_is_still_declared_dead_after_dead_after() -> None:
    async def scenario() -> None:
        host, guest = await _pair()
        # the guest end hears nothing, answers nothing
        cast(asyncio.ReadTransport, guest.transport).pause_reading()
        loop = asyncio.get_running_loop()
        started = loop.time()
        reason = await asyncio.wait_for(host.run(), 5)
        took = loop.time() - started
        assert reason.startswith("peer stopped answering")
        assert CONFIG.dead_after * 0.8 <= took <= CONFIG.dead_after + 1
        guest.close()
    run_async(scenario())
