"""The host's side of the subnet: one TUN for every VM, leases, NAT, DNS.

Packets the host's kernel routes into the TUN are sent to the VM that holds their destination
address (dropped if that VM is not attached). Packets from a VM are written into the TUN only
if their source is that VM's own address, so no VM can speak for another; the kernel then
delivers, forwards and NATs them under the rules of our nftables table.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any

from vmbusify.bus.frames import RouteKind
from vmbusify.bus.link import Inbound, WorkerLink
from vmbusify.config import Config
from vmbusify.errors import SubnetError, VMBusifyError
from vmbusify.protocol.entities import Entity
from vmbusify.protocol.subnet import (
    Attach,
    HostReady,
    Keepalive,
    KeepaliveReply,
    Lease,
    SubnetMessage,
    packet_addresses,
    packet_destination,
)
from vmbusify.workers.base import Worker
from vmbusify.workers.subnet import nat, routes
from vmbusify.workers.subnet.bearer import Bearer, TunReader
from vmbusify.workers.subnet.dns import DnsForwarder, resolv_conf_servers
from vmbusify.workers.subnet.leases import LeaseTable
from vmbusify.workers.subnet.tun import TunDevice

log = logging.getLogger("vmbusify.subnet")


class SubnetHost(Worker):
    """Everything the host's subnet worker holds."""

    name = "subnet"
    entities = (Entity.IP_BEARER,)

    def __init__(self, config: Config, link: WorkerLink | None = None) -> None:
        super().__init__(config, link)
        self.sub = config.subnet
        try:
            self.network = ipaddress.IPv4Network(self.sub.cidr)
            net6 = ipaddress.IPv6Network(self.sub.cidr6) if self.sub.cidr6 else None
        except ValueError as exc:
            raise SubnetError(f"[subnet] cidr: {exc}") from None
        self.network6 = net6 if net6 is not None and routes.ipv6_available() else None
        self.leases = LeaseTable(Path(config.state_dir) / "subnet-leases.json", self.network,
                                 self.network6)
        self.tun: TunDevice | None = None
        self.reader: TunReader | None = None
        self.dns: DnsForwarder | None = None
        self.forwarding = nat.Forwarding(config.state_dir)
        self.uplink = ""
        self.bearers: dict[str, Bearer] = {}
        #: packed address -> vmid, for every attached VM.
        self.by_address: dict[bytes, str] = {}
        self.counters = {"no_route": 0, "spoofed": 0, "not_ip": 0}

    # -- life --------------------------------------------------------------------------------
    def install(self) -> None:
        """Take ATTACH and KEEPALIVE requests, and the bearers' streams."""
        link = self.link
        link.route(Entity.IP_BEARER, SubnetMessage.ATTACH, self._on_attach, RouteKind.REQUEST)
        link.route(Entity.IP_BEARER, SubnetMessage.KEEPALIVE, self._on_keepalive,
                   RouteKind.REQUEST)
        link.route(Entity.IP_BEARER, SubnetMessage.DATA, None, RouteKind.STREAM)

    async def open(self) -> None:
        """Create the TUN, addresses, NAT and DNS."""
        sub = self.sub
        nat.check_table(sub.table)
        self.tun = TunDevice.open(sub.ifname, sub.offload)
        gw = self.leases.gateway
        gw6 = self.leases.gateway6
        routes.configure_host(
            sub.ifname, sub.mtu, f"{gw}/{self.network.prefixlen}",
            f"{gw6}/{self.network6.prefixlen}" if gw6 is not None and self.network6 else "")
        self.uplink = sub.uplink or routes.default_uplink()
        if self.uplink and not routes.link_exists(self.uplink):
            raise SubnetError(f"[subnet] uplink {self.uplink!r} does not exist")
        v6_out = bool(self.network6 and self.uplink and routes.has_global_ipv6(self.uplink))
        nat.apply(nat.NatPolicy(
            table=sub.table, tun=sub.ifname, cidr=str(self.network), uplink=self.uplink,
            cidr6=str(self.network6) if v6_out else "", allow_vm_to_vm=sub.allow_vm_to_vm))
        self.forwarding.enable("ipv4", sub.ifname)
        if self.uplink:
            self.forwarding.enable("ipv4", self.uplink)
        else:
            log.warning("no uplink (no default route, none configured): VMs reach the host only")
        limits = self.config.limits
        self.dns = DnsForwarder([str(gw)] + ([str(gw6)] if gw6 is not None else []),
                                self._upstreams(), per_client_queries=limits.dns_queries_per_vm,
                                per_client_tcp=limits.dns_tcp_per_vm, spawn=self.spawn)
        await self.dns.start()
        self.reader = TunReader(self.tun, self._route_from_kernel)
        self.reader.start()

    async def ready(self) -> None:
        """Tell the guests we are here."""
        sub = self.sub
        await self._announce()
        log.info("subnet %s%s up on %s (mtu %d), NAT out of %s", self.network,
                 f" + {self.network6}" if self.network6 else "", sub.ifname, sub.mtu,
                 self.uplink or "nothing")

    def _upstreams(self) -> list[str]:
        servers = self.sub.dns_upstream or resolv_conf_servers()
        mine = [self.network] + ([self.network6] if self.network6 else [])
        return [s for s in servers
                if not any(ipaddress.ip_address(s) in n for n in mine)]  # never ask ourselves

    async def _announce(self) -> None:
        """Tell every connected VM we are (back): their guests attach again at once."""
        try:
            vms = await self.link.control({"cmd": "list"})
        except VMBusifyError as exc:
            log.warning("cannot list VMs: %s", exc)
            return
        for vm in vms or []:
            if vm.get("state") == "connected":
                try:
                    await self.link.async_send(vm["vmid"], HostReady())
                except VMBusifyError as exc:
                    log.debug("vm=%s: HOST_READY not sent: %s", vm["vmid"], exc)

    async def close(self) -> None:
        """Undo everything open() did (each step on its own, whatever failed before)."""
        if self.reader is not None:
            self.reader.stop()
        for bearer in list(self.bearers.values()):
            await bearer.close("host subnet worker stopping")
        if self.dns is not None:
            await self.dns.close()
        if self.tun is None:
            return  # start() failed before touching anything (e.g. the TUN is another's)
        self.tun.close()
        try:
            nat.remove(self.sub.table)
        except SubnetError as exc:
            log.error("%s", exc)
        self.forwarding.restore()

    # -- packets -----------------------------------------------------------------------------
    def _route_from_kernel(self, frame: bytes) -> None:
        dst = packet_destination(frame)
        vmid = self.by_address.get(dst) if dst is not None else None
        bearer = self.bearers.get(vmid) if vmid is not None else None
        if bearer is None:
            self.counters["no_route"] += 1
            return
        bearer.outbox.put(frame)

    def _deliver_from(self, vmid: str, allowed: frozenset[bytes]) -> Any:
        tun = self.tun
        counters = self.counters
        assert tun is not None

        def deliver(frame: memoryview) -> None:
            addrs = packet_addresses(frame)
            if addrs is None:
                counters["not_ip"] += 1
            elif addrs[0] not in allowed:
                counters["spoofed"] += 1
            else:
                tun.write_frame(frame)
        return deliver

    # -- requests from guests ----------------------------------------------------------------
    def lease_for(self, vmid: str) -> Lease:
        """The lease of ``vmid`` (the same every time)."""
        index = self.leases.index_for(vmid)
        v6 = self.leases.address6(index)
        gw6 = self.leases.gateway6
        return Lease(
            vmid=vmid, address=str(self.leases.address(index)),
            prefixlen=self.network.prefixlen, gateway=str(self.leases.gateway),
            mtu=self.sub.mtu, metric=self.sub.route_metric,
            dns=[str(self.leases.gateway)] + ([str(gw6)] if gw6 is not None else []),
            address6=str(v6) if v6 is not None else "",
            prefixlen6=self.network6.prefixlen if self.network6 else 0,
            gateway6=str(gw6) if gw6 is not None else "")

    async def _on_attach(self, msg: Inbound) -> dict[str, Any]:
        vmid = msg.vmid
        attach = Attach.from_body(msg.body)
        lease = self.lease_for(vmid)
        old = self.bearers.pop(vmid, None)
        if old is not None:
            await old.close("the guest attached again")
        stream = self.link.streams.accept(vmid, Entity.IP_BEARER, msg.package,
                                          SubnetMessage.DATA)
        allowed = frozenset(self.leases.packed_addresses(vmid))
        bearer = Bearer(stream, self._deliver_from(vmid, allowed), f"vm={vmid}")
        self.bearers[vmid] = bearer
        for packed in allowed:
            self.by_address[packed] = vmid
        bearer.start()
        self.spawn(self._forget_when_closed(vmid, bearer), vmid, "watching the bearer")
        log.info("vm=%s stream=%d attached (guest %s, offload %s): %s%s", vmid, stream.id,
                 attach.name or "?", attach.offload, lease.address,
                 f", {lease.address6}" if lease.address6 else "")
        return lease.to_body()

    async def _forget_when_closed(self, vmid: str, bearer: Bearer) -> None:
        await bearer.closed.wait()
        if self.bearers.get(vmid) is not bearer:
            return  # already replaced by a new ATTACH, which closes this one itself
        await bearer.close(bearer.reason)
        # The guest may have attached again while the close was awaited: forget only this
        # bearer, never its successor.
        if self.bearers.get(vmid) is bearer:
            del self.bearers[vmid]
            log.info("vm=%s detached: %s", vmid, bearer.reason)

    async def _on_keepalive(self, msg: Inbound) -> dict[str, Any]:
        bearer = self.bearers.get(msg.vmid)
        stream = Keepalive.from_body(msg.body).stream
        if bearer is None or bearer.closed.is_set() or bearer.stream.id != stream:
            raise SubnetError(f"{msg.vmid} is not attached with stream {stream}")
        return KeepaliveReply().to_body()

    def stats(self) -> dict[str, Any]:
        """Counters for `vmbusifyctl status`."""
        return {
            "role": "host", "ifname": self.sub.ifname, "subnet": str(self.network),
            "subnet6": str(self.network6) if self.network6 else "", "uplink": self.uplink,
            "table": self.sub.table, "leases": self.leases.items(),
            "attached": {vmid: b.stats() for vmid, b in self.bearers.items()},
            "tun_write_errors": self.tun.write_errors if self.tun else 0,
            "dns_queries": self.dns.queries if self.dns else 0,
            "dns_refused": sum(self.dns.refused.values()) if self.dns else 0, **self.counters,
        }
