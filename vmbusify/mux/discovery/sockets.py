"""Firecracker / Cloud Hypervisor: each VM's vsock is a Unix socket on the host, found by
glob (docs/discovery.md "Firecracker and Cloud Hypervisor")."""

from __future__ import annotations

import glob
import os
import stat

from vmbusify.config_file import DEFAULT_TUNNEL_PORT
from vmbusify.mux.discovery import Found, as_vmid

#: At most this many sockets are taken from one look (a glob matching a huge tree).
MAX_SOCKETS = 4096


def find_sockets(globs: list[str], naming: str, source: str,
                 port: int = DEFAULT_TUNNEL_PORT) -> list[Found]:
    """The Unix sockets matching ``globs`` (sorted), each a VM at ``fc:PATH:PORT`` named by
    its file name without the extension (``naming="stem"``) or its directory's name
    (``"dir"``). Files that are not sockets are skipped; the first of two with one vmid wins."""
    found: dict[str, Found] = {}
    for pattern in globs:
        for path in sorted(glob.glob(pattern)):
            if len(found) >= MAX_SOCKETS:
                return list(found.values())
            try:
                if not stat.S_ISSOCK(os.stat(path).st_mode):
                    continue
            except OSError:
                continue  # gone between the glob and the stat
            name = os.path.basename(os.path.dirname(path)) if naming == "dir" else \
                os.path.splitext(os.path.basename(path))[0]
            vmid = as_vmid(name)
            if vmid and vmid not in found and ":" not in path:
                found[vmid] = Found(vmid, f"fc:{path}:{port}", source=source)
    return list(found.values())
