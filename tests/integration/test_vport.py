"""A host mux and a guest mux talking over virtio-serial, with the test playing QEMU.

The guest listens on ``vport:/dev/pts/N``: a pty's slave stands in for the virtio-serial
character device (both are character devices that stay open across hosts). The test holds
the master and bridges it, like QEMU's ``-chardev socket,server=on,wait=off``, to a Unix
socket that the host mux connects to (``unix:/path``), one client at a time; what the guest
writes while no host is connected is dropped, as QEMU drops it. A pty cannot report a host
that went away without going away itself, so a host reconnecting here is noticed the other
way the transport has: its fresh HELLO in the middle of the old session (the POLLHUP path is
in tests/unit/test_transport_vport.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import signal
import tty
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.integration.harness import MuxProc, link_for, wait_state, write_config
from vmbusify.bus.link import Inbound
from vmbusify.protocol.entities import Entity
from vmbusify.protocol.package import Package, PackageType

ECHO = 901


async def echo(msg: Inbound) -> Any:
    return {"echo": msg.body, "from": msg.vmid}


class Chardev:
    """QEMU's side of the port, as far as a host sees it: a Unix socket server that passes
    bytes to and from the pty master, one client at a time."""

    def __init__(self, master: int, path: Path) -> None:
        self.master = master
        self.path = path
        self.client: asyncio.StreamWriter | None = None
        self.clients = 0
        self._free = asyncio.Lock()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        os.set_blocking(self.master, False)
        asyncio.get_running_loop().add_reader(self.master, self._from_guest)
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))
        os.chmod(self.path, 0o600)  # as docs/deploy.md asks of the real one

    def _from_guest(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except (BlockingIOError, OSError):
            return
        if self.client is not None and not self.client.is_closing():
            self.client.write(data)  # else dropped, as QEMU drops it with no client

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._free:  # QEMU serves one client; the next waits for it to go
            self.client = writer
            self.clients += 1
            try:
                while data := await reader.read(65536):
                    view = memoryview(data)
                    while view:
                        try:
                            n = os.write(self.master, view)
                        except BlockingIOError:
                            n = 0
                        view = view[n:]
                        if view:
                            await asyncio.sleep(0.001)
            except OSError:
                pass
            finally:
                self.client = None
                writer.close()

    async def stop(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)
        if self._server is not None:
            self._server.close()
        if self.client is not None:
            self.client.close()


@contextlib.asynccontextmanager
async def vport_pair(root: Path, key: bytes | None) -> AsyncIterator[tuple[MuxProc, MuxProc,
                                                                          Chardev]]:
    master, slave = pty.openpty()
    tty.setraw(slave)
    device = os.ttyname(slave)
    # What an earlier host left in the port: half a package and a whole exec START.
    start = Package(type=PackageType.REQUEST, entity=Entity.CMD_LISTENER, id=9, message_id=1,
                    stream=1, payload=b"\x81\xa4argv\x91\xa5touch").encode()
    os.write(master, start[:17] + start)
    tun = "ping_interval = 0.5\ndead_after = 3.0\nbackoff_initial = 0.1\nbackoff_max = 1.0\n"
    keyline = ""
    if key is not None:
        (root / "vm.key").write_bytes(key + b"\n")
        (root / "vm.key").chmod(0o600)
        keyline = f'key_file = "{root}/vm.key"\n'
    chardev = root / "vm1-chardev.sock"
    g = write_config(root / "guest.toml", (
        f'role = "guest"\nname = "guest1"\nrun_dir = "{root}/guest-run"\n'
        f'state_dir = "{root}/guest-state"\n'
        f'[tunnel]\nlisten = "vport:{device}"\n{tun}{keyline}'
        f'[control]\nlisten = "unix:{root}/guest-control/control.sock"\n'))
    h = write_config(root / "host.toml", (
        f'role = "host"\nname = "host"\nrun_dir = "{root}/host-run"\n'
        f'state_dir = "{root}/host-state"\n[tunnel]\n{tun}[host]\nkeep_connected = true\n'
        f'[[vms]]\nvmid = "vm1"\naddress = "unix:{chardev}"\n{keyline}'
        f'[control]\nlisten = "unix:{root}/host-control/control.sock"\n'))
    guest = MuxProc("guest", g, root / "guest.log")
    host = MuxProc("host", h, root / "host.log")
    bridge = Chardev(master, chardev)
    await bridge.start()
    guest.start()
    host.start()
    try:
        yield host, guest, bridge
    finally:
        for m in (host, guest):
            m.kill(signal.SIGTERM)
        await bridge.stop()
        os.close(master)
        os.close(slave)


async def _echo_round(host: MuxProc, guest: MuxProc, n: int) -> None:
    """Echo requests host -> guest through fresh links. Each round's links have names of
    their own: a worker of the same name in the same process, closed a moment ago, may
    still have a heartbeat REG on its way to the mux, which then takes it for the newer one
    (real workers restart as new processes, long after their last REG)."""
    g = await link_for(guest, f"t-guest{n}", [Entity.CMD_EXECUTOR],
                       [(Entity.CMD_LISTENER, ECHO, echo)])
    h = await link_for(host, f"t-host{n}", [Entity.CMD_LISTENER])
    await wait_state(h, "vm1", "connected")
    assert await h.request_body("vm1", Entity.CMD_LISTENER, ECHO, {"x": 1}) == {
        "echo": {"x": 1}, "from": "host"}
    big = "z" * 300_000  # more than a pty holds at once: flow both ways through the bridge
    assert (await h.request_body("vm1", Entity.CMD_LISTENER, ECHO, big))["echo"] == big
    ping = await h.control({"cmd": "ping", "vmid": "vm1"})
    assert ping["rtt_ms"] > 0
    await h.close()
    await g.close()


def test_host_and_guest_over_virtio_serial_skip_stale_bytes_and_survive_a_host_restart(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with vport_pair(tmp_path, key=b"k" * 32) as (host, guest, bridge):
            await _echo_round(host, guest, 1)
            log = guest.log()
            assert "a host's HELLO (host) starts session 1; skipped" in log
            assert "the host proved the shared key" in log
            # The host mux dies and comes back: the guest sees its fresh HELLO and hands
            # over; the old tunnel's bytes never confuse the new one.
            host.kill(signal.SIGKILL)
            host.start()
            await _echo_round(host, guest, 2)
            assert "the host changed" in guest.log()
            assert bridge.clients >= 2
            assert "Traceback" not in guest.log() + host.log()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_the_guest_restarting_tells_the_connected_host_to_reconnect(tmp_path: Path) -> None:
    """A guest mux that restarts (or a guest that reboots) cannot hang up on the host: it
    writes a BYE into the port, and the host connects again at once instead of waiting
    dead_after for the pings to go unanswered."""
    async def scenario() -> None:
        async with vport_pair(tmp_path, key=None) as (host, guest, _bridge):
            await _echo_round(host, guest, 1)
            guest.kill(signal.SIGKILL)
            guest.start()
            await _echo_round(host, guest, 2)
            assert "peer said goodbye: the guest's virtio-serial session ended" in host.log()

    asyncio.run(asyncio.wait_for(scenario(), 120))
