"""A worker keeps serving whatever the peer sends it, and one whose loop is stuck is not
called healthy: real mux processes, real ZeroMQ, the real WorkerLink (issue 12)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import Pair, link_for, make_pair, wait_state
from tests.integration.stuck_worker import ECHO as STUCK_ECHO
from tests.integration.stuck_worker import HANG
from vmbusify.bus.frames import RouteKind
from vmbusify.bus.link import STALL_EXIT_CODE, Inbound, WorkerLink
from vmbusify.bus.streams import StreamReset
from vmbusify.errors import TunnelError
from vmbusify.protocol.entities import Entity
from vmbusify.protocol.package import Package, PackageType
from vmbusify.protocol.window import encode_increment

ECHO, NOTE, BOOM, BOOM_REQ, OPEN, DATA = 921, 922, 923, 924, 925, 926


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = make_pair(tmp_path)
    yield p
    p.stop()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


async def guest_limits(status_link: WorkerLink, worker: str) -> dict[str, int]:
    """The limit counters ``worker`` published for the host, as `vmbusifyctl status` shows."""
    st = await status_link.control({"cmd": "status"})
    stats = next(w["stats"] for w in st["workers"] if w["name"] == worker)
    return dict(stats.get("limits", {}).get("host", {}))


def test_raising_handlers_and_wrong_types_do_not_stop_the_worker(pair: Pair) -> None:
    async def scenario() -> None:
        ran: list[str] = []
        accepted: asyncio.Queue[Any] = asyncio.Queue()
        guest: WorkerLink

        async def echo(msg: Inbound) -> Any:
            ran.append("echo")
            return msg.body

        async def note(msg: Inbound) -> None:
            ran.append(f"note {msg.body}")

        async def boom(msg: Inbound) -> Any:
            ran.append("boom")
            raise RuntimeError("a bug in a handler")

        async def on_open(msg: Inbound) -> Any:
            await accepted.put(guest.streams.accept(msg.vmid, Entity.CMD_EXECUTOR, msg.package,
                                                    DATA))
            return True

        guest = await link_for(pair.guest, "t-guest", [Entity.CMD_EXECUTOR], [
            (Entity.CMD_LISTENER, ECHO, echo, RouteKind.REQUEST),
            (Entity.CMD_LISTENER, NOTE, note, RouteKind.MESSAGE),
            (Entity.CMD_LISTENER, BOOM, boom, RouteKind.MESSAGE),
            (Entity.CMD_LISTENER, BOOM_REQ, boom, RouteKind.REQUEST),
            (Entity.CMD_LISTENER, OPEN, on_open, RouteKind.REQUEST),
            (Entity.CMD_LISTENER, DATA, None, RouteKind.STREAM)])
        host = await link_for(pair.host, "t-host", [Entity.CMD_LISTENER],
                              [(Entity.CMD_EXECUTOR, DATA, None, RouteKind.STREAM)])
        await wait_state(host, "vm1", "connected")

        # a one-way MESSAGE where a request is due: its handler never runs
        await host.send_body("vm1", Entity.CMD_LISTENER, ECHO, "as a message")
        # a REQUEST where a message is due: refused at once, saying why
        with pytest.raises(TunnelError, match="wrong package type"):
            await host.request_body("vm1", Entity.CMD_LISTENER, NOTE, "as a request", timeout=5)
        # handlers that raise, inline and in a task
        for _ in range(3):
            await host.send_body("vm1", Entity.CMD_LISTENER, BOOM, None)
        with pytest.raises(TunnelError, match="t-guest: internal error"):
            await host.request_body("vm1", Entity.CMD_LISTENER, BOOM_REQ, None, timeout=5)
        # ... and the worker keeps serving, in order
        await host.send_body("vm1", Entity.CMD_LISTENER, NOTE, 1)
        assert await host.request_body("vm1", Entity.CMD_LISTENER, ECHO, "still", timeout=5) \
            == "still"
        assert ran == ["boom"] * 4 + ["note 1", "echo"]

        # a peer granting itself credit it was never owed: that stream is reset, and only it
        s = await host.open_stream("vm1", Entity.CMD_LISTENER, Entity.CMD_EXECUTOR, DATA)
        assert await host.request_body("vm1", Entity.CMD_LISTENER, OPEN, {}, stream=s.id) is True
        g = await asyncio.wait_for(accepted.get(), 5)
        grab = Package(type=PackageType.WINDOW, entity=Entity.CMD_LISTENER, message_id=DATA,
                       stream=s.id, payload=encode_increment(0xFFFFFFF0))
        await host._send_package("vm1", grab)
        with pytest.raises(StreamReset, match="window"):
            await asyncio.wait_for(s.read(), 5)
        with pytest.raises(StreamReset):
            await g.write(b"x")
        # DATA for that stream, now gone: dropped
        await host._send_package("vm1", Package(type=PackageType.DATA, entity=Entity.CMD_LISTENER,
                                                message_id=DATA, stream=s.id, payload=b"late"))
        assert await host.request_body("vm1", Entity.CMD_LISTENER, ECHO, 2, timeout=5) == 2

        # what the worker counted reaches the status (`vmbusifyctl status`)
        gstatus = await link_for(pair.guest, "t-status", [])
        # The late DATA rides the bulk lane and ECHO the control lane, which is read first:
        # the worker may count the unknown stream after it answered, so wait for the count.
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            await guest.report({"served": len(ran)})
            limits = await guest_limits(gstatus, "t-guest")
            if limits.get("unknown_stream", 0) >= 1 \
                    or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        assert limits["handler_errors"] == 4
        assert limits["credit_resets"] == 1
        assert limits["unknown_stream"] >= 1
        for link in (gstatus, guest, host):
            await link.close()

    run(scenario())


def test_a_worker_whose_loop_is_stuck_stops_its_heartbeat_and_exits_non_zero(
        pair: Pair, tmp_path: Path) -> None:
    """Liveness reflects work: supervisord (autorestart=unexpected) restarts such a worker."""
    stall_after = 1.0
    log_path = tmp_path / "stuck.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("stuck_worker.py")),
             str(pair.guest.config_path), str(stall_after)],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        async def scenario() -> None:
            host = await link_for(pair.host, "t-host", [Entity.CMD_LISTENER])
            await wait_state(host, "vm1", "connected")
            deadline = time.monotonic() + 15
            while b"ready" not in log_path.read_bytes():
                assert time.monotonic() < deadline, log_path.read_text()
                await asyncio.sleep(0.1)
            assert await host.request_body("vm1", Entity.CMD_LISTENER, STUCK_ECHO, None) == "alive"
            # healthy while idle for longer than stall_after
            await asyncio.sleep(2 * stall_after)
            assert proc.poll() is None
            await host.send_body("vm1", Entity.CMD_LISTENER, HANG, None)
            t0 = time.monotonic()
            while proc.poll() is None and time.monotonic() - t0 < stall_after + 10:
                await asyncio.sleep(0.1)
            assert proc.poll() == STALL_EXIT_CODE, log_path.read_text()
            assert time.monotonic() - t0 < stall_after + 5  # a heartbeat or two after
            # the mux forgot it at once (its goodbye), so the peer hears so plainly
            with pytest.raises(TunnelError, match="no worker"):
                await host.request_body("vm1", Entity.CMD_LISTENER, STUCK_ECHO, None, timeout=5)
            await host.close()

        run(scenario())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log_path.read_text()
    assert "finished no message" in text and f"exiting with status {STALL_EXIT_CODE}" in text


def test_every_program_is_restarted_when_it_exits_non_zero() -> None:
    """The stall exit works only if supervisord restarts unexpected exits (and 70 is one)."""
    confs = sorted((Path(__file__).parents[2] / "conf" / "programs").glob("*.conf"))
    assert confs
    for conf in confs:
        text = conf.read_text()
        assert "autorestart=unexpected" in text and "exitcodes=0\n" in text, conf.name


def test_an_exec_past_the_guests_stream_cap_is_refused_with_the_reason(tmp_path: Path) -> None:
    """The user sees why (the cap, in the executor's words), and the next exec works once
    the first is over."""
    from tests.integration.exec_harness import start_stack
    from tests.integration.harness import BIN

    stack = start_stack(tmp_path)
    try:
        # the guest's exec worker again, with a cap of two streams (one attached exec)
        config = stack.pair.guest.config_path
        config.write_text(config.read_text() + "[limits]\nstreams_per_vm = 2\n")
        stack.worker.terminate()
        stack.worker.wait(15)
        with open(tmp_path / "exec-capped.log", "ab") as log:
            stack.worker = subprocess.Popen(
                [str(BIN / "vmbusify"), "worker", "exec", "--config", str(config)],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while stack.run("vm1", "--", "true", timeout=30).returncode != 0:
            assert time.monotonic() < deadline, "the capped executor never answered"
            time.sleep(0.3)
        first = stack.popen("vm1", "--", "sleep", "3", stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # its two streams are open
        proc = stack.run("vm1", "--", "true", timeout=30)
        assert proc.returncode == 255, proc
        assert b"2 streams open: limit reached" in proc.stderr, proc.stderr
        assert first.wait(15) == 0
        assert stack.run("vm1", "--", "true", timeout=30).returncode == 0
    finally:
        stack.stop()
