"""The one worker skeleton: start, tasks, stats, heartbeat and clean stop.

Every worker (exec, proxy and subnet, on both ends, and the host half of exec inside the
command listener) is a ``Worker`` subclass that fills in what is its own::

    class ProxyWorker(Worker):
        name = "proxy"
        entities = (Entity.PROXY_CLIENT, Entity.PROXY_SERVER)

        def install(self) -> None: ...           # routes and event handlers
        async def open(self) -> None: ...        # sockets, TUN: before the link starts
        async def ready(self) -> None: ...       # after it started: self.core(loop())
        def stats(self) -> dict[str, Any]: ...   # what `vmbusifyctl status` shows
        async def close(self) -> None: ...       # undo open(); abort what still runs

and the base does the rest, in this order: ``install``, ``open``, the link's start (which
registers with the mux and keeps its heartbeat going, see vmbusify.bus.link), ``ready``, the
stats loop; on stop: the core loops, ``close``, the request tasks (given ``stop_grace``
seconds, then cancelled), the link.

Two kinds of task, and only two:

- **request tasks** (``spawn``): one per request, connection or exec. They are supervised by
  ``WorkerLink.spawn``: a failure is logged, counted under its VM's ``handler_errors`` and
  ends that task alone (a REQUEST handler's own error already became an error ACK for that
  request). One bad request never stops the worker: the hostile-guest rule.
- **core loops** (``core``): the accept loop, the attach loop. Without one the worker is
  useless, so they fail fast: if one raises (or returns), ``run`` stops the worker and
  raises, the program exits non-zero and supervisord starts a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ClassVar, Protocol

from vmbusify.bus.link import WorkerLink
from vmbusify.config import Config
from vmbusify.errors import CoreLoopEnded, VMBusifyError
from vmbusify.protocol.entities import Entity
from vmbusify.runtime import stop_on_signals

log = logging.getLogger("vmbusify.worker")

#: Seconds between looks at a worker's counters (published only when they changed).
REPORT_INTERVAL = 5.0
#: Seconds after which unchanged counters are published again (a restarted mux has none).
REPORT_REFRESH = 60.0


class Spawner(Protocol):
    """``Worker.spawn``, as the parts of a worker (the proxy's client and server) take it."""

    def __call__(self, coro: Awaitable[Any], vmid: str = "", what: str = "request"
                 ) -> asyncio.Task[Any]: ...


class Worker:
    """A worker: its link to the mux, its tasks and counters; subclasses fill in the hooks."""

    #: The program's name: the link registers under it, `vmbusifyctl status` shows it.
    name: ClassVar[str] = ""
    #: The entities this worker is on its end of the tunnel.
    entities: ClassVar[tuple[Entity, ...]] = ()
    #: Seconds between looks at ``stats()``; None: publish nothing (a part sharing a link).
    report_interval: ClassVar[float | None] = REPORT_INTERVAL
    #: Seconds request tasks get to finish on stop, after ``close()``, before being cancelled.
    stop_grace: ClassVar[float] = 0.0

    def __init__(self, config: Config, link: WorkerLink | None = None) -> None:
        """``link``: share another program's link (which that program starts and closes);
        by default the worker makes, starts and closes its own."""
        self.config = config
        self._owns_link = link is None
        self.link = link if link is not None else WorkerLink(config, self.name,
                                                             list(self.entities))
        self._requests: set[asyncio.Task[Any]] = set()
        self._core: dict[asyncio.Task[Any], str] = {}
        self._core_ended: asyncio.Future[None] | None = None
        self._started = False

    # -- what a worker fills in --------------------------------------------------------------
    def install(self) -> None:
        """Declare routes and event handlers on ``self.link`` (before it starts)."""

    async def open(self) -> None:
        """Take what the worker serves from (sockets, devices) before the link starts; an
        error here stops the program with one line (e.g. ConfigError)."""

    async def ready(self) -> None:
        """The link is up: announce, start the core loops (``self.core``)."""

    def stats(self) -> dict[str, Any]:
        """The counters `vmbusifyctl status` shows under this worker's name."""
        return {}

    async def close(self) -> None:
        """Undo ``open`` and end what still runs (each step on its own, whatever failed
        before); request tasks still running afterwards get ``stop_grace`` seconds."""

    # -- tasks -------------------------------------------------------------------------------
    def spawn(self, coro: Awaitable[Any], vmid: str = "", what: str = "request"
              ) -> asyncio.Task[Any]:
        """A request task: supervised (a failure is logged and counted, never fatal) and
        waited for, then cancelled, when the worker stops."""
        task = self.link.spawn(coro, vmid, what)
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)
        return task

    def core(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        """A core loop: it runs until the worker stops; if it raises or returns, the worker
        stops and ``run`` raises CoreLoopEnded."""
        task = asyncio.ensure_future(coro)
        self._core[task] = what
        task.add_done_callback(self._core_done)
        return task

    def _core_done(self, task: asyncio.Task[Any]) -> None:
        what = self._core.pop(task, "core loop")
        if task.cancelled() or self._core_ended is None or self._core_ended.done():
            return
        exc = task.exception()
        if exc is None:
            reason = f"{self.name}: {what} ended"
        else:
            reason = f"{self.name}: {what} failed: {type(exc).__name__}: {exc}"
            log.error("%s", reason, exc_info=exc)
        self._core_ended.set_exception(CoreLoopEnded(reason))

    @property
    def running_requests(self) -> int:
        """Request tasks still running."""
        return len(self._requests)

    # -- life --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Install, open, start the link (if this worker owns it), get ready, report."""
        self._core_ended = asyncio.get_running_loop().create_future()
        self._started = True
        self.install()
        await self.open()
        if self._owns_link:
            await self.link.start()
        await self.ready()
        if self.report_interval is not None:
            self.core(self._report_loop(self.report_interval), "the stats loop")

    async def stop(self) -> None:
        """Stop the core loops, ``close()``, let request tasks finish within ``stop_grace``
        then cancel them, close the link (if owned). Safe to call more than once."""
        if not self._started:
            return
        self._started = False
        core = list(self._core)
        for task in core:
            task.cancel()
        await asyncio.gather(*core, return_exceptions=True)
        try:
            await self.close()
        finally:
            await self._drain()
            if self._owns_link:
                await self.link.close()

    async def _drain(self) -> None:
        tasks = list(self._requests)
        if tasks and self.stop_grace > 0:
            await asyncio.wait(tasks, timeout=self.stop_grace)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def run(self, stop: asyncio.Event) -> None:
        """Start, serve until ``stop`` is set or a core loop ends (then raise), stop."""
        try:
            await self.start()
            assert self._core_ended is not None
            stopping = asyncio.ensure_future(stop.wait())
            waits: list[asyncio.Future[Any]] = [stopping, self._core_ended]
            try:
                await asyncio.wait(waits,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
            if self._core_ended.done():
                self._core_ended.result()  # raises CoreLoopEnded
            log.info("%s: stopping (%d requests running)", self.name, self.running_requests)
        finally:
            await self.stop()

    async def _report_loop(self, interval: float) -> None:
        """Publish ``stats()`` (the link adds the limit counters) when they change."""
        loop = asyncio.get_running_loop()
        last: dict[str, Any] | None = None
        last_at = 0.0
        while True:
            now = self.stats()
            if now != last or loop.time() - last_at >= REPORT_REFRESH:
                try:
                    await self.link.report(now)
                    last, last_at = now, loop.time()
                except VMBusifyError as exc:  # the mux may be restarting: try again later
                    log.debug("%s: report not taken: %s", self.name, exc)
            await asyncio.sleep(interval)


async def run_worker(make: Callable[[Config], Worker | None], config: Config,
                     stop: asyncio.Event | None = None) -> None:
    """The body of `vmbusify worker NAME`: run ``make(config)`` until SIGTERM/SIGINT (or
    ``stop``); a None worker (disabled, or nothing to serve on this end) just waits."""
    stop = stop_on_signals(stop)
    worker = make(config)
    if worker is None:
        await stop.wait()
        return
    await worker.run(stop)
