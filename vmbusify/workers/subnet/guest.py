"""The guest's side of the subnet: attach to the host, configure the TUN, carry packets.

The guest keeps one bearer stream to the host and re-attaches, with nobody acting, whenever it
ends: the tunnel dropped (the link resets its streams), the host's worker restarted (it sends
HOST_READY; a KEEPALIVE answered with an error says the same), or the mux restarted. Each
attach gets the same lease back, so addresses and routes stay as they were.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from vmbusify.bus.frames import RouteKind, TunnelEvent
from vmbusify.bus.link import Inbound, WorkerLink
from vmbusify.config import Config
from vmbusify.errors import ProtocolError, RequestTimeout, TunnelError, VMBusifyError
from vmbusify.protocol.entities import Entity
from vmbusify.protocol.subnet import (
    Attach,
    Keepalive,
    KeepaliveReply,
    Lease,
    SubnetMessage,
)
from vmbusify.workers.base import Worker
from vmbusify.workers.subnet import routes
from vmbusify.workers.subnet.bearer import Bearer, TunReader
from vmbusify.workers.subnet.tun import TunDevice

log = logging.getLogger("vmbusify.subnet")

KEEPALIVE_INTERVAL = 5.0
#: Keepalives that may time out in a row before the guest attaches again.
KEEPALIVE_MISSES = 3
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 5.0


class SubnetGuest(Worker):
    """Everything the guest's subnet worker holds."""

    name = "subnet"
    entities = (Entity.IP_BEARER,)

    def __init__(self, config: Config, link: WorkerLink | None = None) -> None:
        super().__init__(config, link)
        self.sub = config.subnet
        self.tun: TunDevice | None = None
        self.reader: TunReader | None = None
        self.bearer: Bearer | None = None
        self.lease: Lease | None = None
        self.resolv = routes.ResolvConf(config.state_dir)
        self.attaches = 0
        self.dropped_detached = 0
        self._wake = asyncio.Event()

    def install(self) -> None:
        """Hear the host's HOST_READY and tunnel events; carry the bearer's stream."""
        link = self.link
        link.route(Entity.IP_BEARER, SubnetMessage.HOST_READY, self._on_host_ready,
                   RouteKind.MESSAGE)
        link.route(Entity.IP_BEARER, SubnetMessage.DATA, None, RouteKind.STREAM)
        link.on_event(self._on_event)

    async def open(self) -> None:
        """Create the TUN."""
        self.tun = TunDevice.open(self.sub.ifname, self.sub.offload)
        self.reader = TunReader(self.tun, self._route_from_kernel)
        self.reader.start()

    async def ready(self) -> None:
        """Start attaching (it goes on forever: the worker's core loop)."""
        self.core(self._attach_forever(), "the attach loop")

    async def close(self) -> None:
        """Detach and undo: the TUN (with its addresses and routes) and resolv.conf."""
        if self.bearer is not None:
            await self.bearer.close("guest subnet worker stopping")
        if self.reader is not None:
            self.reader.stop()
        if self.tun is not None:
            self.tun.close()
        if self.sub.manage_resolv_conf:
            self.resolv.restore()

    # -- packets -----------------------------------------------------------------------------
    def _route_from_kernel(self, frame: bytes) -> None:
        bearer = self.bearer
        if bearer is None or bearer.closed.is_set():
            self.dropped_detached += 1
            return
        bearer.outbox.put(frame)

    # -- attaching ---------------------------------------------------------------------------
    async def _on_host_ready(self, msg: Inbound) -> None:
        log.info("the host's subnet worker (re)started; attaching again")
        if self.bearer is not None:
            self.bearer.closed.set()
        self._wake.set()

    async def _on_event(self, event: TunnelEvent, vmid: str, info: dict[str, Any]) -> None:
        if event is TunnelEvent.UP:
            self._wake.set()

    async def _attach_forever(self) -> None:
        delay = BACKOFF_INITIAL
        while True:
            self._wake.clear()
            try:
                bearer = await self._attach_unless_woken()
            except (TunnelError, ProtocolError) as exc:
                log.info("attach failed: %s; again in %.1fs", exc, delay)
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay = BACKOFF_INITIAL
            if bearer is None:
                log.info("attaching again at once: the host's worker or the tunnel came back "
                         "while an attach was in flight")
                continue
            self.bearer = bearer
            keepalive = self.spawn(self._keepalive(bearer), what="keepalives")
            await bearer.closed.wait()
            keepalive.cancel()
            await bearer.close(bearer.reason or "re-attaching")
            self.bearer = None

    async def _attach_unless_woken(self) -> Bearer | None:
        """``_attach``, abandoned (None) if HOST_READY or a tunnel UP comes meanwhile.

        An ATTACH sent while the host's worker was stopping went to the dying process and
        would only end with its 10 s timeout; the new worker's HOST_READY says to send again.
        (If the abandoned ATTACH did reach a live worker, the next one replaces its stream.)
        """
        attach = asyncio.ensure_future(self._attach())
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({attach, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (attach, woken):
                if not task.done():
                    task.cancel()
            await asyncio.gather(attach, woken, return_exceptions=True)
        if attach.cancelled():
            return None
        return attach.result()

    async def _attach(self) -> Bearer:
        assert self.tun is not None
        stream = await self.link.open_stream(None, Entity.IP_BEARER, Entity.IP_BEARER,
                                             SubnetMessage.DATA)
        try:
            lease = await self.link.sync_send(
                None, Attach(self.config.name or socket.gethostname(), self.sub.offload), Lease,
                stream=stream.id, timeout=10.0)
        except (VMBusifyError, asyncio.CancelledError):
            self.link.streams.forget(stream)
            raise
        routes.configure_guest(self.sub.ifname, lease)
        if self.sub.manage_resolv_conf:
            self.resolv.apply(lease.dns)
        if self.lease != lease:
            log.info("lease: %s/%d%s via %s, mtu %d", lease.address, lease.prefixlen,
                     f", {lease.address6}/{lease.prefixlen6}" if lease.address6 else "",
                     lease.gateway, lease.mtu)
        self.lease = lease
        self.attaches += 1
        bearer = Bearer(stream, self.tun.write_frame, "host")
        bearer.start()
        log.info("attached to the host (stream=%d, attach #%d)", stream.id, self.attaches)
        return bearer

    async def _keepalive(self, bearer: Bearer) -> None:
        misses = 0
        while not bearer.closed.is_set():
            await asyncio.sleep(KEEPALIVE_INTERVAL)
            try:
                await self.link.sync_send(None, Keepalive(bearer.stream.id), KeepaliveReply,
                                          timeout=KEEPALIVE_INTERVAL)
                misses = 0
            except RequestTimeout:
                misses += 1
                if misses < KEEPALIVE_MISSES:
                    continue
                bearer.reason = f"{misses} keepalives unanswered"
                bearer.closed.set()
            except VMBusifyError as exc:
                bearer.reason = f"the host forgot us ({exc})"
                bearer.closed.set()

    def stats(self) -> dict[str, Any]:
        """Counters for `vmbusifyctl status`."""
        return {
            "role": "guest", "ifname": self.sub.ifname,
            "lease": self.lease.to_body() if self.lease else None,
            "attached": self.bearer is not None and not self.bearer.closed.is_set(),
            "attaches": self.attaches, "dropped_detached": self.dropped_detached,
            "bearer": self.bearer.stats() if self.bearer else None,
            "tun_write_errors": self.tun.write_errors if self.tun else 0,
        }
