"""UDP ASSOCIATE on the proxy server: refused destinations, checked on the policy code only
(every destination here is refused before any socket is opened: no packet is sent)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from vmbusify.config import ProxyConfig, Role
from vmbusify.workers.proxy.server import ProxyServer
from vmbusify.workers.proxy.stats import ConnStats
from vmbusify.workers.proxy.udp import UdpRelay


def test_refused_datagrams_are_logged_once_per_destination(
        caplog: pytest.LogCaptureFixture) -> None:
    """A VM retrying a forbidden address (a resolver, a metrics agent) must not write one
    warning per datagram into the host's log."""
    server = ProxyServer(None, ProxyConfig(allow=["198.18.0.0/15"]), Role.HOST,  # type: ignore[arg-type]
                         ConnStats())
    relay = UdpRelay(server, None, "vm=vm1 stream=7")  # type: ignore[arg-type]

    async def flood() -> None:
        for _ in range(200):
            await relay._send("127.0.0.1", 53, b"query")
            await relay._send("169.254.169.254", 80, b"x")
            await relay._send("192.0.2.1", 53, b"query")  # matches no allow rule

    caplog.set_level(logging.DEBUG, logger="vmbusify.proxy")
    asyncio.run(flood())
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 3, [r.getMessage() for r in warnings]
    assert any("built-in denial 127.0.0.0/8" in r.getMessage() for r in warnings)
    assert relay.refused_datagrams == 600
    assert not relay._transports and not relay._peers  # nothing was ever sent
