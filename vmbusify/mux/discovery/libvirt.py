"""libvirt: running domains, reached by their vsock CID (``auto='yes'`` included: the live
XML holds the CID libvirt chose) or their virtio-serial channel (docs/discovery.md,
"libvirt").

It asks ``virsh -c URI`` (libvirt-clients): no libvirt binding to build, and the same
answers an operator gets from ``virsh list`` and ``virsh dumpxml``.
"""

from __future__ import annotations

import asyncio
import logging
import xml.etree.ElementTree as ET

from vmbusify.config_file import DEFAULT_TUNNEL_PORT
from vmbusify.errors import ConfigError
from vmbusify.mux.discovery import Found, as_vmid

log = logging.getLogger("vmbusify.mux.discovery")

#: A domain's XML larger than this is not read (libvirt's are a few KiB).
MAX_XML = 1 << 20
#: Seconds one virsh call may take.
VIRSH_TIMEOUT = 15.0
#: At most this many domains are looked at in one pass.
MAX_DOMAINS = 4096


def parse_domain(xml: str, channel: str, port: int = DEFAULT_TUNNEL_PORT) -> Found | None:
    """The VM one live domain XML describes: ``vsock:CID:PORT`` when it has a vsock device
    with a CID, else ``unix:PATH`` of its virtio-serial channel named ``channel`` (a
    ``<channel type='unix'>`` with ``<source mode='bind' path=...>``); None when it has
    neither. ConfigError if the XML cannot be read."""
    if len(xml) > MAX_XML:
        raise ConfigError(f"domain XML of {len(xml)} characters: more than {MAX_XML}")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ConfigError(f"domain XML does not parse: {exc}") from None
    name = as_vmid(root.findtext("name", "").strip())
    if not name:
        return None
    uuid = root.findtext("uuid", "").strip().lower()
    aliases = (uuid,) if uuid else ()
    cid = root.find("devices/vsock/cid")
    address = cid.get("address", "") if cid is not None else ""
    if address.isdigit() and int(address) > 2:
        return Found(name, f"vsock:{int(address)}:{port}", aliases, "libvirt")
    for ch in root.iterfind("devices/channel"):
        target = ch.find("target")
        source = ch.find("source")
        if (ch.get("type") == "unix" and target is not None and source is not None
                and target.get("type") == "virtio" and target.get("name") == channel):
            path = source.get("path", "")
            if path.startswith("/") and ":" not in path:
                return Found(name, f"unix:{path}", aliases, "libvirt")
    return None


async def _virsh(uri: str, *args: str) -> str:
    """One ``virsh -c uri ARGS`` call's output; ConfigError with its message on failure."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "virsh", "-q", "-c", uri, *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise ConfigError(f"virsh cannot run ({exc}): install libvirt-clients") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), VIRSH_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ConfigError(f"virsh -c {uri} {args[0]}: no answer within "
                          f"{VIRSH_TIMEOUT:g}s") from None
    if proc.returncode != 0:
        text = err.decode(errors="replace").strip().splitlines()
        raise ConfigError(f"virsh -c {uri} {args[0]}: {text[-1] if text else proc.returncode}")
    return out.decode(errors="replace")


async def find_domains(uri: str, channel: str) -> list[Found]:
    """The running domains of ``uri`` that can be reached (a vsock CID or the channel).
    ConfigError when libvirt cannot be asked; a domain that went between the list and its
    XML is left out."""
    names = [n.strip() for n in (await _virsh(uri, "list", "--name")).splitlines()]
    found: list[Found] = []
    for name in [n for n in names if n][:MAX_DOMAINS]:
        try:
            vm = parse_domain(await _virsh(uri, "dumpxml", "--", name), channel)
        except ConfigError as exc:
            log.debug("libvirt domain %r left out: %s", name[:100], exc)
            continue
        if vm is None:
            log.debug("libvirt domain %r has no vsock CID and no channel %s", name[:100],
                      channel)
        else:
            found.append(vm)
    return found
