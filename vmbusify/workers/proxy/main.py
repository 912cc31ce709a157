"""Entry point of `vmbusify worker proxy`: the proxy client and server of this endpoint.

Both ends run both halves: the client listens on ``[proxy] listen`` (127.0.0.1:6542) for
local users, the server answers the peer's PROXY-OPEN. Counters go to `vmbusifyctl status`.
One Worker (vmbusify.workers.base) holds both: each connection is a request task of it, the
client's accept loop its core loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from vmbusify.config import Config
from vmbusify.errors import ConfigError
from vmbusify.protocol.entities import Entity
from vmbusify.system import raise_fd_limit
from vmbusify.workers.base import Worker, run_worker
from vmbusify.workers.proxy.client import ProxyClient
from vmbusify.workers.proxy.server import ProxyServer
from vmbusify.workers.proxy.stats import ConnStats

log = logging.getLogger("vmbusify.proxy")


class ProxyWorker(Worker):
    """The proxy worker: client and server halves on one link, one set of counters."""

    name = "proxy"
    entities = (Entity.PROXY_CLIENT, Entity.PROXY_SERVER)
    report_interval = 2.0

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.conns = ConnStats()
        self.server = ProxyServer(self.link, config.proxy, config.role, self.conns, config,
                                  spawn=self.spawn)
        self.client = ProxyClient(self.link, config.proxy, config.role, self.conns,
                                  spawn=self.spawn)

    def install(self) -> None:
        self.server.install()
        self.client.install()

    async def open(self) -> None:
        raise_fd_limit()
        try:
            self.client.listen()
        except OSError as exc:
            raise ConfigError(f"proxy: cannot listen on {self.config.proxy.listen}: "
                              f"{exc.strerror or exc}") from None

    async def ready(self) -> None:
        config = self.config
        log.info("%s proxy: SOCKS5/SOCKS4/HTTP on %s; egress allow %s deny %s%s",
                 config.role.value, config.proxy.listen, ", ".join(config.proxy.allow) or "-",
                 ", ".join(config.proxy.deny) or "-",
                 " (+ built-in denials)" if config.proxy.default_deny else "")
        self.core(self.client.serve_forever(), "the accept loop")

    def stats(self) -> dict[str, Any]:
        return self.conns.snapshot()

    async def close(self) -> None:
        log.info("stopping (%d connections open)", self.conns.open)
        self.client.close()


async def run(config: Config, stop: asyncio.Event | None = None) -> None:
    """Run the proxy worker until SIGTERM (or ``stop``)."""
    await run_worker(ProxyWorker, config, stop)
