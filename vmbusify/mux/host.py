"""The host side of the mux: connect to VMs on demand or keep them all connected."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from vmbusify.errors import NotConnectedError, TunnelError, VMBusifyError
from vmbusify.logs import RateLimitedLog
from vmbusify.mux.app import MuxApp
from vmbusify.mux.keys import load_key
from vmbusify.mux.peer import Peer, PeerState
from vmbusify.mux.tunnel import Tunnel
from vmbusify.protocol import auth
from vmbusify.protocol.tunnel import Auth, Hello
from vmbusify.transport import connect

log = logging.getLogger("vmbusify.mux.host")

#: A tunnel that lived this long resets the reconnect backoff.
STABLE_AFTER = 10.0


class HostSide:
    """Owns one Peer (and at most one runner task) per configured VM."""

    def __init__(self, app: MuxApp) -> None:
        self.app = app
        self.config = app.config
        #: Guests refused for their key: a few lines a minute per VM (it reconnects).
        self._refusals = RateLimitedLog(log, self.config.limits.log_lines_per_minute)
        for vm in self.config.vms:
            app.peers[vm.vmid] = Peer(vm.vmid, vm.address)
            if vm.key_file:
                try:  # read again at every connect; a bad file now is said at once
                    load_key(vm.key_file)
                except VMBusifyError as exc:
                    log.error("vm=%s: %s: this VM will not be connected until it is fixed",
                              vm.vmid, exc)

    def local_ips(self) -> list[str]:
        return []

    async def start(self) -> None:
        if self.config.host.keep_connected:
            for peer in self.app.peers.values():
                self._start_runner(peer, persistent=True)

    def can_wait(self, peer: Peer) -> bool:
        """Whether a package for a VM that is not connected may wait for a connect."""
        return not peer.manual_down

    def connect_on_demand(self, peer: Peer) -> None:
        if peer.runner is None or peer.runner.done():
            self._start_runner(peer, persistent=self.config.host.keep_connected)

    async def connect(self, peer: Peer, timeout: float) -> None:
        """Bring a VM's tunnel up now (vmbusifyctl connect); raises if it does not come up."""
        peer.manual_down = False
        if peer.state is PeerState.CONNECTED:
            return
        self.connect_on_demand(peer)
        deadline = asyncio.get_running_loop().time() + timeout
        while peer.state is not PeerState.CONNECTED:
            remaining = deadline - asyncio.get_running_loop().time()
            changed = peer.state_changed
            if remaining <= 0:
                raise NotConnectedError(f"{peer.vmid}: not connected after {timeout:g}s"
                                        + (f": {peer.last_error}" if peer.last_error else ""))
            if peer.runner is None or peer.runner.done():
                raise NotConnectedError(f"{peer.vmid}: {peer.last_error or 'connect failed'}")
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                pass

    async def disconnect(self, peer: Peer) -> None:
        """Drop a VM's tunnel and keep it down until it is asked for again."""
        peer.manual_down = True
        runner = peer.runner
        if runner is not None and not runner.done():
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        peer.set_state(PeerState.DISCONNECTED, "disconnected by the operator")

    def _start_runner(self, peer: Peer, persistent: bool) -> None:
        peer.runner = asyncio.ensure_future(self._run(peer, persistent))

    async def _run(self, peer: Peer, persistent: bool) -> None:
        backoff = self.config.tunnel.backoff_initial
        loop = asyncio.get_running_loop()
        while not peer.manual_down:
            peer.set_state(PeerState.CONNECTING)
            started = loop.time()
            try:
                tunnel = await self._open(peer)
            except (VMBusifyError, OSError) as exc:
                reason = str(exc)
                log.info("vm=%s connect to %s failed: %s", peer.vmid, peer.address, reason)
                if not persistent:
                    peer.set_state(PeerState.DISCONNECTED, reason)
                    self.app.fail_waiting(peer, reason)
                    return
                peer.set_state(PeerState.BACKOFF, reason)
                self.app.fail_waiting(peer, reason)
            else:
                self.app.attach(peer, tunnel)
                try:
                    reason = await tunnel.run()
                finally:
                    self.app.detach(peer, tunnel, tunnel.close_reason or "closed")
                if not persistent:
                    return
                if loop.time() - started > STABLE_AFTER:
                    backoff = self.config.tunnel.backoff_initial
                peer.set_state(PeerState.BACKOFF, reason)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.tunnel.backoff_max)

    def _key(self, peer: Peer) -> bytes | None:
        """The key shared with this VM (None: none configured); read at every connect, so
        a changed file counts from the next one. A bad file raises ConfigError."""
        vm = self.config.vm(peer.vmid)
        return load_key(vm.key_file) if vm is not None and vm.key_file else None

    async def _open(self, peer: Peer) -> Tunnel:
        cfg = self.config.tunnel
        key = self._key(peer)  # before connecting: a bad key file never reaches the VM
        reader, writer = await connect(peer.address, cfg.connect_timeout)
        tunnel = Tunnel(reader, writer, cfg, f"vm={peer.vmid}",
                        lambda t, pkg: self.app.from_tunnel(peer, t, pkg))
        hello = dataclasses.replace(self.app.local_hello(), nonce=auth.new_nonce(),
                                    features=auth.features(key is not None))
        try:
            guest = await tunnel.handshake(hello, cfg.connect_timeout)
            if not guest.features:
                log.info("%s: the guest lists no features (a release older than this "
                         "host's): no shared-key check is possible with it", tunnel.label)
            if key is not None:
                await self._authenticate(tunnel, key, hello.nonce, guest)
        except (TunnelError, VMBusifyError, OSError):
            await tunnel.abort()
            raise
        return tunnel

    async def _authenticate(self, tunnel: Tunnel, key: bytes, nonce: bytes,
                            guest: Hello) -> None:
        """Prove the key, then check the guest's proof; a guest that cannot answer, or
        answers wrong, is refused with a BYE and the reason raised as TunnelError."""
        reason = auth.host_refusal(True, guest, nonce)
        if reason is None:
            tunnel.send_package(Auth(auth.proof(key, auth.Side.HOST, nonce,
                                                guest.nonce)).package())
            got = await tunnel.receive_auth(self.config.tunnel.connect_timeout)
            if auth.verify(key, auth.Side.GUEST, nonce, guest.nonce, got.proof):
                log.info("%s: the guest proved the shared key", tunnel.label)
                return
            reason = auth.WRONG_GUEST_PROOF
        self._refusals.warning((tunnel.label, "auth"), "%s: refused the guest: %s",
                               tunnel.label, reason)
        await tunnel.refuse(reason)
        raise TunnelError(f"{tunnel.label}: refused the guest: {reason}")
