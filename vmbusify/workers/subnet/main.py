"""Entry point of the subnet worker (`vmbusify worker subnet`): host or guest by the config."""

from __future__ import annotations

import asyncio
import logging

from vmbusify.config import Config, Role
from vmbusify.workers.base import Worker, run_worker
from vmbusify.workers.subnet.guest import SubnetGuest
from vmbusify.workers.subnet.host import SubnetHost

log = logging.getLogger("vmbusify.subnet")


def make(config: Config) -> Worker | None:
    """This end's side of the subnet; None (the program idles) when it is disabled."""
    if not config.subnet.enabled:
        log.info("[subnet] enabled = false: idle")
        return None
    return SubnetHost(config) if config.role is Role.HOST else SubnetGuest(config)


async def run(config: Config, stop: asyncio.Event | None = None) -> None:
    """Run the subnet until SIGTERM/SIGINT (or ``stop``), then remove what it set up."""
    await run_worker(make, config, stop)
