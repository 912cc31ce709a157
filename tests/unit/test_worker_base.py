"""The worker skeleton (vmbusify.workers.base) without ZeroMQ: the link's start, close and
report are replaced, everything else (tasks, supervision, counters) is the real thing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from vmbusify.bus.budget import Counter
from vmbusify.config import Config, Role
from vmbusify.errors import CoreLoopEnded
from vmbusify.protocol.entities import Entity
from vmbusify.workers import base as base_module
from vmbusify.workers.base import Worker, run_worker


class Probe(Worker):
    """A worker that writes down which hook ran when."""

    name = "probe"
    entities = (Entity.CMD_EXECUTOR,)
    report_interval = 0.01

    def __init__(self, config: Config, core_loop: Any = None, grace: float = 0.0) -> None:
        super().__init__(config)
        self.calls: list[str] = []
        self.reports: list[dict[str, Any]] = []
        self.counter = 0
        self.core_loop = core_loop
        self.stop_grace = grace  # type: ignore[misc]
        link = self.link

        async def start(wait: float | None = 30.0) -> None:
            self.calls.append("link.start")

        async def close() -> None:
            self.calls.append("link.close")

        async def report(stats: dict[str, Any]) -> None:
            self.reports.append(stats)

        link.start = start  # type: ignore[method-assign]
        link.close = close  # type: ignore[method-assign]
        link.report = report  # type: ignore[method-assign]

    def install(self) -> None:
        self.calls.append("install")

    async def open(self) -> None:
        self.calls.append("open")

    async def ready(self) -> None:
        self.calls.append("ready")
        if self.core_loop is not None:
            self.core(self.core_loop(), "the probe loop")

    def stats(self) -> dict[str, Any]:
        return {"n": self.counter}

    async def close(self) -> None:
        self.calls.append("close")


def config() -> Config:
    return Config(role=Role.HOST)


@contextlib.asynccontextmanager
async def serving(w: Worker, settle: float = 0.01) -> AsyncIterator[asyncio.Task[None]]:
    """``w`` running (after ``settle`` seconds) for the body; stopped (SIGTERM's way) after."""
    stop = asyncio.Event()
    runner = asyncio.ensure_future(w.run(stop))
    await asyncio.sleep(settle)
    yield runner
    stop.set()
    await asyncio.wait_for(runner, 3)


def test_hooks_run_in_order_and_a_stop_undoes_them() -> None:
    async def scenario() -> list[str]:
        w = Probe(config())
        async with serving(w, 0.05):
            pass
        return w.calls

    assert asyncio.run(scenario()) == [
        "install", "open", "link.start", "ready", "close", "link.close"]


def test_a_failing_request_is_logged_and_counted_and_the_worker_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> tuple[Probe, bool, bool]:
        w = Probe(config())

        async def bad() -> None:
            raise ValueError("a peer's bad bytes")

        async def good() -> str:
            return "fine"

        async with serving(w) as runner:
            failed = w.spawn(bad(), "vm7", "a bad request")
            ok = w.spawn(good(), "vm7", "a good request")
            await asyncio.gather(failed, ok, return_exceptions=True)
            await asyncio.sleep(0.02)
            alive = not runner.done()
        return w, alive, ok.result() == "fine"

    with caplog.at_level(logging.ERROR):
        w, alive, ok = asyncio.run(scenario())
    assert alive and ok
    assert w.link.limit_stats()["vm7"][Counter.HANDLER_ERRORS.value] == 1
    assert "a bad request failed: ValueError: a peer's bad bytes" in caplog.text
    assert "vm=vm7" in caplog.text


def test_a_core_loop_that_fails_stops_the_worker_with_an_error() -> None:
    async def loop() -> None:
        await asyncio.sleep(0.01)
        raise OSError("accept failed for good")

    async def scenario() -> tuple[Probe, BaseException | None]:
        w = Probe(config(), core_loop=loop)
        try:
            await asyncio.wait_for(w.run(asyncio.Event()), 2)
        except CoreLoopEnded as exc:
            return w, exc
        return w, None

    w, exc = asyncio.run(scenario())
    assert exc is not None and "the probe loop failed: OSError: accept failed for good" in str(exc)
    assert w.calls[-2:] == ["close", "link.close"]  # it still cleaned up


def test_a_core_loop_that_returns_stops_the_worker_too() -> None:
    async def loop() -> None:
        return None

    async def scenario() -> None:
        await asyncio.wait_for(Probe(config(), core_loop=loop).run(asyncio.Event()), 2)

    with pytest.raises(CoreLoopEnded, match="the probe loop ended"):
        asyncio.run(scenario())


def test_stop_gives_requests_their_grace_then_cancels_them() -> None:
    async def scenario() -> tuple[bool, bool]:
        w = Probe(config(), grace=1.0)
        async with serving(w):
            quick = w.spawn(asyncio.sleep(0.05, "done"))
            stuck = w.spawn(asyncio.sleep(3600))
        return quick.result() == "done", stuck.cancelled()

    finished, cancelled = asyncio.run(scenario())
    assert finished and cancelled


def test_stats_are_published_when_they_change() -> None:
    async def scenario() -> list[dict[str, Any]]:
        w = Probe(config())
        async with serving(w, 0.05):
            w.counter = 1
            await asyncio.sleep(0.05)
        return w.reports

    assert asyncio.run(scenario()) == [{"n": 0}, {"n": 1}]


def test_unchanged_stats_are_published_again_after_the_refresh(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base_module, "REPORT_REFRESH", 0.03)

    async def scenario() -> int:
        w = Probe(config())
        async with serving(w, 0.2):
            pass
        return len(w.reports)

    assert asyncio.run(scenario()) >= 3


def test_a_worker_sharing_a_link_leaves_it_alone() -> None:
    async def scenario() -> list[str]:
        owner = Probe(config())
        part = Probe.__new__(Probe)
        Worker.__init__(part, owner.config, owner.link)
        part.calls, part.core_loop = [], None
        part.report_interval = None  # type: ignore[misc,assignment]
        await part.start()
        await part.stop()
        await part.stop()  # twice is fine
        return part.calls + owner.calls

    assert asyncio.run(scenario()) == ["install", "open", "ready", "close"]


def test_run_worker_idles_without_a_worker() -> None:
    async def scenario() -> None:
        stop = asyncio.Event()
        runner = asyncio.ensure_future(run_worker(lambda c: None, config(), stop))
        await asyncio.sleep(0.02)
        assert not runner.done()
        stop.set()
        await asyncio.wait_for(runner, 1)

    asyncio.run(scenario())


def test_the_listener_carries_the_host_half_of_exec_on_its_link() -> None:
    from vmbusify.bus.link import WorkerLink
    from vmbusify.control.context import ControlContext
    from vmbusify.control.server import build_app
    from vmbusify.protocol.exec import ExecMessage
    from vmbusify.workers.exec.host import EXEC_KEY, ExecService

    async def scenario() -> tuple[set[str], list[Worker], Any, list[list[int]]]:
        link = WorkerLink(config(), "control", [Entity.CMD_LISTENER])
        app, parts = build_app(ControlContext(config(), link, "token"))
        for part in parts:
            await part.start()
        routes = {r.resource.canonical for r in app.router.routes() if r.resource}
        return routes, parts, app[EXEC_KEY], link.routes()

    routes, parts, service, link_routes = asyncio.run(scenario())
    assert "/v1/vms/{vmid}/exec" in routes and "/v1/status" in routes
    assert isinstance(service, ExecService) and parts == [service]
    assert [Entity.CMD_EXECUTOR, ExecMessage.EXIT] in [r[:2] for r in link_routes]
