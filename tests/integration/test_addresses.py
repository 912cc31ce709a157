"""Addresses are owned: two guests claiming one address (issue 12 item 7), end to end.

A real host mux, its command listener and its proxy worker; two fake guests on the wire
(Unix sockets standing in for vsock) that answer the host's HELLO with the addresses the test
chooses and its PINGs with PONGs. Every lookup by address (`vmbusifyctl vmid`, exec by IP,
the host proxy's routing) must name the conflict instead of picking a VM.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import BIN, MuxProc, free_port, link_for, wait_state, write_config
from tests.integration.proxy_harness import socks5_open
from vmbusify.bus.link import WorkerLink
from vmbusify.errors import UnknownVMError
from vmbusify.protocol.entities import Entity, TunnelMessage
from vmbusify.protocol.package import PackageDecoder, PackageType
from vmbusify.protocol.tunnel import Hello, Ping, Pong

VM1_ADDRESS = "198.19.1.10"


@dataclass
class FakeGuest:
    """A guest on the wire that says what the test wants: HELLO (with ``ips``), PONG."""

    name: str
    path: Path
    ips: list[str]
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        dec = PackageDecoder()
        try:
            while data := await reader.read(65536):
                dec.receive_data(data)
                for pkg in dec.packages():
                    if pkg.type is not PackageType.MESSAGE:
                        continue
                    if pkg.message_id == TunnelMessage.HELLO and pkg.entity == Entity.TUNNEL:
                        writer.write(self.hello().package().encode())
                    elif pkg.message_id == TunnelMessage.PING and pkg.entity == Entity.TUNNEL:
                        writer.write(Pong(Ping.from_payload(pkg.payload).nonce).package().encode())
        except ConnectionError:
            pass
        finally:
            if writer in self.writers:
                self.writers.remove(writer)
            writer.close()

    def hello(self) -> Hello:
        return Hello("guest", self.name, "test", ips=list(self.ips))

    def claim(self, ips: list[str]) -> None:
        """A later HELLO with other addresses (as a guest sends when they change)."""
        self.ips = ips
        for w in self.writers:
            w.write(self.hello().package().encode())

    def hang_up(self) -> None:
        """Drop the tunnel and accept no new one (the VM is gone)."""
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.close()


@dataclass
class Host:
    mux: MuxProc
    procs: list[subprocess.Popen[bytes]]
    proxy_port: int

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "VMBUSIFY_CONFIG": str(self.mux.config_path)}

    async def run(self, *argv: str) -> tuple[int, str, str]:
        p = await asyncio.create_subprocess_exec(*argv, env=self.env, stdin=subprocess.DEVNULL,
                                                 stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(p.communicate(), 60)
        assert p.returncode is not None
        return p.returncode, out.decode(), err.decode()

    async def ctl(self, *args: str) -> tuple[int, str, str]:
        return await self.run(str(BIN / "vmbusifyctl"), *args)

    async def listener_ready(self, timeout: float = 30.0) -> None:
        """Wait until the command listener answers (it starts beside the mux)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while (last := await self.ctl("list"))[0] != 0:
            assert asyncio.get_running_loop().time() < deadline, last
            await asyncio.sleep(0.2)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    proxy_port = free_port()
    cfg = write_config(tmp_path / "host.toml", (
        f'role = "host"\nname = "host"\nrun_dir = "{tmp_path}/host-run"\n'
        f'state_dir = "{tmp_path}/host-state"\n'
        f'[tunnel]\nping_interval = 0.5\ndead_after = 3.0\nbackoff_initial = 0.1\n'
        f'backoff_max = 0.5\n'
        f'[[vms]]\nvmid = "vm1"\naddress = "unix:{tmp_path}/vm1.sock"\n'
        f'[[vms]]\nvmid = "vm2"\naddress = "unix:{tmp_path}/vm2.sock"\n'
        f'[[vms]]\nvmid = "vm3"\naddress = "unix:{tmp_path}/vm3.sock"\n'
        f'ips = ["198.19.3.0/24"]\n'
        f'[control]\nlisten = "127.0.0.1:{free_port()}"\n'
        f'[proxy]\nlisten = "127.0.0.1:{proxy_port}"\n'))
    mux = MuxProc("host", cfg, tmp_path / "host.log")
    mux.start()
    procs = []
    for program in ("control", "proxy"):
        argv = [str(BIN / "vmbusify"), *(["worker"] if program == "proxy" else []), program,
                "--config", str(cfg)]
        with open(tmp_path / f"{program}.log", "ab") as log:
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
    h = Host(mux, procs, proxy_port)
    yield h
    for p in procs:
        if p.poll() is None:
            p.terminate()
            p.wait(15)
    mux.kill()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 150))


async def vm_status(link: WorkerLink, vmid: str) -> dict[str, Any]:
    st = await link.control({"cmd": "status"})
    return next(v for v in st["vms"] if v["vmid"] == vmid)


async def eventually(check: Any, timeout: float = 15.0) -> Any:
    """Poll the coroutine function ``check`` until it returns something true."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = await check()
        if got or asyncio.get_running_loop().time() > deadline:
            return got
        await asyncio.sleep(0.1)


def test_an_address_two_vms_claim_is_held_by_neither_and_every_lookup_says_so(
        host: Host, tmp_path: Path) -> None:
    async def scenario() -> None:
        vm1 = FakeGuest("guest1", tmp_path / "vm1.sock", [VM1_ADDRESS, "198.19.1.11"])
        evil = FakeGuest("evil", tmp_path / "vm2.sock", [VM1_ADDRESS, "198.19.2.10"])
        vm3 = FakeGuest("guest3", tmp_path / "vm3.sock", ["198.19.3.10", "198.19.1.11"])
        for g in (vm1, evil, vm3):
            await g.start()
        link = await link_for(host.mux, "t-addr", [Entity.CMD_LISTENER])
        for vmid in ("vm1", "vm2", "vm3"):
            await wait_state(link, vmid, "connected")

        # the control command: no guess, the conflict named
        with pytest.raises(UnknownVMError, match=r"address conflict: 198\.19\.1\.10 is "
                                                 r"claimed by vm1 and vm2"):
            await link.control({"cmd": "vmid", "ip": VM1_ADDRESS})
        assert await link.control({"cmd": "vmid", "ip": "198.19.2.10"}) == "vm2"
        # vm3 may claim only 198.19.3.0/24: its claim of vm1's other address is not taken
        assert await link.control({"cmd": "vmid", "ip": "198.19.1.11"}) == "vm1"
        assert await link.control({"cmd": "vmid", "ip": "198.19.3.10"}) == "vm3"

        # vmbusifyctl vmid: exit 1, one line naming the conflict
        await host.listener_ready()
        code, out, err = await host.ctl("vmid", VM1_ADDRESS)
        assert code == 1 and out == ""
        assert err.startswith("vmbusifyctl: ") and err.count("\n") == 1
        assert "address conflict: 198.19.1.10 is claimed by vm1 and vm2" in err

        # status: held and refused, with why
        code, out, _ = await host.ctl("status", "--json")
        assert code == 0
        vms = {v["vmid"]: v for v in json.loads(out)["vms"]}
        assert vms["vm1"]["ips"] == ["198.19.1.11"]
        assert vms["vm1"]["ips_refused"] == [{"ip": VM1_ADDRESS, "why": "conflict",
                                              "reason": "conflict with vm2", "with": ["vm2"]}]
        assert vms["vm2"]["ips"] == ["198.19.2.10"]
        assert vms["vm3"]["ips_refused"][0]["reason"] == "outside the configured ips"
        code, out, _ = await host.ctl("status")
        assert code == 0
        assert "not held: 198.19.1.10 (conflict with vm2)" in out
        assert "not held: 198.19.1.10 (conflict with vm1)" in out
        assert "not held: 198.19.1.11 (outside the configured ips)" in out

        # exec by IP: refused with the conflict, no VM picked (exit 255, one line)
        code, _, err = await host.run(str(BIN / "vmbusifyexec"), VM1_ADDRESS, "--", "true")
        assert code == 255 and "address conflict" in err and err.count("\n") == 1
        # ping by IP goes through the same book
        with pytest.raises(UnknownVMError, match="address conflict"):
            await link.control({"cmd": "ping", "vmid": VM1_ADDRESS})
        assert (await link.control({"cmd": "ping", "vmid": "198.19.2.10"}))["vmid"] == "vm2"

        # the host proxy's routing of the IP: reply 4, not a connection into either VM
        async def socks_reply() -> int:
            s, code, _ = await asyncio.to_thread(socks5_open, host.proxy_port, VM1_ADDRESS, 22)
            s.close()
            return code
        codes: list[int | None] = []

        async def refused_as_unreachable() -> bool:
            codes.append(await _positive(socks_reply))
            return codes[-1] == 4  # (the proxy worker may still be starting: retried)
        assert await eventually(refused_as_unreachable, 30), codes
        proxy_log = (tmp_path / "proxy.log").read_text(errors="replace")
        assert "address conflict" in proxy_log

        # the hostile VM changes its claims (a later HELLO): vm1 gets its address back
        evil.claim(["198.19.2.10"])

        async def vm1_holds() -> bool:
            return (await vm_status(link, "vm1"))["ips"] == [VM1_ADDRESS, "198.19.1.11"]
        assert await eventually(vm1_holds)
        assert await link.control({"cmd": "vmid", "ip": VM1_ADDRESS}) == "vm1"
        code, out, _ = await host.ctl("vmid", VM1_ADDRESS)
        assert (code, out) == (0, "vm1\n")

        # claims it again, then goes away: its claims go with it, vm1 holds the address
        evil.claim([VM1_ADDRESS])

        async def conflicted() -> bool:
            return bool((await vm_status(link, "vm1"))["ips_refused"])
        assert await eventually(conflicted)
        evil.hang_up()
        assert await eventually(vm1_holds)
        assert await link.control({"cmd": "vmid", "ip": VM1_ADDRESS}) == "vm1"
        st = await vm_status(link, "vm2")
        assert st["state"] != "connected" and st["ips"] == [] and st["ips_refused"] == []
        await link.close()

    run(scenario())


async def _positive(probe: Any) -> int | None:
    """``probe()``'s SOCKS reply once the proxy answers at all (it may still be starting)."""
    try:
        return int(await probe())
    except (OSError, AssertionError):
        return None
