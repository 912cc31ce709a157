"""The host side of the mux: connect to VMs on demand or keep them all connected."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from vmbusify.config import Config, VMEntry, load_config
from vmbusify.errors import NotConnectedError, TunnelError, VMBusifyError
from vmbusify.logs import RateLimitedLog
from vmbusify.mux.app import MuxApp
from vmbusify.mux.discovery import Found
from vmbusify.mux.discovery.run import Discovery
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
        #: The VMs the file lists ([[vms]]); config.vms is these and the ones found.
        self.listed = list(self.config.vms)
        self.discovery = Discovery(self.config.host, self.config.limits.log_lines_per_minute)
        self.found: list[Found] = []
        #: One change of the VM set at a time (a reload, a discovery pass).
        self._changing = asyncio.Lock()
        self._discover_task: asyncio.Task[None] | None = None
        for vm in self.config.vms:
            self._add(vm)

    def _add(self, vm: VMEntry, found: Found | None = None) -> Peer:
        peer = self.app.peers[vm.vmid] = Peer(vm.vmid, vm.address)
        if found is not None:
            peer.aliases, peer.source = found.aliases, found.source
        if vm.key_file:
            try:  # read again at every connect; a bad file now is said at once
                load_key(vm.key_file)
            except VMBusifyError as exc:
                log.error("vm=%s: %s: this VM will not be connected until it is fixed",
                          vm.vmid, exc)
        return peer

    def local_ips(self) -> list[str]:
        return []

    async def start(self) -> None:
        if self.config.host.keep_connected:
            for peer in self.app.peers.values():
                self._start_runner(peer, persistent=True)
        self._discover_task = asyncio.ensure_future(self._discover_loop())

    # -- the set of VMs: reload and discovery (docs/discovery.md) ------------------------------
    async def _discover_loop(self) -> None:
        """Look at the discovery sources every ``discover_interval`` (while any is named)."""
        while True:
            host = self.config.host
            if host.discover:
                try:
                    found = await self.discovery.look()
                    async with self._changing:
                        self.found = found
                        await self._apply()
                except Exception:  # never let discovery end: log it and look again
                    log.exception("discovery failed")
            await asyncio.sleep(host.discover_interval)

    async def reload(self, path: str | None = None) -> dict[str, Any]:
        """Read the configuration file again and add or drop VMs to match it; VMs that stay
        at the same address keep their tunnel and every session. Only ``[[vms]]`` and
        ``[host]`` discovery settings take effect; other changes need a restart (the
        answer's ``restart_needed`` names the sections that differ)."""
        new = load_config(path or self.config.path or None)  # ConfigError: nothing changes
        async with self._changing:
            differ = _restart_needed(self.config, new)
            self.listed = list(new.vms)
            self.config.host = new.host
            self.discovery.host = new.host
            self.found = await self.discovery.look() if new.host.discover else []
            result = await self._apply()
        result["restart_needed"] = differ
        log.info("reloaded %s: added %s, dropped %s, kept %d VMs%s", new.path or "(defaults)",
                 result["added"] or "none", result["dropped"] or "none", len(result["kept"]),
                 f"; changed, needing a restart: {', '.join(differ)}" if differ else "")
        return result

    async def _apply(self) -> dict[str, Any]:
        """Make the peers match ``listed`` and ``found`` (a listed vmid or address wins over
        a found one). Call holding ``_changing``."""
        entries: dict[str, VMEntry] = {vm.vmid: vm for vm in self.listed}
        listed_at = {vm.address for vm in self.listed}
        meta: dict[str, Found] = {}
        for f in self.found:
            if f.vmid not in entries and f.address not in listed_at:
                entries[f.vmid] = self.discovery.entry(f)
                meta[f.vmid] = f
        added: list[str] = []
        dropped: list[str] = []
        for vmid, peer in list(self.app.peers.items()):
            vm = entries.get(vmid)
            if vm is None or vm.address != peer.address:
                why = ("gone from the host's configuration" if vm is None
                       else f"its address changed to {vm.address}")
                await self._drop(peer, why)
                dropped.append(vmid)
        self.config.vms = list(entries.values())
        self.app.addresses.set_allowed({vm.vmid: vm.ips for vm in self.config.vms})
        for vmid, vm in entries.items():
            known = self.app.peers.get(vmid)
            if known is None:
                new = self._add(vm, meta.get(vmid))
                added.append(vmid)
                log.info("vm=%s added at %s (%s)", vmid, vm.address, new.source)
                if self.config.host.keep_connected:
                    self._start_runner(new, persistent=True)
            else:  # kept: only what names it may change
                found = meta.get(vmid)
                known.aliases = found.aliases if found else ()
                known.source = found.source if found else "config"
        self.app.aliases = {a: p.vmid for p in self.app.peers.values() for a in p.aliases
                            if a not in self.app.peers}
        kept = [v for v in entries if v not in added]
        return {"added": added, "dropped": [d for d in dropped if d not in added],
                "replaced": [d for d in dropped if d in added], "kept": kept}

    async def _drop(self, peer: Peer, why: str) -> None:
        """Forget a VM: its tunnel ends with a BYE saying why, waiting requests fail."""
        log.info("vm=%s dropped: %s", peer.vmid, why)
        peer.manual_down = True
        if peer.tunnel is not None:
            await peer.tunnel.refuse(why)
        runner = peer.runner
        if runner is not None and not runner.done():
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        self.app.fail_waiting(peer, why)
        peer.set_state(PeerState.DISCONNECTED, why)
        self.app.peers.pop(peer.vmid, None)

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


def _restart_needed(old: Config, new: Config) -> list[str]:
    """The sections of ``new`` that differ from ``old`` and a reload does not apply."""
    fixed = ("role", "run_dir", "state_dir", "log_level", "name", "tunnel", "control", "proxy",
             "subnet", "limits", "metrics")
    return [name for name in fixed if getattr(old, name) != getattr(new, name)]
