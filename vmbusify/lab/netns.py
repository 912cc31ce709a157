"""Thin wrappers over `ip` and `nft`: namespaces, links, addresses, routes, the lab's nftables
table.

Every call is an argument list (no shell). A failing command raises LabError carrying the
command and its stderr. Functions named ``ensure_*`` are idempotent: they change nothing when
the thing is already as asked.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence

from vmbusify.errors import LabError
from vmbusify.system import run_command

log = logging.getLogger(__name__)


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` and capture its output; with ``check``, a failure raises LabError."""
    return run_command(argv, error=LabError, missing_hint=" (run bin/setup)", check=check,
                       input=input, env=env, timeout=timeout)


def ns_argv(netns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed to run inside ``netns`` (unchanged for the root namespace)."""
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


def run_in_netns(
    netns: str | None, argv: Sequence[str], **kwargs: object,
) -> subprocess.CompletedProcess[str]:
    """``run(argv)`` inside ``netns`` (None: the root namespace); keywords as for run()."""
    return run(ns_argv(netns, argv), **kwargs)  # type: ignore[arg-type]


def _ip(netns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["ip", *(["-n", netns] if netns else []), *args], check=check)


# --- namespaces -----------------------------------------------------------------------------


def list_netns() -> list[str]:
    """Names of every named network namespace (``ip netns list``)."""
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_exists(name: str) -> bool:
    """Whether the named network namespace exists."""
    return name in list_netns()


def ensure_netns(name: str) -> bool:
    """Create namespace ``name`` with ``lo`` up; True if it was created now."""
    created = False
    if not netns_exists(name):
        log.info("creating network namespace %s", name)
        run(["ip", "netns", "add", name])
        created = True
    _ip(name, "link", "set", "lo", "up")
    return created


def netns_pids(name: str) -> list[int]:
    """Processes running in namespace ``name`` (empty if it does not exist)."""
    proc = run(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()] if proc.returncode == 0 else []


def kill_pids(pids: Sequence[int], grace: float = 5.0) -> None:
    """SIGTERM ``pids``, then SIGKILL whatever is still alive after ``grace`` seconds."""
    alive = [p for p in pids if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 2.0)
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if _alive(p)]
            if alive:
                time.sleep(0.05)
        if not alive:
            return
    if alive:
        raise LabError(f"processes {alive} survived SIGKILL")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def delete_netns(name: str) -> None:
    """Kill every process left in ``name`` and delete it; nothing if it does not exist."""
    if not netns_exists(name):
        return
    kill_pids(netns_pids(name))
    log.info("deleting network namespace %s", name)
    run(["ip", "netns", "delete", name])


# --- links and addresses --------------------------------------------------------------------


def link_exists(ifname: str, netns: str | None = None) -> bool:
    """Whether ``ifname`` exists (in ``netns``; None: the root namespace)."""
    return _ip(netns, "link", "show", "dev", ifname, check=False).returncode == 0


def delete_link(ifname: str, netns: str | None = None) -> None:
    """Delete link ``ifname``; nothing if it does not exist (or vanishes meanwhile: the kernel
    removes a veth whose peer's namespace is going away in the background)."""
    if link_exists(ifname, netns):
        proc = _ip(netns, "link", "delete", "dev", ifname, check=False)
        if proc.returncode != 0 and link_exists(ifname, netns):
            raise LabError(f"`ip link delete dev {ifname}` failed: {proc.stderr.strip()}")


def link_up(ifname: str, netns: str | None = None) -> None:
    """Set ``ifname`` up (in ``netns``; None: the root namespace)."""
    _ip(netns, "link", "set", "dev", ifname, "up")


def ensure_addr(ifname: str, cidr: str, netns: str | None = None) -> None:
    """Give ``ifname`` the address ``cidr`` (``ip addr replace``: no-op when present)."""
    _ip(netns, "addr", "replace", cidr, "dev", ifname)


def ensure_nowhere_link(ifname: str, netns: str) -> str:
    """Create ``ifname`` in ``netns``: a link that carries an address and leads nowhere.

    A ``dummy`` link where the kernel has it; otherwise a bridge with no ports (some kernels,
    this project's CI machines among them, are built without the dummy driver). Returns the
    link kind in use.
    """
    if link_exists(ifname, netns):
        return _link_kind(ifname, netns)
    made = _ip(netns, "link", "add", ifname, "type", "dummy", check=False)
    kind = "dummy"
    if made.returncode != 0:
        _ip(netns, "link", "add", ifname, "type", "bridge")
        kind = "bridge"
    log.info("created %s link %s in %s", kind, ifname, netns)
    return kind


def _link_kind(ifname: str, netns: str | None) -> str:
    out = _ip(netns, "-d", "link", "show", "dev", ifname).stdout.split()
    for kind in ("dummy", "bridge", "veth"):
        if kind in out:
            return kind
    return "other"


def ensure_veth(host_if: str, peer_netns: str, peer_if: str) -> None:
    """A veth pair: ``host_if`` in the root namespace, ``peer_if`` inside ``peer_netns``.

    A half-made pair (host end present, peer missing or elsewhere) is removed and made again.
    """
    if link_exists(host_if) and not link_exists(peer_if, peer_netns):
        log.info("replacing half-made veth %s", host_if)
        delete_link(host_if)
    if not link_exists(host_if):
        if link_exists(peer_if, peer_netns):
            delete_link(peer_if, peer_netns)
        log.info("creating veth %s <-> %s:%s", host_if, peer_netns, peer_if)
        _ip(None, "link", "add", host_if, "type", "veth", "peer", "name", peer_if,
            "netns", peer_netns)


def ensure_default_route(via: str, netns: str) -> None:
    """Make ``via`` the default route of ``netns``."""
    _ip(netns, "route", "replace", "default", "via", via)


def route_get(dst: str, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    """``ip route get dst`` (asks the routing table; sends nothing). Not checked."""
    return _ip(netns, "route", "get", dst, check=False)


# --- nftables ---------------------------------------------------------------------------------


def delete_nft_table(table: str) -> bool:
    """Delete ``table inet <table>`` if present (the lab's subnet table after a kill -9 of the
    subnet worker, which removes it on a clean stop); True if it was there."""
    if run(["nft", "list", "table", "inet", table], check=False).returncode != 0:
        return False
    run(["nft", "delete", "table", "inet", table])
    log.info("nft table inet %s removed", table)
    return True
