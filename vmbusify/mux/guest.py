"""The guest side of the mux: listen, and hold exactly one tunnel to the host at a time."""

from __future__ import annotations

import asyncio
import logging

from vmbusify.bus.frames import HOST_VMID
from vmbusify.errors import ProtocolError, VMBusifyError
from vmbusify.mux.app import MuxApp
from vmbusify.mux.peer import Peer, PeerState
from vmbusify.mux.tunnel import Tunnel
from vmbusify.protocol.package import PROTOCOL_VERSION
from vmbusify.system import interface_addresses
from vmbusify.transport import listen

log = logging.getLogger("vmbusify.mux.guest")

#: How often the guest looks for changed addresses to report in a new HELLO.
IP_POLL_INTERVAL = 2.0
#: How long the live tunnel has to answer a ping before a new connection replaces it.
LIVENESS_PROBE = 3.0


def guest_ips() -> list[str]:
    """Addresses worth reporting: everything but loopback and link-local."""
    return sorted(str(ip) for ip in interface_addresses()
                  if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified))


class GuestSide:
    """Accepts host connections; a second live one is refused, a dead one is replaced."""

    def __init__(self, app: MuxApp) -> None:
        self.app = app
        self.config = app.config
        self.peer = app.peers[HOST_VMID] = Peer(HOST_VMID, self.config.tunnel.listen)
        self._lock = asyncio.Lock()
        self._ips = guest_ips()
        self._server: asyncio.AbstractServer | None = None

    def local_ips(self) -> list[str]:
        return list(self._ips)

    def can_wait(self, peer: Peer) -> bool:
        return False

    def connect_on_demand(self, peer: Peer) -> None:  # pragma: no cover - never waits
        pass

    async def start(self) -> None:
        self._server = await listen(self.config.tunnel.listen, self._on_connection)
        log.info("listening for the host at %s", self.config.tunnel.listen)
        asyncio.ensure_future(self._watch_ips())

    async def _watch_ips(self) -> None:
        while True:
            await asyncio.sleep(IP_POLL_INTERVAL)
            ips = guest_ips()
            if ips != self._ips:
                log.info("addresses changed: %s", ", ".join(ips) or "none")
                self._ips = ips
                tunnel = self.peer.tunnel
                if tunnel is not None:
                    tunnel.send_package(self.app.local_hello().package())

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        cfg = self.config.tunnel
        tunnel = Tunnel(reader, writer, cfg, "host",
                        lambda t, pkg: self.app.from_tunnel(self.peer, t, pkg))
        # The host speaks first. Its HELLO is awaited outside the lock, so a connection that
        # sends nothing (or half a package) cannot hold up the real host for connect_timeout.
        try:
            await tunnel.receive_hello(cfg.connect_timeout)
        except (VMBusifyError, OSError) as exc:
            log.warning("host connection dropped during handshake: %s", exc)
            hello = tunnel.peer_hello
            if isinstance(exc, ProtocolError) and hello is not None:  # a version we do not speak
                await tunnel.refuse(f"protocol version {hello.protocol_version} is not "
                                    f"supported (this guest speaks {PROTOCOL_VERSION})")
            else:
                await tunnel.abort()
            return
        async with self._lock:
            current = self.peer.tunnel
            if current is not None:
                try:
                    await current.ping(LIVENESS_PROBE)
                except VMBusifyError:
                    log.warning("the live tunnel did not answer a ping: replacing it")
                    current.close("replaced by a new host connection")
                    await current.closed.wait()
                else:
                    log.warning("refused a second host connection: the current one is live")
                    await tunnel.refuse("another host connection is live")
                    return
            if tunnel.closed.is_set():
                log.warning("host connection dropped during handshake: %s",
                            tunnel.close_reason or "closed")
                await tunnel.abort()
                return
            tunnel.answer(self.app.local_hello())
            self.app.attach(self.peer, tunnel)
        try:
            await tunnel.run()
        finally:
            self.app.detach(self.peer, tunnel, tunnel.close_reason or "closed")
            self.peer.set_state(PeerState.DISCONNECTED, tunnel.close_reason)

