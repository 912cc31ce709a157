"""Entry point of `vmbusify worker proxy`: the proxy client and server of this endpoint.

Both ends run both halves: the client listens on ``[proxy] listen`` (127.0.0.1:6542) for
local users, the server answers the peer's PROXY-OPEN. Counters go to `vmbusifyctl status`.
"""

from __future__ import annotations

import asyncio
import logging
import resource

from vmbusify.bus.link import WorkerLink
from vmbusify.config import Config
from vmbusify.errors import ConfigError, VMBusifyError
from vmbusify.protocol.entities import Entity
from vmbusify.runtime import stop_on_signals
from vmbusify.workers.proxy.client import ProxyClient
from vmbusify.workers.proxy.server import ProxyServer
from vmbusify.workers.proxy.stats import ConnStats

log = logging.getLogger("vmbusify.proxy")

#: Seconds between reports of the counters to the mux.
REPORT_INTERVAL = 2.0


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one (each connection costs a descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 1 << 20:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def _report_loop(link: WorkerLink, stats: ConnStats) -> None:
    last = None
    while True:
        snap = stats.snapshot()
        if snap != last:
            try:
                await link.report(snap)
                last = snap
            except VMBusifyError as exc:
                log.debug("report failed: %s", exc)
        await asyncio.sleep(REPORT_INTERVAL)


async def run(config: Config, stop: asyncio.Event | None = None) -> None:
    """Run the proxy worker until SIGTERM (or ``stop``)."""
    stop = stop_on_signals(stop)
    raise_fd_limit()
    stats = ConnStats()
    link = WorkerLink(config, "proxy", [Entity.PROXY_CLIENT, Entity.PROXY_SERVER])
    server = ProxyServer(link, config.proxy, config.role, stats, config)
    client = ProxyClient(link, config.proxy, config.role, stats)
    server.install()
    client.install()
    try:
        client.listen()
    except OSError as exc:
        raise ConfigError(f"proxy: cannot listen on {config.proxy.listen}: "
                          f"{exc.strerror or exc}") from None
    await link.start()
    log.info("%s proxy: SOCKS5/SOCKS4/HTTP on %s; egress allow %s deny %s%s",
             config.role.value, config.proxy.listen, ", ".join(config.proxy.allow) or "-",
             ", ".join(config.proxy.deny) or "-",
             " (+ built-in denials)" if config.proxy.default_deny else "")
    tasks = [asyncio.ensure_future(client.serve_forever()),
             asyncio.ensure_future(_report_loop(link, stats))]
    try:
        await stop.wait()
        log.info("stopping (%d connections open)", stats.open)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
        await server.close()
        await link.close()
