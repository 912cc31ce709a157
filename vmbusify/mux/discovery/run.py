"""One look at every source ``[host] discover`` names (docs/discovery.md)."""

from __future__ import annotations

import asyncio
import logging
import os

from vmbusify.config import HostConfig, VMEntry
from vmbusify.errors import ConfigError
from vmbusify.logs import RateLimitedLog
from vmbusify.mux.discovery import Found
from vmbusify.mux.discovery.libvirt import find_domains
from vmbusify.mux.discovery.sockets import find_sockets

log = logging.getLogger("vmbusify.mux.discovery")


class Discovery:
    """Asks each source in turn; a source that cannot answer now (libvirtd restarting)
    keeps its last answer, so its VMs and their sessions stay."""

    def __init__(self, host: HostConfig, log_lines_per_minute: int = 10) -> None:
        self.host = host
        self._last: dict[str, list[Found]] = {}
        self._log = RateLimitedLog(log, log_lines_per_minute)

    async def _source(self, source: str) -> list[Found]:
        h = self.host
        if source == "libvirt":
            return await find_domains(h.libvirt_uri, h.libvirt_channel)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, find_sockets, list(h.socket_globs),
                                          h.socket_vmid, source)

    async def look(self) -> list[Found]:
        """Every VM found now, each vmid once (the first source listed wins)."""
        found: dict[str, Found] = {}
        for source in self.host.discover:
            try:
                got = await self._source(source)
            except (ConfigError, OSError) as exc:
                self._log.warning(source, "discovery %s: %s (keeping its %d VMs)", source,
                                  exc, len(self._last.get(source, [])))
                got = self._last.get(source, [])
            else:
                self._last[source] = got
            for vm in got:
                found.setdefault(vm.vmid, vm)
        return list(found.values())

    def entry(self, vm: Found) -> VMEntry:
        """The configuration entry of a found VM (its key from discover_key_dir, if any)."""
        key = ""
        if self.host.discover_key_dir:
            path = os.path.join(self.host.discover_key_dir, f"{vm.vmid}.key")
            key = path if os.path.exists(path) else ""
        return VMEntry(vmid=vm.vmid, address=vm.address, key_file=key)
