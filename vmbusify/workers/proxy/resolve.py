"""Name resolution for the proxy server: IP literals, a configured hosts file, or the system.

With ``[proxy] hosts_file`` set, names come from that file only (the lab uses this so the
host never asks the machine's real DNS); otherwise from getaddrinfo. The file is read again
whenever it changes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from pathlib import Path

from vmbusify.workers.proxy.policy import parse_ip


class NameNotFound(Exception):
    """The name does not resolve (SOCKS reply 4)."""


def parse_hosts(text: str) -> dict[str, list[str]]:
    """name (lower case) -> addresses, in file order, from /etc/hosts syntax."""
    names: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            addr = str(parse_ip(fields[0]))
        except ValueError:
            continue
        for name in fields[1:]:
            lst = names.setdefault(name.lower().rstrip("."), [])
            if addr not in lst:
                lst.append(addr)
    return names


class Resolver:
    """Resolves a target host to the addresses to try, in order."""

    def __init__(self, hosts_file: str = "") -> None:
        self.hosts_file = Path(hosts_file) if hosts_file else None
        self._stamp: tuple[int, int] | None = None
        self._names: dict[str, list[str]] = {}

    def _hosts(self) -> dict[str, list[str]]:
        assert self.hosts_file is not None
        try:
            st = os.stat(self.hosts_file)
        except OSError as exc:
            raise NameNotFound(f"hosts file {self.hosts_file}: {exc.strerror}") from None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._names = parse_hosts(self.hosts_file.read_text(errors="replace"))
            self._stamp = stamp
        return self._names

    async def resolve(self, host: str, port: int, kind: int = socket.SOCK_STREAM) -> list[str]:
        """Addresses of ``host`` (IP literals as they are); NameNotFound if none."""
        try:
            return [str(parse_ip(host.strip("[]")))]
        except ValueError:
            pass
        if self.hosts_file is not None:
            found = self._hosts().get(host.lower().rstrip("."))
            if not found:
                raise NameNotFound(f"{host} is not in {self.hosts_file}")
            return list(found)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=kind)
        except (socket.gaierror, UnicodeError) as exc:
            raise NameNotFound(f"{host}: {getattr(exc, 'strerror', None) or exc}") from None
        out: list[str] = []
        for *_, sockaddr in infos:
            addr = str(ipaddress.ip_address(str(sockaddr[0]).split("%")[0]))
            if addr not in out:
                out.append(addr)
        if not out:
            raise NameNotFound(f"{host} has no address")
        return out
