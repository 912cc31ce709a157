"""The proxy client's accept path: users are taken while they wait, and a failing accept
(EMFILE: out of descriptors) pauses accepting for a moment instead of spinning or ending."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable
from typing import Any, cast

from vmbusify.bus.link import WorkerLink
from vmbusify.config import ProxyConfig, Role
from vmbusify.workers.proxy import client as client_mod
from vmbusify.workers.proxy.client import ProxyClient
from vmbusify.workers.proxy.stats import ConnStats


class FlakySocket(socket.socket):
    """A listening socket whose next ``fail`` accepts fail with EMFILE."""

    fail = 0

    def _accept(self) -> tuple[int, Any]:
        if FlakySocket.fail:
            FlakySocket.fail -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return cast(tuple[int, Any], super()._accept())  # type: ignore[misc]


def test_users_are_accepted_and_a_failing_accept_pauses_then_resumes(monkeypatch: Any
                                                                      ) -> None:
    monkeypatch.setattr(client_mod, "ACCEPT_RETRY", 0.05)

    async def go() -> None:
        served: list[socket.socket] = []

        async def serve(sock: socket.socket, label: str) -> None:
            served.append(sock)

        def spawn(coro: Awaitable[Any], vmid: str = "", what: str = "") -> asyncio.Task[Any]:
            return asyncio.ensure_future(coro)

        proxy = ProxyClient(cast(WorkerLink, None), ProxyConfig(listen="127.0.0.1:0"),
                            Role.GUEST, ConnStats(), spawn)
        monkeypatch.setattr(proxy, "serve", serve)
        proxy.listen().close()
        lsock = FlakySocket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(16)
        lsock.setblocking(False)
        proxy._sock = lsock
        port = lsock.getsockname()[1]
        FlakySocket.fail = 1
        task = asyncio.ensure_future(proxy.serve_forever())
        users = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            await asyncio.sleep(0.01)
            assert not served and not proxy._accepting  # EMFILE: paused, not spinning
            for _ in range(100):
                await asyncio.sleep(0.01)
                if len(served) == 3:
                    break
            assert len(served) == 3 and proxy._accepting
            assert all(s.family == socket.AF_INET for s in served)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert not proxy._accepting
            proxy.close()
            for s in users + served:
                s.close()

    asyncio.run(go())
