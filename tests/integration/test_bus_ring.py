"""The shared-memory ring beside the bus (vmbusify/bus/ring.py) between real muxes and
workers: a stream's bytes through the ring and inline, interleaved, arrive intact; a worker
or mux that restarts mid-stream makes new rings and the next stream is whole again."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Pair, link_for, make_pair, wait_state
from tests.integration.test_tunnel import DATA, ECHO, echo, run, stream_workers
from vmbusify.bus.link import WorkerLink
from vmbusify.bus.ring import RING_ENV, RingLink
from vmbusify.bus.streams import Stream
from vmbusify.errors import VMBusifyError
from vmbusify.protocol.entities import Entity

KIB = 1 << 10


@pytest.fixture
def pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pair]:
    # A ring of 1 MiB a direction: a stream of a few MiB fills it, so that payloads go
    # through the ring and inline, interleaved.
    monkeypatch.setenv(RING_ENV, "1")
    p = make_pair(tmp_path)
    yield p
    p.stop()


def _rings(link: WorkerLink) -> RingLink:
    assert link._bus is not None and link._bus.rings is not None
    return link._bus.rings


def _blob(n: int, seed: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "big")).digest(n)


#: Writes of every kind: under RING_MIN_PAYLOAD (inline), a ring's quarter, a whole MiB.
WRITES = [100, 64 * KIB, 300 * KIB, 1 << 20, 5, 200 * KIB, (1 << 20) - 1, 64 * KIB - 1]


async def _send(stream: Stream, writes: list[bytes]) -> None:
    for w in writes:
        await stream.write(w)
    await stream.write_eof()


async def _receive(stream: Stream, hold: bool) -> bytes:
    """Everything until EOF; ``hold``: keep every chunk (a view of the ring) until the end,
    so the ring fills and later payloads go inline."""
    chunks: list[bytes | memoryview] = []
    while chunk := await asyncio.wait_for(stream.read(), 20):
        chunks.append(chunk if hold else bytes(chunk))
    return b"".join(chunks)


@pytest.mark.timeout(180)
def test_bytes_through_the_ring_and_inline_arrive_intact_both_ways(pair: Pair) -> None:
    async def scenario() -> None:
        w = await stream_workers(pair, [(Entity.PROXY_CLIENT, ECHO, echo)])
        host, guest = w.host, w.guest
        # The ring is taken once the mux has mapped it (the REGOK after it was offered).
        for _ in range(100):
            if _rings(host).tx_on and _rings(guest).tx_on:
                break
            await asyncio.sleep(0.05)
        assert _rings(host).tx_on and _rings(guest).tx_on
        for rnd in range(2):
            h, g = await w.pair()
            out = [_blob(n, i + 10 * rnd) for i, n in enumerate(WRITES * 3)]
            back = [_blob(n, i + 100 + 10 * rnd) for i, n in enumerate(reversed(WRITES * 3))]
            sent = asyncio.gather(_send(h, out), _send(g, back))

            async def requests() -> None:
                # Large payloads on the control lane (a REQUEST, its ACK) beside the stream's:
                # never in the ring, whose payloads are taken in their order.
                for i in range(5):
                    body = _blob(100 * KIB, 1000 + i)
                    reply = await host.request_body("vm1", Entity.PROXY_CLIENT, ECHO, body)
                    assert reply["echo"] == body

            got_g, got_h, _ = await asyncio.gather(_receive(g, hold=rnd == 0),
                                                   _receive(h, hold=rnd == 1), requests())
            await sent
            assert got_g == b"".join(out)
            assert got_h == b"".join(back)
        # Both ways, each hop's ring was used, and payloads also went inline when it was full.
        for link in (host, guest):
            rings = _rings(link)
            assert rings.placed > 0, link.name
            assert rings.take.consumed > 0, link.name
        assert _rings(host).inline + _rings(guest).inline > 0
        # The muxes' status shows each worker's ring as they see it.
        st = await host.control({"cmd": "status"})
        [ring] = [w["ring"] for w in st["workers"] if w["name"] == "t-host"]
        assert ring["size"] == 1 << 20 and ring["placed"] > 0 and ring["received"] > 0
        await host.close()
        await guest.close()

    run(scenario())


@pytest.mark.timeout(180)
def test_a_worker_restarted_mid_stream_gets_new_rings(pair: Pair) -> None:
    async def scenario() -> None:
        w = await stream_workers(pair)
        host, guest = w.host, w.guest
        h, g = await w.pair()
        for _ in range(4):  # within the credit window: the guest reads one chunk only
            await h.write(_blob(512 * KIB, 1))
        # The guest's worker goes away with payloads of the ring unread and a view held.
        held = await asyncio.wait_for(g.read(), 10)
        assert held
        first = _rings(guest).id
        await guest.close()
        with contextlib.suppress(VMBusifyError):  # reset: the peer's worker went away
            assert await asyncio.wait_for(h.read(), 10) == b""
        del held
        w2 = await stream_workers(pair)
        guest2 = w2.guest
        assert _rings(guest2).id != first
        h2, g2 = await w2.pair()
        out = [_blob(n, i) for i, n in enumerate(WRITES * 2)]
        sent = asyncio.ensure_future(_send(h2, out))
        assert await _receive(g2, hold=False) == b"".join(out)
        await sent
        assert _rings(guest2).take.consumed > 0
        await w2.host.close()
        await guest2.close()
        await host.close()

    run(scenario())


@pytest.mark.timeout(180)
def test_a_mux_restarted_mid_stream_maps_the_workers_new_rings(pair: Pair) -> None:
    async def scenario() -> None:
        w = await stream_workers(pair)
        host = w.host
        h, _g = await w.pair()
        for _ in range(8):
            await h.write(_blob(512 * KIB, 3))
        old = _rings(host).id
        pair.host.kill()
        pair.host.start()
        for _ in range(200):  # the worker sees the new mux and offers new rings
            if _rings(host).id != old and _rings(host).tx_on:
                break
            await asyncio.sleep(0.05)
        assert _rings(host).id != old and _rings(host).tx_on
        await wait_state(host, "vm1", "connected")
        h2, g2 = await w.pair()
        out = [_blob(n, i + 50) for i, n in enumerate(WRITES * 2)]
        sent = asyncio.ensure_future(_send(h2, out))
        assert await _receive(g2, hold=False) == b"".join(out)
        await sent
        assert _rings(host).placed > 0
        # No ring file is left behind in either bus directory once the muxes mapped them
        # (the worker may still be offering rings it made when it saw the restart twice:
        # its socket's monitor and the new mux_id).
        for run_dir in (pair.host.config.run_dir, pair.guest.config.run_dir):
            for _ in range(100):
                left = [n for n in os.listdir(run_dir) if n.startswith("ring.")]
                if not left:
                    break
                await asyncio.sleep(0.05)
            assert not left, run_dir
        await host.close()
        await w.guest.close()

    run(scenario())


@pytest.mark.timeout(120)
def test_without_rings_payloads_go_inline(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RING_ENV, "0")

    async def scenario() -> None:
        w = await stream_workers(pair)
        assert w.host._bus is not None and w.host._bus.rings is None
        h, g = await w.pair()
        out = [_blob(n, i) for i, n in enumerate(WRITES)]
        sent = asyncio.ensure_future(_send(h, out))
        assert await _receive(g, hold=False) == b"".join(out)
        await sent
        other = await link_for(pair.host, "t-other", [Entity.PROXY_CLIENT],
                               [(Entity.PROXY_SERVER, DATA, None)])
        await other.close()
        await w.host.close()
        await w.guest.close()

    run(scenario())
