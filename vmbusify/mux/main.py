"""Entry point of the tunnel-mux program (`vmbusify mux`)."""

from __future__ import annotations

import asyncio
import logging
import signal

from vmbusify.config import Config, Role
from vmbusify.errors import VMBusifyError
from vmbusify.mux.app import MuxApp
from vmbusify.mux.guest import GuestSide
from vmbusify.mux.host import HostSide
from vmbusify.runtime import stop_on_signals
from vmbusify.system import raise_fd_limit

log = logging.getLogger("vmbusify.mux")

#: Descriptors the mux holds besides one per tunnel (ZeroMQ, its sockets, logs), with room.
SPARE_FDS = 64


def check_fd_limit(vms: int) -> int:
    """Lift the open-files limit as far as it goes; a limit below what ``vms`` tunnels need
    is said at start, not found when the VM past it fails to connect. Returns the limit."""
    limit = raise_fd_limit()
    if limit < vms + SPARE_FDS:
        log.warning("the open-files limit is %d, too low for %d VMs (one descriptor each, "
                    "and %d more): raise LimitNOFILE (systemd) or minfds "
                    "(conf/supervisord.conf)", limit, vms, SPARE_FDS)
    return limit


async def run_mux(config: Config, stop: asyncio.Event | None = None) -> None:
    """Run the mux until ``stop`` is set or SIGTERM/SIGINT arrives."""
    stop = stop_on_signals(stop)
    check_fd_limit(len(config.vms))
    app = MuxApp(config)
    app.side = HostSide(app) if config.role is Role.HOST else GuestSide(app)
    app.bind()
    tasks = [asyncio.ensure_future(app.housekeeping())]
    if config.role is Role.HOST:
        # SIGHUP: read the configuration again, as `vmbusifyctl reload` does (never send it
        # to supervisord, which would restart every program).
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, lambda: tasks.append(asyncio.ensure_future(_reload(app))))
    try:
        await app.side.start()
        log.info("%s mux %s ready (%d VMs configured)", config.role.value, app.name,
                 len(config.vms))
        await stop.wait()
        log.info("stopping")
    finally:
        for t in tasks:
            t.cancel()
        for p in app.peers.values():
            if p.runner is not None:
                p.runner.cancel()
            if p.tunnel is not None:
                await p.tunnel.abort("mux stopping")
        await asyncio.gather(*tasks, return_exceptions=True)
        app.close()


async def _reload(app: MuxApp) -> None:
    """A SIGHUP: reload, and log (never raise) what went wrong."""
    try:
        await app.side.reload()
    except VMBusifyError as exc:
        log.error("reload refused, nothing changed: %s", exc)
    except Exception:  # a reload bug must not end the mux
        log.exception("reload failed")
