"""Services of the lab's "external network" (namespace ``vmbl-ext``, 198.18.0.2).

HOOK: the lab starts every entry of ``SERVICES`` inside ``vmbl-ext`` after the namespace is
up, and ``lab down`` stops them. The lab's DNS server (dnsmasq, below) is one; the
``/etc/netns/*/resolv.conf`` files point at it. Another service would be added like this::

    SERVICES.append(ExternalService(
        "web", lambda ext: [sys.executable, "-m", "http.server", "--bind", ext.ip, "80"]))

A service runs in the foreground; the lab detaches it (its own session), writes its pid to
``<lab>/ext/run/NAME.pid`` and its output to ``NAME.log``, and restarts it on ``lab up`` when
it is not running.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import vmbusify.lab.netns as ip
from vmbusify.lab.layout import ExternalLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExternalService:
    """A long-running program of the external network."""

    name: str
    #: The command line, given the external network's layout (its address, run dir).
    argv: Callable[[ExternalLayout], list[str]]


#: The external network's services, started in order by ``lab up``.
SERVICES: list[ExternalService] = []

#: The lab's DNS server (the upstream of the subnet's DNS forwarder): dnsmasq answering from
#: the external namespace's hosts file (``external.lab``, ``host.lab``) and refusing every
#: other name. It has no upstream at all, so no query ever reaches a real resolver.
SERVICES.append(ExternalService("dns", lambda ext: [
    "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-poll",
    f"--listen-address={ext.ip}", "--bind-interfaces", "--pid-file=", "--log-facility=-"]))

#: A web server on port 80 for demos (`curl http://external.lab/` from a VM, through the
#: proxy or the subnet). It serves ``<lab>/ext/www``, which holds one greeting page.
WEB_GREETING = "hello from the lab's external network\n"


def _web_argv(ext: ExternalLayout) -> list[str]:
    www = ext.dir / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "index.html").write_text(WEB_GREETING)
    return [sys.executable, "-m", "http.server", "--bind", ext.ip, "--directory", str(www), "80"]


SERVICES.append(ExternalService("web", _web_argv))


def service_pid(ext: ExternalLayout, service: ExternalService) -> int | None:
    """The pid of ``service`` if it runs in the external namespace."""
    try:
        pid = int((ext.run_dir / f"{service.name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid in ip.netns_pids(ext.netns) else None


def start_services(ext: ExternalLayout) -> None:
    """Start every registered service that is not running."""
    ext.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for service in SERVICES:
        if service_pid(ext, service) is not None:
            continue
        log.info("external: starting %s", service.name)
        with open(ext.run_dir / f"{service.name}.log", "ab") as logfh:
            proc = subprocess.Popen(
                ip.ns_argv(ext.netns, service.argv(ext)), stdin=subprocess.DEVNULL,
                stdout=logfh, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=str(ext.run_dir))
        (ext.run_dir / f"{service.name}.pid").write_text(f"{proc.pid}\n")


def stop_services(ext: ExternalLayout) -> None:
    """Stop every process in the external namespace (services and anything else left there)."""
    if ip.netns_exists(ext.netns):
        ip.kill_pids(ip.netns_pids(ext.netns))
    for service in SERVICES:
        (ext.run_dir / f"{service.name}.pid").unlink(missing_ok=True)
