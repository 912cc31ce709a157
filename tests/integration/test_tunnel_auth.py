"""The guest accepts only its real host: shared keys between real mux processes over a Unix
socket, a would-be host speaking the wire by hand, and a guest of the previous release."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import (
    MuxProc,
    Pair,
    free_port,
    link_for,
    read_packages_until_closed,
    wait_state,
    write_config,
)
from vmbusify.bus.link import Inbound
from vmbusify.errors import ErrorCode, LimitReached, TunnelError
from vmbusify.lab.release import release_tar
from vmbusify.protocol import auth
from vmbusify.protocol.entities import Entity, TunnelMessage
from vmbusify.protocol.package import Package, PackageType
from vmbusify.protocol.serialize import dumps
from vmbusify.protocol.tunnel import PROOF_SIZE, Auth, Bye, Hello

ECHO = 901
#: The previous release: guests are upgraded last, so this host must still serve its guest.
OLD_RELEASE = "v0.1.0"


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


def _key_file(path: Path, key: bytes) -> str:
    path.write_bytes(key + b"\n")
    path.chmod(0o600)
    return str(path)


def make_keyed_pair(root: Path, host_key: bytes | None, guest_key: bytes | None,
                    guest_python_path: Path | None = None) -> Pair:
    """A host and guest mux joined by a Unix socket, each with its key file (None: none).
    ``guest_python_path``: run the guest from that source tree (an older release)."""
    tunnel = root / "vm1.sock"
    tun = "ping_interval = 0.5\ndead_after = 3.0\nbackoff_initial = 0.1\nbackoff_max = 1.0\n"
    gkey = f'key_file = "{_key_file(root / "guest.key", guest_key)}"\n' if guest_key else ""
    hkey = f'key_file = "{_key_file(root / "host.key", host_key)}"\n' if host_key else ""
    g = write_config(root / "guest.toml", (
        f'role = "guest"\nname = "guest1"\nrun_dir = "{root}/guest-run"\n'
        f'state_dir = "{root}/guest-state"\n'
        f'[tunnel]\nlisten = "unix:{tunnel}"\n{tun}{gkey}'
        f'[control]\nlisten = "127.0.0.1:{free_port()}"\n'))
    h = write_config(root / "host.toml", (
        f'role = "host"\nname = "host"\nrun_dir = "{root}/host-run"\n'
        f'state_dir = "{root}/host-state"\n'
        f'[tunnel]\n{tun}'
        f'[host]\nkeep_connected = true\n'
        f'[[vms]]\nvmid = "vm1"\naddress = "unix:{tunnel}"\n{hkey}'
        f'[control]\nlisten = "127.0.0.1:{free_port()}"\n'))
    guest = MuxProc("guest", g, root / "guest.log")
    if guest_python_path is not None:
        guest.extra_env = {"PYTHONPATH": str(guest_python_path)}
    pair = Pair(root, MuxProc("host", h, root / "host.log"), guest, tunnel)
    pair.guest.start()
    pair.host.start()
    return pair


@pytest.fixture
def pairs() -> Iterator[list[Pair]]:
    made: list[Pair] = []
    yield made
    for p in made:
        p.stop()


async def _host_error(pair: Pair, contains: str, timeout: float = 15.0) -> str:
    """Wait until the host's status for vm1 shows ``contains`` in last_error; returns it."""
    host = await link_for(pair.host, "t-host", [Entity.CMD_LISTENER])
    try:
        last: dict[str, Any] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            last = (await host.control({"cmd": "status"}))["vms"][0]
            assert last["state"] != "connected", last
            if contains in (last["last_error"] or ""):
                return str(last["last_error"])
            await asyncio.sleep(0.1)
        raise AssertionError(f"vm1's last_error never showed {contains!r}: {last}")
    finally:
        await host.close()


def test_host_and_guest_with_the_same_key_connect(tmp_path: Path, pairs: list[Pair]) -> None:
    key = os.urandom(24).hex().encode()
    pair = make_keyed_pair(tmp_path, key, key)
    pairs.append(pair)

    async def echo(msg: Inbound) -> Any:
        return {"echo": msg.body}

    async def scenario() -> None:
        guest = await link_for(pair.guest, "t-guest", [Entity.CMD_EXECUTOR],
                               [(Entity.CMD_LISTENER, ECHO, echo)])
        host = await link_for(pair.host, "t-host", [Entity.CMD_LISTENER])
        await wait_state(host, "vm1", "connected")
        assert await host.request_body("vm1", Entity.CMD_LISTENER, ECHO, 7) == {"echo": 7}
        assert (await host.control({"cmd": "ping", "vmid": "vm1"}))["rtt_ms"] > 0
        await host.close()
        await guest.close()

    run(scenario())
    assert "the guest proved the shared key" in pair.host.log()
    assert "the host proved the shared key" in pair.guest.log()
    assert key.decode() not in pair.host.log() + pair.guest.log()


def test_a_wrong_key_is_refused_with_the_reason_in_status(tmp_path: Path,
                                                          pairs: list[Pair]) -> None:
    pair = make_keyed_pair(tmp_path, b"h" * 32, b"g" * 32)
    pairs.append(pair)
    error = run(_host_error(pair, "key proof is wrong"))
    assert "peer refused" in error and "differs from the guest's" in error
    assert "refused a host connection" in pair.guest.log()


def test_a_guest_with_a_key_refuses_a_host_without_one(tmp_path: Path,
                                                       pairs: list[Pair]) -> None:
    pair = make_keyed_pair(tmp_path, None, b"g" * 32)
    pairs.append(pair)
    run(_host_error(pair, "this guest requires the shared key (tunnel.key_file): the host "
                          "has no key for this VM"))


def test_a_host_with_a_key_refuses_a_guest_without_one(tmp_path: Path,
                                                       pairs: list[Pair]) -> None:
    pair = make_keyed_pair(tmp_path, b"h" * 32, None)
    pairs.append(pair)
    run(_host_error(pair, "holds a key for this VM (vms[].key_file) but this guest has none"))


def test_a_key_file_others_can_read_stops_the_guest_with_one_line(tmp_path: Path) -> None:
    key = _key_file(tmp_path / "g.key", b"g" * 32)
    os.chmod(key, 0o644)
    cfg = write_config(tmp_path / "guest.toml", (
        f'role = "guest"\nrun_dir = "{tmp_path}/run"\nstate_dir = "{tmp_path}/state"\n'
        f'[tunnel]\nlisten = "unix:{tmp_path}/t.sock"\nkey_file = "{key}"\n'))
    out = subprocess.run([str(Path(sys.executable).parent / "vmbusify"), "mux", "--config",
                          str(cfg)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode != 0
    assert f"group or others may read or write it (mode 0644): chmod 600 {key}" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


# -- a would-be host speaking the wire by hand ---------------------------------------------

def _intruder(path: Path, *after_hello: bytes) -> list[Package]:
    """Connect as a host with a key it does not have: HELLO, then ``after_hello`` in the
    same write; returns what the guest sent until it hung up."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    hello = Hello("host", "intruder", "9", nonce=auth.new_nonce(),
                  features=auth.features(True))
    s.sendall(hello.package().encode() + b"".join(after_hello))
    try:
        return read_packages_until_closed(s)
    finally:
        s.close()


def _request(message_id: int) -> bytes:
    return Package(type=PackageType.REQUEST, entity=Entity.CMD_LISTENER, id=1,
                   message_id=message_id, payload=dumps({"x": 1})).encode()


def test_a_guest_with_a_key_dispatches_nothing_before_the_hosts_proof(
        tmp_path: Path, pairs: list[Pair]) -> None:
    """Requests sent right behind a wrong proof, or instead of one, never reach a worker;
    the intruder gets the guest's HELLO (nonce, no secret) and a BYE saying why."""
    key = b"k" * 32
    pair = make_keyed_pair(tmp_path, key, key)
    pairs.append(pair)

    async def scenario() -> None:
        reached: list[Any] = []

        async def handler(msg: Inbound) -> Any:
            reached.append(msg.body)
            return "ran"

        guest = await link_for(pair.guest, "t-guest", [Entity.CMD_EXECUTOR],
                               [(Entity.CMD_LISTENER, ECHO, handler)])
        host = await link_for(pair.host, "t-host", [Entity.CMD_LISTENER])
        await wait_state(host, "vm1", "connected")
        await host.control({"cmd": "disconnect", "vmid": "vm1"})
        await asyncio.sleep(0.3)
        wrong = Auth(os.urandom(PROOF_SIZE)).package().encode()
        got = await asyncio.to_thread(_intruder, pair.tunnel_path, wrong, _request(ECHO))
        kinds = [p.message_id for p in got]
        assert kinds == [TunnelMessage.HELLO, TunnelMessage.BYE], got
        assert Bye.from_payload(got[1].payload).reason == auth.WRONG_HOST_PROOF
        got = await asyncio.to_thread(_intruder, pair.tunnel_path, _request(ECHO))
        assert [p.message_id for p in got] == [TunnelMessage.HELLO], got  # closed: no AUTH
        await asyncio.sleep(0.5)
        assert reached == []
        assert "expected AUTH" in pair.guest.log()
        # and the real host still gets in
        await host.control({"cmd": "connect", "vmid": "vm1", "timeout": 10}, timeout=15)
        assert await host.request_body("vm1", Entity.CMD_LISTENER, ECHO, 1) == "ran"
        await host.close()
        await guest.close()

    run(scenario())


# -- a guest of the previous release ---------------------------------------------------------

def _old_release(dest: Path) -> Path:
    """The source tree of OLD_RELEASE (from git, or the archive the repository ships)."""
    _commit, tar = release_tar(OLD_RELEASE)
    dest.mkdir()
    subprocess.run(["tar", "-x", "-C", str(dest), "vmbusify"], input=tar, check=True)
    return dest


def test_a_guest_of_the_previous_release_is_served(tmp_path: Path, pairs: list[Pair]) -> None:
    """Guests are upgraded last: this host (no key) connects to a v0.1.0 guest mux, and
    HELLO, a ping and a request work. The host's new HELLO fields must not trip it."""
    old = _old_release(tmp_path / "old")
    pair = make_keyed_pair(tmp_path, None, None, guest_python_path=old)
    pairs.append(pair)

    async def scenario() -> None:
        host = await link_for(pair.host, "t-host", [Entity.CMD_LISTENER])
        vm = await wait_state(host, "vm1", "connected")
        assert vm["peer_version"] == "0.1.0"
        assert (await host.control({"cmd": "ping", "vmid": "vm1"}))["rtt_ms"] > 0
        # the old guest's own bus and control answer too (its status says connected)
        guest_status = await asyncio.to_thread(_old_guest_status, pair, old)
        assert '"connected"' in guest_status
        await asyncio.sleep(1.5)  # a few pings each way: still up
        vm = await wait_state(host, "vm1", "connected")
        assert vm["guest_stats"] is None  # 0.1.0 sends no STATS (feature "stats")
        await host.close()

    run(scenario())
    # the guest really was the old code: its HELLO listed no features
    assert "vm=vm1: the guest lists no features" in pair.host.log()
    log = pair.guest.log()
    assert "Traceback" not in log and "protocol error" not in log, log


#: A worker of the previous release in the old guest: it refuses message 902 (as 0.1.0's link
#: does: the reason alone goes back), then asks the host for 903 (nobody handles it there) and
#: 904 (the host's handler refuses) and prints what its own link made of the answers.
_OLD_WORKER = """
import asyncio, sys
from vmbusify.bus.link import WorkerLink
from vmbusify.config import load_config
from vmbusify.errors import TunnelError, VMBusifyError

async def main():
    link = WorkerLink(load_config(sys.argv[1]), "t-old", [2])

    async def refuse(msg):
        raise VMBusifyError("old guest: refused, as 0.1.0 says it")

    link.route(1, 902, refuse)
    await link.start(wait=15)
    for mid in (903, 904):
        try:
            await link.sync_send(None, 2, mid, {}, timeout=10)
            print("OK", mid, flush=True)
        except TunnelError as exc:
            print("ERR", mid, type(exc).__name__, exc, flush=True)
    print("READY", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_errors_cross_to_and_from_a_guest_of_the_previous_release_as_plain_text(
        tmp_path: Path, pairs: list[Pair]) -> None:
    """A v0.1.0 peer sends and expects the reason alone (its decoder refuses unknown flag
    bits, so nothing new may be flagged): the host's mux turns its plain reasons into the
    coded form for the host's workers (code GENERIC), and the host's coded ones into plain
    text for it. Every reason reads as it was written, both ways."""
    old = _old_release(tmp_path / "old")
    pair = make_keyed_pair(tmp_path, None, None, guest_python_path=old)
    pairs.append(pair)

    async def scenario() -> None:
        async def limited(msg: Inbound) -> Any:
            raise LimitReached("host: 3 requests in flight: limit reached")

        host = await link_for(pair.host, "t-host", [Entity.CMD_LISTENER],
                              [(Entity.CMD_EXECUTOR, 904, limited)])
        await wait_state(host, "vm1", "connected")
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _OLD_WORKER, str(pair.guest.config_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env=_old_guest_env(old), cwd=str(old.parent))
        try:
            assert worker.stdout is not None
            lines: list[str] = []
            while not lines or lines[-1] != "READY":
                line = await asyncio.wait_for(worker.stdout.readline(), 60)
                assert line, "the old worker ended: " + "\n".join(lines)
                lines.append(line.decode().strip())
            # the old guest's link read the host's answers as 0.1.0 wrote them
            assert lines[-3:] == [
                "ERR 903 TunnelError no worker on host handles cmd-executor message 903",
                "ERR 904 TunnelError host: 3 requests in flight: limit reached",
                "READY"]
            # and the host reads the old guest's plain reasons (code GENERIC)
            with pytest.raises(TunnelError) as refused:
                await host.request_body("vm1", Entity.CMD_LISTENER, 902, {}, timeout=10)
            assert str(refused.value) == "old guest: refused, as 0.1.0 says it"
            assert refused.value.code is ErrorCode.GENERIC
            with pytest.raises(TunnelError) as nobody:
                await host.request_body("vm1", Entity.CMD_LISTENER, 905, {}, timeout=10)
            assert str(nobody.value) == "no worker on guest1 handles cmd-listener message 905"
            # the tunnel is still up: nothing confused either end
            assert (await host.control({"cmd": "ping", "vmid": "vm1"}))["rtt_ms"] > 0
        finally:
            worker.kill()
            await worker.wait()
            await host.close()

    run(scenario())
    log = pair.guest.log()
    assert "Traceback" not in log and "protocol error" not in log, log


def test_a_host_with_a_key_refuses_a_guest_of_the_previous_release(
        tmp_path: Path, pairs: list[Pair]) -> None:
    old = _old_release(tmp_path / "old")
    pair = make_keyed_pair(tmp_path, b"h" * 32, None, guest_python_path=old)
    pairs.append(pair)
    run(_host_error(pair, "the guest is older than this host and cannot prove a key"))


def _old_guest_env(old: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(old)}


def _old_guest_status(pair: Pair, old: Path) -> str:
    """`vmbusify`'s bus status from the old guest's own code (ctl over its ZeroMQ bus)."""
    code = ("import asyncio, json, sys\n"
            "from vmbusify.bus.link import WorkerLink\n"
            "from vmbusify.config import load_config\n"
            "async def main():\n"
            "    link = WorkerLink(load_config(sys.argv[1]), 't-old', [])\n"
            "    await link.start(wait=15)\n"
            "    print(json.dumps(await link.control({'cmd': 'status'})))\n"
            "    await link.close()\n"
            "asyncio.run(main())\n")
    out = subprocess.run([sys.executable, "-c", code, str(pair.guest.config_path)],
                         capture_output=True, text=True, env=_old_guest_env(old),
                         cwd=str(old.parent), timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout
