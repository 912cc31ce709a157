#!/usr/bin/env python3
"""N fake guests in one process, for bench/scale.py's fake-guest run.

Listens on ``DIR/K.sock`` for K in 0..N-1 (Unix sockets, the lab's stand-in for vsock) and
answers each host connection as a guest mux with a shared key does (docs/protocol.md): the
host's HELLO, then ours (a fresh nonce, the features of this release), the host's AUTH
checked, then ours; afterwards it answers every PING with a PONG and pings the host as a
guest mux of this release does (vmbusify/mux/tunnel.py ``_ping_tick``): when the host's
PINGs stopped for PASSIVE_GRACE intervals (``ping_interval``, 5 s, the default), and once in
RTT_EVERY intervals; ``--always-ping`` pings every interval, as a guest of 0.1.0 does. The
guests' clocks are spread evenly over the interval, as independent guests' would be.
Nothing else: an idle VM.

Prints ``listening`` once every socket is bound, then ``authenticated K`` whenever the count
of authenticated tunnels changes (at most every 0.2 s).

    bench/fakeguest.py DIR N KEYFILE [--ping-interval 5]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmbusify import __version__
from vmbusify.errors import VMBusifyError
from vmbusify.mux.tunnel import PASSIVE_GRACE, RTT_EVERY
from vmbusify.protocol import auth
from vmbusify.protocol.entities import Entity, TunnelMessage
from vmbusify.protocol.package import PackageDecoder, PackageType
from vmbusify.protocol.tunnel import Auth, Hello, Ping, Pong


class FakeGuest(asyncio.Protocol):
    """One guest's end of one tunnel."""

    def __init__(self, farm: Farm, k: int) -> None:
        self.farm = farm
        self.k = k
        self.decoder = PackageDecoder()
        self.transport: asyncio.Transport | None = None
        self.host_nonce = b""
        self.nonce = auth.new_nonce()
        self.authenticated = False
        self.pings = 0
        self.host_ping = self.last_ping = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.decoder.receive_data(data)
            while (pkg := self.decoder.next_package()) is not None:
                if pkg.entity != Entity.TUNNEL or pkg.type is not PackageType.MESSAGE:
                    continue
                self.on_message(pkg.message_id, bytes(pkg.payload))
        except VMBusifyError as exc:
            print(f"guest {self.k}: {exc}", file=sys.stderr, flush=True)
            self.close()

    def on_message(self, mid: int, payload: bytes) -> None:
        assert self.transport is not None
        write = self.transport.write
        if mid == TunnelMessage.HELLO and not self.host_nonce:
            host = Hello.from_payload(payload)
            self.host_nonce = host.nonce
            ours = Hello(role="guest", hostname=f"fake{self.k}", software_version=__version__,
                         ips=[f"198.19.{self.k // 250}.{self.k % 250 + 2}"],
                         nonce=self.nonce, features=auth.features(True))
            write(ours.package().encode())
        elif mid == TunnelMessage.AUTH and not self.authenticated:
            got = Auth.from_payload(payload)
            if not auth.verify(self.farm.key, auth.Side.HOST, self.host_nonce, self.nonce,
                               got.proof):
                print(f"guest {self.k}: wrong host proof", file=sys.stderr, flush=True)
                self.close()
                return
            write(Auth(auth.proof(self.farm.key, auth.Side.GUEST, self.host_nonce,
                                  self.nonce)).package().encode())
            self.authenticated = True
            self.farm.up.add(self)
        elif mid == TunnelMessage.PING:
            self.host_ping = time.monotonic()
            write(Pong(Ping.from_payload(payload).nonce).package().encode())

    def ping(self, now: float) -> None:
        """Ping if due (see the module's docstring)."""
        interval = self.farm.ping_interval
        if (not self.farm.always_ping and now - self.host_ping < PASSIVE_GRACE * interval
                and now - self.last_ping < RTT_EVERY * interval):
            return
        if self.transport is not None and not self.transport.is_closing():
            self.last_ping = now
            self.pings += 1
            self.transport.write(Ping(self.pings).package().encode())

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.farm.up.discard(self)


class Farm:
    """Every fake guest of this process, and their shared ping clock."""

    def __init__(self, key: bytes, ping_interval: float, always_ping: bool) -> None:
        self.key = key
        self.ping_interval = ping_interval
        self.always_ping = always_ping
        self.up: set[FakeGuest] = set()

    async def pinger(self) -> None:
        """Look at each authenticated guest once an interval (spread over it): ping if due."""
        slots = 50
        while True:
            guests = sorted(self.up, key=lambda g: g.k)
            for i in range(slots):
                now = time.monotonic()
                for g in guests[i::slots]:
                    g.ping(now)
                await asyncio.sleep(self.ping_interval / slots)

    async def reporter(self) -> None:
        last = -1
        while True:
            if len(self.up) != last:
                last = len(self.up)
                print(f"authenticated {last}", flush=True)
            await asyncio.sleep(0.2)


async def serve(directory: Path, n: int, key: bytes, ping_interval: float,
                always_ping: bool) -> None:
    farm = Farm(key, ping_interval, always_ping)
    loop = asyncio.get_running_loop()
    servers = []
    for k in range(n):
        path = directory / f"{k}.sock"
        path.unlink(missing_ok=True)
        servers.append(await loop.create_unix_server(functools.partial(FakeGuest, farm, k),
                                                     str(path), backlog=16))
    print("listening", flush=True)
    tasks = [asyncio.ensure_future(farm.pinger()), asyncio.ensure_future(farm.reporter())]
    await asyncio.gather(*tasks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("n", type=int)
    ap.add_argument("keyfile", type=Path)
    ap.add_argument("--ping-interval", type=float, default=5.0)
    ap.add_argument("--always-ping", action="store_true", help="as a guest of 0.1.0")
    args = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # two descriptors per guest
    key = args.keyfile.read_bytes().strip()
    try:
        asyncio.run(serve(args.dir, args.n, key, args.ping_interval, args.always_ping))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
