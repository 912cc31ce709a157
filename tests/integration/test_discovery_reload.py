"""VMs found, not listed, and a reload that adds and drops VMs (docs/discovery.md): real mux
processes joined by Unix sockets (no root). libvirt is its test driver (``virsh -c
test:///PATH.xml``, a node described in a file this test writes); Firecracker is a stand-in
VMM that answers the ``CONNECT`` handshake on a socket this test makes."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import MuxProc, link_for, wait_state, write_config
from vmbusify.bus.link import WorkerLink
from vmbusify.errors import ConfigError
from vmbusify.protocol.entities import Entity

TUNNEL = 'ping_interval = 0.5\ndead_after = 3.0\nbackoff_initial = 0.1\nbackoff_max = 0.5\n'
UUID = "11111111-2222-3333-4444-555555555555"


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


def guest(root: Path, name: str) -> MuxProc:
    """A guest mux listening on ``root/NAME.sock``, started."""
    cfg = write_config(root / f"{name}.toml", (
        f'role = "guest"\nname = "{name}"\nrun_dir = "{root}/{name}-run"\n'
        f'state_dir = "{root}/{name}-state"\n[tunnel]\nlisten = "unix:{root}/{name}.sock"\n'
        f'{TUNNEL}[control]\nlisten = "unix:{root}/{name}-control/control.sock"\n'))
    mux = MuxProc(name, cfg, root / f"{name}.log")
    mux.start()
    return mux


def host_config(root: Path, vms: list[str], extra: str = "") -> Path:
    listed = "".join(f'[[vms]]\nvmid = "{v}"\naddress = "unix:{root}/{v}.sock"\n' for v in vms)
    return write_config(root / "host.toml", (
        f'role = "host"\nname = "host"\nrun_dir = "{root}/host-run"\n'
        f'state_dir = "{root}/host-state"\n[tunnel]\n{TUNNEL}'
        f'[control]\nlisten = "unix:{root}/host-control/control.sock"\n{extra}{listed}'))


async def vms(link: WorkerLink) -> dict[str, dict[str, Any]]:
    st = await link.control({"cmd": "status"}, timeout=5)
    return {v["vmid"]: v for v in st["vms"]}


async def wait_gone(link: WorkerLink, vmid: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while vmid in await vms(link):
        assert time.monotonic() < deadline, f"{vmid} still listed after {timeout}s"
        await asyncio.sleep(0.1)


@pytest.fixture
def procs() -> Any:
    started: list[MuxProc] = []
    yield started
    for m in started:
        m.kill(signal.SIGTERM)


def test_reload_adds_and_drops_vms_and_keeps_the_tunnel_of_one_that_stays(
        tmp_path: Path, procs: list[MuxProc]) -> None:
    procs += [guest(tmp_path, n) for n in ("vm1", "vm2", "vm3")]
    host = MuxProc("host", host_config(tmp_path, ["vm1", "vm2"]), tmp_path / "host.log")
    host.start()
    procs.append(host)

    async def scenario() -> None:
        link = await link_for(host, "t-host", [Entity.CMD_LISTENER])
        try:
            before = await wait_state(link, "vm1", "connected")
            await wait_state(link, "vm2", "connected")
            host_config(tmp_path, ["vm1", "vm3"])
            result = await link.control({"cmd": "reload"}, timeout=30)
            assert (result["added"], result["dropped"]) == (["vm3"], ["vm2"])
            assert result["kept"] == ["vm1"] and result["restart_needed"] == []
            await wait_state(link, "vm3", "connected")
            now = await vms(link)
            assert set(now) == {"vm1", "vm3"}
            # vm1's tunnel is the same one: never closed, never reconnected.
            assert now["vm1"]["connects"] == 1 == before["connects"]
            assert now["vm1"]["connected_since"] == before["connected_since"]
            assert (await link.control({"cmd": "ping", "vmid": "vm1"}))["rtt_ms"] > 0

            # SIGHUP to the mux does the same; a changed [proxy] is named, not applied.
            host_config(tmp_path, ["vm1", "vm2", "vm3"], '[proxy]\nlisten = "127.0.0.1:1"\n')
            host.kill(signal.SIGHUP)
            await wait_state(link, "vm2", "connected")
            assert (await vms(link))["vm1"]["connects"] == 1

            # A file that does not load changes nothing, and says why.
            (tmp_path / "host.toml").write_text("role = [\n")
            with pytest.raises(ConfigError):
                await link.control({"cmd": "reload"}, timeout=30)
            assert set(await vms(link)) == {"vm1", "vm2", "vm3"}
        finally:
            await link.close()

    run(scenario())
    log = host.log()
    assert "vm=vm2 dropped: gone from the host's configuration" in log
    assert "changed, needing a restart: proxy" in log
    assert "Traceback" not in log
    assert "Traceback" not in procs[1].log()


async def _fake_vmm(path: Path, guest_sock: Path) -> asyncio.AbstractServer:
    """A Firecracker stand-in: answers ``CONNECT 6541`` with ``OK``, then joins the caller
    to the guest mux's socket (what the VMM does with the VM's vsock)."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        assert line == b"CONNECT 6541\n"
        writer.write(b"OK 1073741824\n")
        g_reader, g_writer = await asyncio.open_unix_connection(str(guest_sock))

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except OSError:
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, g_writer), pipe(g_reader, writer))

    return await asyncio.start_unix_server(serve, str(path))


def test_firecracker_sockets_are_found_by_glob_and_dropped_when_they_go(
        tmp_path: Path, procs: list[MuxProc]) -> None:
    procs += [guest(tmp_path, "fcvm")]
    (tmp_path / "fc").mkdir()
    extra = (f'[host]\ndiscover = ["firecracker"]\ndiscover_interval = 0.3\n'
             f'socket_globs = ["{tmp_path}/fc/*.vsock"]\n')
    host = MuxProc("host", host_config(tmp_path, [], extra), tmp_path / "host.log")
    host.start()
    procs.append(host)

    async def scenario() -> None:
        link = await link_for(host, "t-host", [Entity.CMD_LISTENER])
        server = None
        try:
            assert await vms(link) == {}
            server = await _fake_vmm(tmp_path / "fc" / "fcvm.vsock", tmp_path / "fcvm.sock")
            vm = await wait_state(link, "fcvm", "connected")
            assert vm["source"] == "firecracker" and vm["hostname"] == "fcvm"
            assert vm["address"] == f"fc:{tmp_path}/fc/fcvm.vsock:6541"
            server.close()
            (tmp_path / "fc" / "fcvm.vsock").unlink()
            await wait_gone(link, "fcvm")
        finally:
            if server is not None:
                server.close()
            await link.close()

    run(scenario())
    assert "vm=fcvm added at fc:" in host.log()


def _node_xml(root: Path, with_db: bool) -> None:
    db = (f"<domain type='test'><name>db 2</name><uuid>{UUID}</uuid><memory>65536</memory>"
          "<os><type>hvm</type></os><devices><channel type='unix'>"
          f"<source mode='bind' path='{root}/dbvm.sock'/>"
          "<target type='virtio' name='org.vmbusify.0'/></channel></devices></domain>")
    web = ("<domain type='test'><name>web-1</name><memory>65536</memory><os><type>hvm</type>"
           "</os><devices><vsock model='virtio'><cid auto='yes' address='7'/></vsock>"
           "</devices></domain>")
    plain = ("<domain type='test'><name>plain</name><memory>65536</memory>"
             "<os><type>hvm</type></os></domain>")
    (root / "node.xml").write_text(f"<node>{db if with_db else ''}{web}{plain}</node>")


@pytest.mark.skipif(shutil.which("virsh") is None, reason="virsh (libvirt-clients) missing")
def test_libvirt_domains_are_found_through_virsh_with_the_uuid_as_alias(
        tmp_path: Path, procs: list[MuxProc]) -> None:
    """libvirt's test driver, not a libvirtd: the same virsh calls and domain XML."""
    procs += [guest(tmp_path, "dbvm")]
    _node_xml(tmp_path, with_db=True)
    extra = (f'[host]\ndiscover = ["libvirt"]\ndiscover_interval = 0.3\n'
             f'libvirt_uri = "test://{tmp_path}/node.xml"\n')
    host = MuxProc("host", host_config(tmp_path, [], extra), tmp_path / "host.log")
    host.start()
    procs.append(host)

    async def scenario() -> None:
        link = await link_for(host, "t-host", [Entity.CMD_LISTENER])
        try:
            db = await wait_state(link, "db_2", "connected")
            assert db["aliases"] == [UUID] and db["source"] == "libvirt"
            assert db["hostname"] == "dbvm"
            web = (await vms(link))["web-1"]  # no vsock here: listed, never connected
            assert web["address"] == "vsock:7:6541" and web["state"] != "connected"
            assert "plain" not in await vms(link)
            pong = await link.control({"cmd": "ping", "vmid": UUID.upper()})
            assert pong["vmid"] == "db_2"
            assert await link.control({"cmd": "vmid", "ip": UUID}) == "db_2"
            _node_xml(tmp_path, with_db=False)  # the domain stopped
            await wait_gone(link, "db_2")
            assert "web-1" in await vms(link)
        finally:
            await link.close()

    run(scenario())
    assert "Traceback" not in host.log()
