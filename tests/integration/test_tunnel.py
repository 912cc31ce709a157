"""The tunnel between two real mux processes, with workers on the real ZeroMQ bus."""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import (
    Pair,
    link_for,
    make_pair,
    read_packages_until_closed,
    wait_state,
)
from vmbusify.bus.frames import RouteKind
from vmbusify.bus.link import Inbound, WorkerLink
from vmbusify.errors import RequestTimeout, TunnelError
from vmbusify.protocol.entities import Entity, TunnelMessage
from vmbusify.protocol.package import PackageType
from vmbusify.protocol.tunnel import Bye, Hello
from vmbusify.protocol.window import INITIAL_WINDOW

ECHO = 901
OPEN = 902
DATA = 903


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = make_pair(tmp_path)
    yield p
    p.stop()


async def echo(msg: Inbound) -> Any:
    return {"echo": msg.body, "from": msg.vmid}


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_connects_and_reports_status(pair: Pair) -> None:
    async def scenario() -> None:
        host = await link_for(pair.host, "t-host", [Entity.CMD_LISTENER])
        vm = await wait_state(host, "vm1", "connected")
        assert vm["rtt_ms"] is None or vm["rtt_ms"] >= 0
        await asyncio.sleep(1.2)  # a couple of pings
        vm = await wait_state(host, "vm1", "connected")
        assert vm["rtt_ms"] is not None and vm["rtt_ms"] > 0
        assert vm["hostname"] == "guest1"
        assert vm["bytes_in"] > 0 and vm["bytes_out"] > 0
        for ip in vm["ips"]:
            assert await host.control({"cmd": "vmid", "ip": ip}) == "vm1"
        with pytest.raises(Exception, match="no VM reported"):
            await host.control({"cmd": "vmid", "ip": "192.0.2.99"})
        ping = await host.control({"cmd": "ping", "vmid": "vm1"})
        assert ping["rtt_ms"] > 0
        guest = await link_for(pair.guest, "t-guest", [Entity.CMD_EXECUTOR])
        st = await guest.control({"cmd": "status"})
        assert st["role"] == "guest" and st["vms"][0]["state"] == "connected"
        assert {w["name"] for w in st["workers"]} == {"t-guest"}
        await host.close()
        await guest.close()

    run(scenario())


def test_sync_and_async_send_both_ways(pair: Pair) -> None:
    async def scenario() -> None:
        got: asyncio.Queue[Inbound] = asyncio.Queue()

        async def collect(msg: Inbound) -> None:
            await got.put(msg)

        guest = await link_for(pair.guest, "t-guest", [Entity.CMD_EXECUTOR],
                               [(Entity.CMD_LISTENER, ECHO, echo),
                                (Entity.CMD_LISTENER, ECHO + 1, collect, RouteKind.MESSAGE)])
        host = await link_for(pair.host, "t-host", [Entity.CMD_LISTENER],
                              [(Entity.CMD_EXECUTOR, ECHO, echo)])
        await wait_state(host, "vm1", "connected")
        reply = await host.request_body("vm1", Entity.CMD_LISTENER, ECHO, {"x": 1})
        assert reply == {"echo": {"x": 1}, "from": "host"}
        reply = await guest.request_body(None, Entity.CMD_EXECUTOR, ECHO, [1, 2])
        assert reply == {"echo": [1, 2], "from": "vm1"}
        await host.send_body("vm1", Entity.CMD_LISTENER, ECHO + 1, "hi")
        msg = await asyncio.wait_for(got.get(), 5)
        assert msg.body == "hi" and msg.vmid == "host"
        # nobody handles this one: a clear error, not a hang
        with pytest.raises(TunnelError, match="no worker"):
            await host.request_body("vm1", Entity.CMD_LISTENER, 4242, None, timeout=5)
        with pytest.raises(TunnelError, match="unknown VM"):
            await host.request_body("nope", Entity.CMD_LISTENER, ECHO, None, timeout=5)
        await host.close()
        await guest.close()

    run(scenario())


def test_a_request_for_a_worker_that_went_away_fails_at_once(pair: Pair) -> None:
    """A worker that stopped (its socket closed, no goodbye) is found gone when a request is
    routed to it: the sender gets "no worker" at once, not a timeout."""
    async def scenario() -> None:
        guest = await link_for(pair.guest, "t-guest", [Entity.CMD_EXECUTOR],
                               [(Entity.CMD_LISTENER, ECHO, echo)])
        host = await link_for(pair.host, "t-host", [Entity.CMD_LISTENER])
        await wait_state(host, "vm1", "connected")
        assert (await host.request_body("vm1", Entity.CMD_LISTENER, ECHO, 1))["echo"] == 1
        await guest.close()
        await asyncio.sleep(0.5)  # as `supervisorctl stop` leaves it: the socket is closed
        start = time.monotonic()
        with pytest.raises(TunnelError, match="no worker"):
            await host.request_body("vm1", Entity.CMD_LISTENER, ECHO, 2, timeout=8)
        assert time.monotonic() - start < 3
        await host.close()

    run(scenario())


def test_a_worker_that_stops_is_forgotten_at_once(pair: Pair) -> None:
    """A worker closing its link says goodbye: the mux's status drops it at once (not after
    the heartbeat's silence) and the far side is told its streams are gone."""
    async def scenario() -> None:
        host = await link_for(pair.host, "t-host", [Entity.CMD_LISTENER])
        await wait_state(host, "vm1", "connected")
        lost: asyncio.Queue[list[int]] = asyncio.Queue()

        async def on_event(event: Any, vmid: str, info: dict[str, Any]) -> None:
            if event.value == "peer-lost":
                await lost.put(list(info["entities"]))

        host.on_event(on_event)
        guest = await link_for(pair.guest, "t-guest", [Entity.CMD_EXECUTOR])
        gstatus = await link_for(pair.guest, "t-status", [])
        names = {w["name"] for w in (await gstatus.control({"cmd": "status"}))["workers"]}
        assert "t-guest" in names
        await guest.close()
        start = time.monotonic()
        while "t-guest" in {w["name"] for w in
                            (await gstatus.control({"cmd": "status"}))["workers"]}:
            assert time.monotonic() - start < 1.5, "the stopped worker is still listed"
            await asyncio.sleep(0.05)
        assert await asyncio.wait_for(lost.get(), 2) == [int(Entity.CMD_EXECUTOR)]
        await gstatus.close()
        await host.close()

    run(scenario())


def test_every_handler_runs_and_the_first_registered_answers(pair: Pair) -> None:
    async def scenario() -> None:
        ran: dict[str, asyncio.Event] = {"first": asyncio.Event(), "second": asyncio.Event()}

        def handler(name: str) -> Any:
            async def h(msg: Inbound) -> Any:
                if name == "first":
                    await asyncio.sleep(0.2)  # the slower one still gives the reply
                ran[name].set()
                return name
            return h

        first = await link_for(pair.guest, "first", [Entity.CMD_EXECUTOR],
                               [(Entity.CMD_LISTENER, ECHO, handler("first"))])
        # The others get a copy as a one-way MESSAGE: a route of that kind takes it.
        second = await link_for(pair.guest, "second", [Entity.CMD_EXECUTOR],
                                [(Entity.CMD_LISTENER, ECHO, handler("second"),
                                  RouteKind.MESSAGE)])
        host = await link_for(pair.host, "t-host", [Entity.CMD_LISTENER])
        await wait_state(host, "vm1", "connected")
        for _ in range(5):
            for ev in ran.values():
                ev.clear()
            assert await host.request_body("vm1", Entity.CMD_LISTENER, ECHO, None) == "first"
            await asyncio.wait_for(ran["second"].wait(), 5)
        for link in (first, second, host):
            await link.close()

    run(scenario())


async def _stream_pair(host: WorkerLink, guest: WorkerLink, accepted: asyncio.Queue[Any]
                       ) -> Any:
    s = await host.open_stream("vm1", Entity.PROXY_CLIENT, Entity.PROXY_SERVER, DATA)
    await host.request_body("vm1", Entity.PROXY_CLIENT, OPEN, {}, stream=s.id)
    return s, await asyncio.wait_for(accepted.get(), 5)


@dataclass
class StreamWorkers:
    """A proxy-client-like worker on the host and a proxy-server-like one in the guest."""

    host: WorkerLink
    guest: WorkerLink
    accepted: asyncio.Queue[Any]

    async def pair(self) -> Any:
        """Open a stream from the host; returns (host end, guest end)."""
        return await _stream_pair(self.host, self.guest, self.accepted)

    async def close(self) -> None:
        await self.host.close()
        await self.guest.close()


async def stream_workers(pair: Pair, extra_guest_routes: list[Any] | None = None
                         ) -> StreamWorkers:
    """Both workers registered, the guest accepting every OPEN as a stream, vm1 connected."""
    accepted: asyncio.Queue[Any] = asyncio.Queue()
    guest: WorkerLink

    async def on_open(msg: Inbound) -> Any:
        await accepted.put(guest.streams.accept(msg.vmid, Entity.PROXY_SERVER, msg.package,
                                                DATA))
        return True

    guest = await link_for(pair.guest, "t-guest", [Entity.PROXY_SERVER],
                           [(Entity.PROXY_CLIENT, OPEN, on_open),
                            (Entity.PROXY_CLIENT, DATA, None), *(extra_guest_routes or [])])
    host = await link_for(pair.host, "t-host", [Entity.PROXY_CLIENT],
                          [(Entity.PROXY_SERVER, DATA, None)])
    await wait_state(host, "vm1", "connected")
    return StreamWorkers(host, guest, accepted)



def test_no_head_of_line_blocking(pair: Pair) -> None:
    """A stream whose reader never reads stalls itself only; other round trips keep speed."""

    async def scenario() -> None:
        w = await stream_workers(pair, [(Entity.PROXY_CLIENT, ECHO, echo)])
        host, guest = w.host, w.guest

        async def round_trips(n: int) -> list[float]:
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                await host.request_body("vm1", Entity.PROXY_CLIENT, ECHO, b"x" * 64)
                times.append(time.perf_counter() - t0)
            return times

        idle = statistics.median(await round_trips(200))
        # an echo stream that is read keeps working alongside
        live_h, live_g = await w.pair()
        # the stalled stream: its guest end never reads
        stalled_h, stalled_g = await w.pair()
        blob = b"z" * (256 << 10)

        async def flood() -> int:
            sent = 0
            while True:
                await stalled_h.write(blob)
                sent += len(blob)

        flooder = asyncio.ensure_future(flood())
        await asyncio.sleep(1.0)
        assert not flooder.done()
        # the window caps what is in flight, and the guest holds no more than one window
        assert stalled_h.bytes_out <= INITIAL_WINDOW
        assert stalled_g.buffered <= INITIAL_WINDOW
        busy = statistics.median(await round_trips(200))
        # the live stream still moves data both ways
        await live_h.write(b"ping" * 1000)
        got = b""
        while len(got) < 4000:
            got += await asyncio.wait_for(live_g.read(), 5)
        assert got == b"ping" * 1000
        flooder.cancel()
        assert busy <= 3 * idle + 0.002, (idle, busy)
        # reading the stalled stream releases the writer: credit flows again
        total = 0
        while total < INITIAL_WINDOW:
            total += len(await asyncio.wait_for(stalled_g.read(), 5))
        await host.close()
        await guest.close()

    run(scenario())


def test_stream_bytes_arrive_intact_with_half_close(pair: Pair) -> None:
    async def scenario() -> None:
        w = await stream_workers(pair)
        host, guest = w.host, w.guest
        h, g = await w.pair()
        payload = bytes(range(256)) * 40000  # ~10 MiB, more than two windows

        async def send() -> None:
            await h.write(payload)
            await h.write_eof()

        sender = asyncio.ensure_future(send())
        got = bytearray()
        while chunk := await asyncio.wait_for(g.read(), 10):
            got += chunk
        await sender
        assert bytes(got) == payload
        # half-closed: the guest can still answer
        await g.write(b"reply")
        await g.write_eof()
        assert await asyncio.wait_for(h.read(), 5) == b"reply"
        assert await asyncio.wait_for(h.read(), 5) == b""
        await host.close()
        await guest.close()

    run(scenario())


def _raw_connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


async def _bye_reason(pair: Pair, hello: Hello) -> str:
    """Connect to the guest's tunnel socket as a would-be host saying ``hello``: the guest's
    answer must be a BYE; returns its reason."""
    s = _raw_connect(pair.tunnel_path)
    s.sendall(hello.package().encode())
    pkgs = await asyncio.to_thread(read_packages_until_closed, s)
    s.close()
    assert pkgs and pkgs[0].type is PackageType.MESSAGE, pkgs
    assert pkgs[0].message_id == TunnelMessage.BYE, pkgs  # not a HELLO
    return Bye.from_payload(pkgs[0].payload).reason


async def _host_with_vm1_disconnected(pair: Pair) -> WorkerLink:
    """A host worker link, once vm1 connected and was then told to disconnect (so the guest
    waits for a new host connection)."""
    host = await link_for(pair.host, "t-host", [Entity.CMD_LISTENER])
    await wait_state(host, "vm1", "connected")
    await host.control({"cmd": "disconnect", "vmid": "vm1"})
    return host


def test_second_host_connection_is_refused(pair: Pair) -> None:
    async def scenario() -> None:
        host = await link_for(pair.host, "t-host", [Entity.CMD_LISTENER])
        await wait_state(host, "vm1", "connected")
        reason = await _bye_reason(pair, Hello("host", "intruder", "0"))
        assert "another host connection is live" in reason
        await wait_state(host, "vm1", "connected")  # the first one is untouched
        await host.close()

    run(scenario())


def test_garbage_is_dropped_and_the_guest_keeps_serving(pair: Pair) -> None:
    async def scenario() -> None:
        host = await _host_with_vm1_disconnected(pair)
        rss_before = pair.guest.rss()
        bad_header = bytearray(Hello("host", "x", "0").package().encode()[:24])
        bad_sig = b"XXXX" + bytes(bad_header[4:])
        huge = bytes(bad_header[:20]) + (0xFFFFFFFF).to_bytes(4, "big")
        for junk in (b"GET / HTTP/1.1\r\n\r\n" * 100, bad_sig, huge + b"\0" * 65536):
            s = _raw_connect(pair.tunnel_path)
            try:
                s.sendall(junk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            # returns once the guest hangs up
            await asyncio.to_thread(read_packages_until_closed, s)
            s.close()
        await asyncio.sleep(0.5)
        log = pair.guest.log()
        assert "bad signature" in log and "exceeds the maximum" in log
        assert pair.guest.proc is not None and pair.guest.proc.poll() is None
        assert pair.guest.rss() < rss_before + 8 * 1024 * 1024
        await host.control({"cmd": "connect", "vmid": "vm1", "timeout": 10}, timeout=15)
        await wait_state(host, "vm1", "connected")
        await host.close()

    run(scenario())


def test_tunnel_comes_back_after_either_mux_is_killed(pair: Pair) -> None:
    async def scenario() -> None:
        host = await link_for(pair.host, "t-host", [Entity.CMD_LISTENER])
        await wait_state(host, "vm1", "connected")
        pair.guest.kill()
        pair.guest.start()
        await wait_state(host, "vm1", "connected", timeout=20)
        await host.close()
        pair.host.kill()
        pair.host.start()
        host = await link_for(pair.host, "t-host", [Entity.CMD_LISTENER])
        await wait_state(host, "vm1", "connected", timeout=20)
        await host.close()

    run(scenario())


def test_a_frozen_guest_is_noticed_and_the_pending_call_fails(pair: Pair) -> None:
    import signal

    async def scenario() -> None:
        host = await link_for(pair.host, "t-host", [Entity.CMD_LISTENER])
        await wait_state(host, "vm1", "connected")
        pair.guest.kill(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises((TunnelError, RequestTimeout)):
                await host.request_body("vm1", Entity.CMD_LISTENER, ECHO, None, timeout=30)
            # dead_after is 3 s in this pair
            assert time.monotonic() - t0 < 10
            st = await host.control({"cmd": "status"})
            assert st["vms"][0]["state"] != "connected"
            assert "stopped answering" in pair.host.log()
        finally:
            pair.guest.kill(signal.SIGCONT)
        await wait_state(host, "vm1", "connected", timeout=20)
        await host.close()

    run(scenario())


def test_on_demand_connect_when_a_vm_is_first_addressed(tmp_path: Path) -> None:
    pair = make_pair(tmp_path, keep_connected=False)

    async def scenario() -> None:
        guest = await link_for(pair.guest, "t-guest", [Entity.CMD_EXECUTOR],
                               [(Entity.CMD_LISTENER, ECHO, echo)])
        host = await link_for(pair.host, "t-host", [Entity.CMD_LISTENER])
        await asyncio.sleep(1.0)
        st = await host.control({"cmd": "status"})
        assert st["vms"][0]["state"] == "disconnected"  # nobody asked for vm1 yet
        reply = await host.request_body("vm1", Entity.CMD_LISTENER, ECHO, "first", timeout=10)
        assert reply == {"echo": "first", "from": "host"}
        await wait_state(host, "vm1", "connected")
        await host.close()
        await guest.close()

    try:
        run(scenario())
    finally:
        pair.stop()


def test_dead_peer_noticed_within_dead_after(tmp_path: Path) -> None:
    import signal
    pair = make_pair(tmp_path, ping_interval=1.0, dead_after=2.0)

    async def scenario() -> None:
        host = await link_for(pair.host, "t-host", [Entity.CMD_LISTENER])
        await wait_state(host, "vm1", "connected")
        pair.guest.kill(signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            while (await host.control({"cmd": "status"}))["vms"][0]["state"] == "connected":
                assert time.monotonic() - t0 < 10, "the frozen guest was never noticed"
                await asyncio.sleep(0.05)
            # the guest's last byte came at most one ping interval before the freeze
            assert time.monotonic() - t0 < 2.0 + 1.0
        finally:
            pair.guest.kill(signal.SIGCONT)
        await host.close()

    try:
        run(scenario())
    finally:
        pair.stop()


def test_streams_of_a_dead_peer_worker_are_reset(pair: Pair) -> None:
    """A worker that dies without a word: the far side's streams with it are reset."""
    from vmbusify.bus.streams import StreamReset

    async def scenario() -> None:
        w = await stream_workers(pair)
        host, guest = w.host, w.guest
        _h, g = await w.pair()
        await host.close()  # gone: no more heartbeats, no goodbye
        t0 = time.monotonic()
        with pytest.raises(StreamReset, match="went away"):
            await asyncio.wait_for(g.read(), 15)
        assert time.monotonic() - t0 < 10
        await guest.close()

    run(scenario())


def test_silent_connections_do_not_hold_the_real_host_out(pair: Pair) -> None:
    """Connections that send nothing (or half a package) wait for their HELLO side by side:
    the real host gets back in at once, not after connect_timeout (5 s) per silent one."""
    async def scenario() -> None:
        host = await _host_with_vm1_disconnected(pair)
        half = Hello("host", "x", "0").package().encode()[:30]
        silent = [_raw_connect(pair.tunnel_path) for _ in range(4)]
        silent[0].sendall(half)
        await asyncio.sleep(0.3)  # the guest has taken them all
        t0 = time.monotonic()
        await host.control({"cmd": "connect", "vmid": "vm1", "timeout": 15}, timeout=20)
        await wait_state(host, "vm1", "connected")
        assert time.monotonic() - t0 < 3, "the host waited behind the silent connections"
        for s in silent:
            s.close()
        await host.close()

    run(scenario())


def test_a_hello_of_another_protocol_version_gets_a_bye_saying_so(pair: Pair) -> None:
    async def scenario() -> None:
        host = await _host_with_vm1_disconnected(pair)
        reason = await _bye_reason(pair, Hello("host", "future", "9", protocol_version=2))
        assert "protocol version 2 is not supported" in reason
        await host.close()

    run(scenario())
