"""Entry point of the subnet worker (`vmbusify worker subnet`): host or guest by the config."""

from __future__ import annotations

import asyncio
import logging

from vmbusify.bus.link import WorkerLink
from vmbusify.config import Config, Role
from vmbusify.errors import VMBusifyError
from vmbusify.protocol.entities import Entity
from vmbusify.runtime import stop_on_signals
from vmbusify.workers.subnet.guest import SubnetGuest
from vmbusify.workers.subnet.host import SubnetHost

log = logging.getLogger("vmbusify.subnet")

REPORT_INTERVAL = 5.0


async def _report(link: WorkerLink, side: SubnetHost | SubnetGuest) -> None:
    while True:
        await asyncio.sleep(REPORT_INTERVAL)
        try:
            await link.report(side.stats())
        except VMBusifyError as exc:
            log.debug("report not taken: %s", exc)


async def run(config: Config, stop: asyncio.Event | None = None) -> None:
    """Run the subnet until SIGTERM/SIGINT (or ``stop``), then remove what it set up."""
    stop = stop_on_signals(stop)
    if not config.subnet.enabled:
        log.info("[subnet] enabled = false: idle")
        await stop.wait()
        return
    link = WorkerLink(config, "subnet", [Entity.IP_BEARER])
    side: SubnetHost | SubnetGuest = (
        SubnetHost(config, link) if config.role is Role.HOST else SubnetGuest(config, link))
    reporter: asyncio.Task[None] | None = None
    try:
        await side.start()
        reporter = asyncio.ensure_future(_report(link, side))
        await stop.wait()
        log.info("stopping")
    finally:
        if reporter is not None:
            reporter.cancel()
        await side.stop()
        await link.close()
