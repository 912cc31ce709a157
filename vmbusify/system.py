"""Facts and commands of the local system: running commands (ip, nft, ...) by argument list
with one-line errors, the addresses of this machine's interfaces, and root-only directories."""

from __future__ import annotations

import ipaddress
import os
import resource
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from vmbusify.errors import VMBusifyError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def interface_addresses() -> set[IPAddress]:
    """Every IP address configured on this machine's interfaces (IPv6 scope ids dropped)."""
    out: set[IPAddress] = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            try:
                out.add(ipaddress.ip_address(a.address.split("%")[0]))
            except ValueError:
                continue  # MAC addresses and the like
    return out


def run_command(
    argv: Sequence[str], *, error: type[VMBusifyError] = VMBusifyError, missing_hint: str = "",
    check: bool = True, input: str | None = None, env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (no shell) and capture its output as text.

    A missing program, a timeout and (with ``check``) a non-zero exit raise ``error`` with
    the command and the last line of its error output.
    """
    try:
        proc = subprocess.run(
            list(argv), check=False, input=input, capture_output=True, text=True, timeout=timeout,
            env=dict(env) if env is not None else None,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise error(f"{argv[0]}: command not found{missing_hint}") from None
    except subprocess.TimeoutExpired:
        raise error(f"`{' '.join(argv)}` took longer than {timeout:g} s") from None
    if check and proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise error(f"`{' '.join(argv)}` failed: {lines[-1] if lines else proc.returncode}")
    return proc


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) if needed and make it 0700, so only root reaches inside."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(p, 0o700)
    return p


#: The most open files a program asks for when its hard limit is unlimited (or larger).
MAX_NOFILE = 1 << 20


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one; returns the limit now in force.

    Each tunnel (the mux) and each connection (the proxy) costs a descriptor, and a service
    starts with a soft limit of 1024 (systemd's default) however high the hard one is.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > MAX_NOFILE:
        hard = MAX_NOFILE
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft if soft != resource.RLIM_INFINITY else hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
