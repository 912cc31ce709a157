"""The guest side of the mux: listen, and hold exactly one tunnel to the host at a time."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from vmbusify.bus.frames import HOST_VMID
from vmbusify.errors import ProtocolError, VMBusifyError
from vmbusify.logs import RateLimitedLog, printable
from vmbusify.mux.admission import admission
from vmbusify.mux.app import MuxApp
from vmbusify.mux.keys import load_key
from vmbusify.mux.peer import Peer, PeerState
from vmbusify.mux.tunnel import Tunnel
from vmbusify.protocol import auth
from vmbusify.protocol.package import PROTOCOL_VERSION
from vmbusify.protocol.tunnel import (
    STATS_INTERVAL,
    Auth,
    Bye,
    Feature,
    Hello,
    Stats,
    flatten_stats,
)
from vmbusify.system import interface_addresses
from vmbusify.transport import TransportKind, listen, parse_address
from vmbusify.transport.vsock import guest_transport

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
        #: The loop keeps only a weak reference to a task: this one is held here.
        self._ip_watch: asyncio.Task[None] | None = None
        self._stats_task: asyncio.Task[None] | None = None
        tunnel = self.config.tunnel
        #: The key shared with the host (None: no key); a bad key file stops the mux here.
        self.key = load_key(tunnel.key_file) if tunnel.key_file else None
        self.admission = admission(tunnel, guest_transport())
        #: Refusals a would-be host can cause as often as it likes: a few lines a minute.
        self._refusals = RateLimitedLog(log, self.config.limits.log_lines_per_minute)

    def local_ips(self) -> list[str]:
        return list(self._ips)

    def can_wait(self, peer: Peer) -> bool:
        return False

    def connect_on_demand(self, peer: Peer) -> None:  # pragma: no cover - never waits
        pass

    async def start(self) -> None:
        self._server = await listen(self.config.tunnel.listen, self._on_connection)
        rule = self.admission
        listen_at = self.config.tunnel.listen
        if parse_address(listen_at).kind is TransportKind.VPORT:
            # A character device has no peer address: only QEMU's side of the chardev can
            # write to it, so the guard is who may open that socket on the host (root only,
            # docs/deploy.md "virtio-serial"), and the shared key where there is one.
            log.info("listening for the host on virtio-serial port %s (no caller to check: "
                     "require_privileged_port does not apply; sessions start at a host HELLO "
                     "with a fresh nonce; shared key: %s)", listen_at,
                     "yes" if self.key else "no")
            if self.key is None:
                log.warning("no tunnel.key_file: whoever can open the VM's chardev socket on "
                            "the host can run commands in this guest; keep that socket "
                            "root-only or set a key (docs/deploy.md)")
        else:
            log.info("listening for the host at %s (host CID only: %s, privileged port only: "
                     "%s: %s; shared key: %s)", listen_at,
                     "yes" if rule.host_cid_only else "no",
                     "yes" if rule.privileged_port else "no", rule.why,
                     "yes" if self.key else "no")
            if self.key is None and not rule.privileged_port:
                log.warning("no tunnel.key_file and no privileged-port rule: whoever can "
                            "reach %s can run commands in this guest (docs/deploy.md)",
                            listen_at)
        self._ip_watch = asyncio.ensure_future(self._watch_ips())
        self._stats_task = asyncio.ensure_future(self._send_stats())

    def own_stats(self) -> dict[str, float]:
        """This guest's counters for its STATS: the mux's (bytes, drops, connects, ...) and
        each worker's, flattened (``mux.bytes_in``, ``proxy.open``, ...)."""
        st = self.app.status()
        tree: dict[str, Any] = {"mux": {k: v for k, v in self.peer.status().items()
                                        if k not in ("guest_stats", "guest_stats_at")}}
        for w in st["workers"]:
            tree.setdefault(str(w["name"]), w.get("stats") or {})
        return flatten_stats(tree)

    async def _send_stats(self) -> None:
        """Every STATS_INTERVAL (and soon after each connect) send our counters to a host
        whose HELLO lists ``stats``; a host that does not (0.1.0) gets none."""
        sent_to: Tunnel | None = None
        last = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            tunnel = self.peer.tunnel
            hello = tunnel.peer_hello if tunnel is not None else None
            if tunnel is None or hello is None or not hello.has(Feature.STATS):
                continue
            if tunnel is sent_to and loop.time() - last < STATS_INTERVAL:
                continue
            tunnel.send_package(Stats(self.own_stats()).package())
            sent_to, last = tunnel, loop.time()

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

    def _handshake_hello(self) -> Hello:
        """Our HELLO for a new connection: a fresh nonce, and what we can do."""
        return dataclasses.replace(self.app.local_hello(), nonce=auth.new_nonce(),
                                   features=auth.features(self.key is not None))

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        cfg = self.config.tunnel
        peername = writer.get_extra_info("peername")
        refusal = self.admission.refusal(peername)
        if refusal is not None:
            self._refusals.warning("port", "refused a host connection from %s: %s",
                                   printable(peername), refusal)
            writer.write(Bye(refusal).package().encode())  # nothing secret: the rule only
            writer.close()  # a few bytes: the socket takes them, even if nobody reads
            return
        tunnel = Tunnel(reader, writer, cfg, "host",
                        lambda t, pkg: self.app.from_tunnel(self.peer, t, pkg), lead=False)
        # The host speaks first. Its HELLO (and, with a key, its proof) is awaited outside
        # the lock, so a connection that sends nothing (or half a package, or a wrong proof)
        # cannot hold up the real host for connect_timeout.
        try:
            host_hello = await tunnel.receive_hello(cfg.connect_timeout)
        except (VMBusifyError, OSError) as exc:
            log.warning("host connection dropped during handshake: %s", exc)
            hello = tunnel.peer_hello
            if isinstance(exc, ProtocolError) and hello is not None:  # a version we do not speak
                await tunnel.refuse(f"protocol version {hello.protocol_version} is not "
                                    f"supported (this guest speaks {PROTOCOL_VERSION})")
            else:
                await tunnel.abort()
            return
        ours = self._handshake_hello()
        reason = auth.guest_refusal(self.key is not None, host_hello, ours.nonce)
        if reason is not None:
            self._refusals.warning("auth", "refused a host connection (%s): %s",
                                   printable(host_hello.hostname), reason)
            await tunnel.refuse(reason)
            return
        if self.key is not None and not await self._check_host(tunnel, host_hello, ours):
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
            if self.key is not None:  # our HELLO went out already; now our proof
                tunnel.send_package(Auth(auth.proof(self.key, auth.Side.GUEST,
                                                    host_hello.nonce, ours.nonce)).package())
            else:
                tunnel.answer(ours)
            self.app.attach(self.peer, tunnel)
        try:
            await tunnel.run()
        finally:
            self.app.detach(self.peer, tunnel, tunnel.close_reason or "closed")
            self.peer.set_state(PeerState.DISCONNECTED, tunnel.close_reason)

    async def _check_host(self, tunnel: Tunnel, host_hello: Hello, ours: Hello) -> bool:
        """With a key: answer the HELLO, then wait for the host's proof and check it. False
        (the connection refused with a BYE saying why, and logged) if it does not hold."""
        assert self.key is not None
        tunnel.answer(ours)
        try:
            got = await tunnel.receive_auth(self.config.tunnel.connect_timeout)
        except (VMBusifyError, OSError) as exc:
            self._refusals.warning("auth", "host connection dropped before its key proof: %s",
                                   exc)
            await tunnel.abort()
            return False
        if auth.verify(self.key, auth.Side.HOST, host_hello.nonce, ours.nonce, got.proof):
            log.info("the host proved the shared key")
            return True
        self._refusals.warning("auth", "refused a host connection (%s): %s",
                               printable(host_hello.hostname), auth.WRONG_HOST_PROOF)
        await tunnel.refuse(auth.WRONG_HOST_PROOF)
        return False
