"""The mux's Tunnel on a socket pair: how its buffered reader meets bad and late bytes."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import socket

import pytest

from vmbusify.config import TunnelConfig
from vmbusify.mux.tunnel import BacklogPool, Tunnel
from vmbusify.protocol.package import Package, PackageType
from vmbusify.protocol.tunnel import Hello, Ping
from vmbusify.runtime import run_async

HELLO = Hello(role="guest", hostname="t", software_version="0").package().encode()


def _tunnel_pair(on_package, config=None):  # type: ignore[no-untyped-def]
    async def make() -> tuple[Tunnel, socket.socket]:
        a, b = socket.socketpair()
        b.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=a)
        return Tunnel(reader, writer, config or TunnelConfig(ping_interval=30, dead_after=60),
                      "t", on_package), b
    return make()


async def _running(tunnel: Tunnel, peer: socket.socket) -> asyncio.Task[str]:
    """The peer says HELLO, the tunnel shakes hands and runs; returns run()'s task."""
    await asyncio.get_running_loop().sock_sendall(peer, HELLO)
    await tunnel.handshake(Hello(role="host", hostname="h", software_version="0"), 5)
    return asyncio.ensure_future(tunnel.run())


@pytest.mark.timeout(30)
def test_garbage_after_the_handshake_closes_with_a_reason_and_no_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        got: list[Package] = []
        tunnel, peer = await _tunnel_pair(lambda t, p: got.append(p))
        loop = asyncio.get_running_loop()
        ok = Package(type=PackageType.MESSAGE, entity=3, message_id=9,
                     payload=b"x" * 100_000).encode()
        await loop.sock_sendall(peer, HELLO + ok)
        await tunnel.handshake(Hello(role="host", hostname="h", software_version="0"), 5)
        runner = asyncio.ensure_future(tunnel.run())
        await loop.sock_sendall(peer, b"\xde\xad\xbe\xef" * 100)
        try:  # more bytes after the bad ones, while the tunnel is closing
            for _ in range(20):
                await loop.sock_sendall(peer, b"junk" * 1000)
                await asyncio.sleep(0.01)
        except OSError:
            pass
        reason = await asyncio.wait_for(runner, 10)
        assert reason.startswith("protocol error: bad signature")
        assert [len(p.payload) for p in got] == [100_000]  # the good package came through whole
        peer.close()

    with caplog.at_level(logging.ERROR):
        run_async(scenario())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.timeout(30)
def test_peer_closing_mid_package_ends_the_tunnel_as_eof() -> None:
    async def scenario() -> None:
        tunnel, peer = await _tunnel_pair(lambda t, p: None)
        loop = asyncio.get_running_loop()
        runner = await _running(tunnel, peer)
        half = Package(type=PackageType.DATA, entity=3, message_id=9, stream=1,
                       payload=b"y" * 500_000).encode()
        await loop.sock_sendall(peer, half[:300_000])
        await loop.sock_recv(peer, 65536)  # our HELLO: unread, it would turn the close into an RST
        peer.close()
        reason = await asyncio.wait_for(runner, 10)
        assert reason == "peer closed the connection"
        assert tunnel.bytes_in >= len(HELLO) + 300_000

    run_async(scenario())


@pytest.mark.timeout(30)
def test_garbage_instead_of_a_hello_fails_the_handshake_without_a_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    """200 KiB of garbage arrive in one go: the decoder dies at the first header while the
    socket still has bytes to read; those must be dropped quietly, not crash the reader."""
    async def scenario() -> None:
        tunnel, peer = await _tunnel_pair(lambda t, p: None)
        await asyncio.get_running_loop().sock_sendall(peer, b"\xde\xad\xbe\xef" * 50_000)
        with pytest.raises(Exception, match="bad signature"):
            await tunnel.handshake(Hello(role="host", hostname="h", software_version="0"), 5)
        await tunnel.abort()
        peer.close()

    with caplog.at_level(logging.ERROR):
        run_async(scenario())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def _ping_flood(count: int) -> bytes:
    return b"".join(Ping(n).package().encode() for n in range(1, count + 1))


@pytest.mark.timeout(30)
def test_a_peer_that_pings_but_never_reads_is_cut_off() -> None:
    """Every PING queues a PONG; a peer that never reads them must not grow the queue without
    end (a guest flooding its host's mux): past the backlog bound the tunnel closes."""
    async def scenario() -> None:
        tunnel, peer = await _tunnel_pair(lambda t, p: None)
        tunnel.backlog_limit = 1 << 20
        loop = asyncio.get_running_loop()
        runner = await _running(tunnel, peer)
        flood = _ping_flood(5000)
        try:
            for _ in range(80):  # far more PONGs than the socket buffers and the bound hold
                if runner.done():
                    break
                await asyncio.wait_for(loop.sock_sendall(peer, flood), 2)
        except (OSError, TimeoutError):
            pass  # the tunnel closed (or stopped reading) under us
        reason = await asyncio.wait_for(runner, 10)
        assert reason.startswith("peer not reading: "), reason
        assert reason.endswith(" bytes waiting"), reason
        assert tunnel.backlog_closes == 1
        # the queue was cut off at the bound, and dropped once the tunnel ended
        assert int(reason.split()[3]) < 1 << 20
        assert len(tunnel.out) == 0 and tunnel.out.bytes_queued == 0
        peer.close()

    run_async(scenario())


@pytest.mark.timeout(30)
def test_stream_data_the_peer_never_reads_is_bounded_too() -> None:
    """DATA counts against the backlog like control packages (a guest can grant itself any
    credit): past the bound the tunnel closes and its queue is dropped."""
    async def scenario() -> None:
        tunnel, peer = await _tunnel_pair(lambda t, p: None)
        tunnel.backlog_limit = 4 << 20
        runner = await _running(tunnel, peer)
        chunk = b"d" * (256 << 10)
        for i in range(64):  # 16 MiB the peer never reads
            header = Package(type=PackageType.DATA, entity=3, message_id=9, stream=1 + i % 3,
                             payload=chunk).header()
            tunnel.send_raw(header, chunk, PackageType.DATA, 3, 1 + i % 3)
            assert tunnel.out.bytes_queued <= 4 << 20
        reason = await asyncio.wait_for(runner, 10)
        assert reason.startswith("peer not reading: "), reason
        assert tunnel.out.bytes_queued == 0
        peer.close()

    run_async(scenario())


@pytest.mark.timeout(30)
def test_past_the_total_over_every_vm_the_tunnel_with_the_most_waiting_is_closed() -> None:
    """VMs each under their own cap cannot together fill the host: past the total, the one
    with the most waiting is cut off (not the one that queued last), and its bytes go."""
    async def scenario() -> None:
        (a, pa), (b, pb) = [await _tunnel_pair(lambda t, p: None) for _ in range(2)]
        pool = BacklogPool(3 << 20)
        for t in (a, b):
            t.backlog_limit = 2 << 20
            pool.join(t)  # no write loop runs: whatever is queued stays
        chunk = b"d" * (256 << 10)

        def queue(t: Tunnel, n: int) -> None:
            for _ in range(n):
                header = Package(type=PackageType.DATA, entity=3, message_id=9, stream=1,
                                 payload=chunk).header()
                t.send_raw(header, chunk, PackageType.DATA, 3, 1)

        queue(a, 7)  # 1.75 MiB: under its own cap
        queue(b, 4)
        assert not a.closed.is_set() and pool.total == a.out.backlog + b.out.backlog
        queue(b, 2)  # past 3 MiB together: a holds the most
        assert a.closed.is_set() and a.backlog_closes == 1
        assert a.close_reason.startswith("peer not reading: "), a.close_reason
        assert not b.closed.is_set() and len(b.out) == 6
        assert a.out.bytes_queued == 0 and pool.total == b.out.backlog
        queue(b, 3)  # b alone, past its own cap
        assert b.closed.is_set() and pool.total == 0 and not pool.tunnels
        for t, peer in ((a, pa), (b, pb)):
            await t.abort()
            peer.close()

    run_async(scenario())


@pytest.mark.timeout(30)
def test_the_read_budget_lets_other_work_run_between_slices_of_a_flood() -> None:
    """A flood in one read is dispatched ``read_budget`` packages per turn of the loop, with
    reading paused in between; every package still arrives, in order."""
    async def scenario() -> None:
        got: list[int] = []
        turns: list[int] = []  # how many packages had arrived each time another task ran
        tunnel, peer = await _tunnel_pair(lambda t, p: got.append(p.id))
        tunnel.read_budget = 50
        runner = await _running(tunnel, peer)
        burst = b"".join(Package(type=PackageType.MESSAGE, entity=3, id=i, message_id=9,
                                 payload=b"x").encode()
                         for i in range(1, 1001))  # 25 KiB: one read
        stop = False

        async def other() -> None:
            while not stop:
                turns.append(len(got))
                await asyncio.sleep(0)

        bystander = asyncio.ensure_future(other())
        await asyncio.get_running_loop().sock_sendall(peer, burst)
        for _ in range(500):
            if len(got) == 1000:
                break
            await asyncio.sleep(0.005)
        stop = True
        await bystander
        assert got == list(range(1, 1001))
        assert tunnel.read_yields >= 1000 // 50 - 1
        steps = [b - a for a, b in itertools.pairwise(turns) if b != a]
        assert steps and max(steps) <= 50, steps  # never more than one budget between turns
        tunnel.close()
        await runner
        peer.close()

    run_async(scenario())


@pytest.mark.timeout(30)
def test_before_it_runs_a_tunnel_reads_no_more_than_a_hello() -> None:
    """Between the handshake and run() (a guest first pings its live tunnel, up to 3 s)
    nothing is dispatched: what a peer sends meanwhile stays in its socket, not in our
    memory; run() then takes it all."""
    async def scenario() -> None:
        got: list[Package] = []
        tunnel, peer = await _tunnel_pair(lambda t, p: got.append(p))
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(peer, HELLO)
        await tunnel.receive_hello(5)
        flood = b"".join(Package(type=PackageType.MESSAGE, entity=3, id=i, message_id=9,
                                 payload=b"m" * 1000).encode()
                         for i in range(1, 201))
        sent = 0
        for _ in range(100):  # until the socket is full: the tunnel stopped reading
            try:
                sent += peer.send(flood)
            except BlockingIOError:
                break
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.2)
        limit = tunnel.config.max_payload + (64 << 10) + (64 << 10)  # + one more read
        assert tunnel.bytes_in <= limit, (tunnel.bytes_in, limit)
        assert sent > tunnel.bytes_in + (100 << 10), (sent, tunnel.bytes_in)  # left unread
        tunnel.answer(Hello(role="guest", hostname="g", software_version="0"))
        runner = asyncio.ensure_future(tunnel.run())
        expected = sent // len(Package(type=PackageType.MESSAGE, entity=3, id=1, message_id=9,
                                       payload=b"m" * 1000).encode())
        for _ in range(500):
            if len(got) >= expected:
                break
            await asyncio.sleep(0.01)
        assert len(got) >= expected and tunnel.bytes_in >= sent
        tunnel.close()
        await runner
        peer.close()

    run_async(scenario())


@pytest.mark.timeout(30)
def test_a_dead_peer_that_never_reads_loses_its_socket_and_no_error_is_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    """The peer fills the socket (PONGs it never reads), then goes silent: once declared dead
    the tunnel's socket is really closed (not left waiting to flush forever), and the ping
    loop's unanswered pings log no "Future exception was never retrieved"."""
    async def scenario() -> None:
        tunnel, peer = await _tunnel_pair(lambda t, p: None,
                                          TunnelConfig(ping_interval=0.05, dead_after=1.0))
        loop = asyncio.get_running_loop()
        runner = await _running(tunnel, peer)
        flood = _ping_flood(2000)
        for _ in range(20):
            await loop.sock_sendall(peer, flood)
            await asyncio.sleep(0.01)
            if tunnel.transport.get_write_buffer_size():
                break  # the kernel buffers are full: bytes wait in the transport
        assert tunnel.transport.get_write_buffer_size()
        reason = await asyncio.wait_for(runner, 10)
        assert reason.startswith("peer stopped answering"), reason
        await asyncio.sleep(0.1)
        gone = None
        for _ in range(200):  # with our end closed a send fails; with it open, it just fills up
            try:
                peer.send(b"x" * 65536)
            except BlockingIOError:
                await asyncio.sleep(0.01)
            except (BrokenPipeError, ConnectionResetError) as exc:
                gone = exc
                break
        assert gone is not None, "the dead tunnel's socket is still open"
        peer.close()
        del tunnel, runner
        gc.collect()
        await asyncio.sleep(0)

    with caplog.at_level(logging.ERROR):
        run_async(scenario())
        gc.collect()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
