"""The worker link's receive loop against a hostile peer: route kinds, raising handlers,
malformed messages, caps on requests and streams, liveness (no sockets, no ZeroMQ: bus
messages are fed to the loop and what it sends is captured)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from vmbusify.bus import link as link_module
from vmbusify.bus.frames import BusKind, BusMessage, Evt, Pkg, Reg, RegOk, RouteKind, TunnelEvent
from vmbusify.bus.link import Inbound, WorkerLink
from vmbusify.config import Config, LimitsConfig, Role
from vmbusify.errors import LocalProtocolError, RemoteProtocolError
from vmbusify.protocol.entities import Entity
from vmbusify.protocol.package import ErrorReply, Package, PackageFlag, PackageType
from vmbusify.protocol.serialize import dumps, loads
from vmbusify.protocol.window import encode_increment

PEER, LOCAL = Entity.CMD_LISTENER, Entity.CMD_EXECUTOR
NOTE, ASK, BOOM, SLOW, OPEN, DATA, BAD_ASK = 1, 2, 3, 4, 5, 6, 7


class Harness:
    """A WorkerLink whose receive loop runs on fed bus messages; sends are captured."""

    def __init__(self, **limits: int) -> None:
        self.link = WorkerLink(Config(role=Role.HOST, limits=LimitsConfig(**limits)),  # type: ignore[arg-type]
                               "t", [LOCAL])
        self.sent: list[tuple[str, Package]] = []
        self.notes: list[Any] = []
        self.release = asyncio.Event()
        self.accepted: list[Any] = []

        async def send(msg: BusMessage) -> None:
            if isinstance(msg, Pkg):
                self.sent.append((msg.vmid, msg.package()))

        self.link._send = send  # type: ignore[method-assign]
        link = self.link
        link.route(PEER, NOTE, self.on_note, RouteKind.MESSAGE)
        link.route(PEER, ASK, self.on_ask, RouteKind.REQUEST)
        link.route(PEER, BOOM, self.on_boom, RouteKind.MESSAGE)
        link.route(PEER, BAD_ASK, self.on_boom, RouteKind.REQUEST)
        link.route(PEER, SLOW, self.on_slow, RouteKind.REQUEST)
        link.route(PEER, OPEN, self.on_open, RouteKind.REQUEST)
        link.route(PEER, DATA, None, RouteKind.STREAM)
        self.task = asyncio.ensure_future(link._receive_loop())

    async def on_note(self, msg: Inbound) -> None:
        self.notes.append(msg.body)

    async def on_ask(self, msg: Inbound) -> Any:
        return {"echo": msg.body}

    async def on_boom(self, msg: Inbound) -> Any:
        if msg.body == "protocol":
            raise RemoteProtocolError("bad field")
        raise RuntimeError("a bug")

    async def on_slow(self, msg: Inbound) -> Any:
        await self.release.wait()
        return "late"

    async def on_open(self, msg: Inbound) -> Any:
        self.accepted.append(self.link.streams.accept(msg.vmid, LOCAL, msg.package, DATA))
        if msg.body == "fail":
            raise RuntimeError("crashed after accepting")
        return "open"

    def feed(self, vmid: str, pkg: Package) -> None:
        self.link._on_bus(Pkg.of(vmid, pkg).to_frames())

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0.01)

    def acks(self) -> list[tuple[int, bool, Any]]:
        """(request id, error?, reply or reason) of every ACK sent."""
        out = []
        for _, p in self.sent:
            if p.type is PackageType.ACK:
                err = bool(p.flags & PackageFlag.ERROR)
                out.append((p.id, err, ErrorReply.decode(p.payload).reason if err
                            else loads(p.payload)))
        return out

    def error_codes(self) -> list[int]:
        """The ErrorCode of every ERROR ACK sent (on the bus they are always coded)."""
        return [ErrorReply.decode(p.payload).code for _, p in self.sent
                if p.type is PackageType.ACK and p.flags & PackageFlag.ERROR]

    async def close(self) -> None:
        self.release.set()
        await self.link.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def msg(ptype: PackageType, message_id: int, body: Any = None, pid: int = 0,
        stream: int = 0) -> Package:
    return Package(type=ptype, entity=PEER, message_id=message_id, id=pid, stream=stream,
                   payload=dumps(body))


def run(scenario: Callable[[Harness], Awaitable[None]], **limits: int) -> None:
    async def main() -> None:
        h = Harness(**limits)
        try:
            await scenario(h)
        finally:
            await h.close()
    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_message_where_a_request_is_due_is_dropped_and_counted() -> None:
    """The attack of issue 12: a one-way MESSAGE to a request's route must not run it."""
    async def scenario(h: Harness) -> None:
        h.feed("vm1", msg(PackageType.MESSAGE, SLOW, "x"))
        await h.settle()
        assert h.sent == [] and h.link.budget.vm("vm1").requests == 0
        assert h.link.limit_stats() == {"vm1": {"bad_packages": 1}}
        h.feed("vm1", msg(PackageType.REQUEST, ASK, 1, pid=9))
        await h.settle()
        assert h.acks() == [(9, False, {"echo": 1})]
    run(scenario)


def test_a_request_where_a_message_is_due_gets_an_error_ack_at_once() -> None:
    async def scenario(h: Harness) -> None:
        h.feed("vm1", msg(PackageType.REQUEST, NOTE, "x", pid=4))
        await h.settle()
        assert h.acks() == [(4, True, "t: wrong package type")]
        assert h.notes == []
        h.feed("vm1", msg(PackageType.DATA, ASK, stream=3))  # DATA on a request route
        h.feed("vm1", msg(PackageType.MESSAGE, 999))  # no route at all
        await h.settle()
        assert h.link.limit_stats() == {"vm1": {"bad_packages": 3}}
    run(scenario)


def test_a_raising_message_handler_does_not_stop_the_loop() -> None:
    async def scenario(h: Harness) -> None:
        h.feed("vm1", msg(PackageType.MESSAGE, BOOM, "bug"))
        h.feed("vm1", msg(PackageType.MESSAGE, BOOM, "protocol"))
        h.feed("vm1", msg(PackageType.MESSAGE, NOTE, "after"))
        h.feed("vm1", msg(PackageType.REQUEST, ASK, 2, pid=1))
        await h.settle()
        assert h.notes == ["after"]
        assert h.acks() == [(1, False, {"echo": 2})]
        assert h.link.limit_stats() == {"vm1": {"handler_errors": 1, "bad_packages": 1}}
        assert not h.task.done()
    run(scenario)


def test_a_raising_request_handler_is_an_error_ack_and_a_count() -> None:
    async def scenario(h: Harness) -> None:
        h.feed("vm1", msg(PackageType.REQUEST, BAD_ASK, "bug", pid=1))
        h.feed("vm1", msg(PackageType.REQUEST, BAD_ASK, "protocol", pid=2))
        await h.settle()
        assert h.acks() == [(1, True, "t: internal error"), (2, True, "bad field")]
        assert h.link.limit_stats() == {"vm1": {"handler_errors": 1, "bad_packages": 1}}
    run(scenario)


def test_malformed_bus_messages_are_dropped_and_the_loop_goes_on() -> None:
    async def scenario(h: Harness) -> None:
        h.link._on_bus(Pkg("vm1", b"\x00" * 24, b"").to_frames())  # bad signature
        h.link._on_bus([BusKind.PKG.value, b"vm1"])  # frames missing (malformed on purpose)
        h.link._on_bus([b"WHAT"])
        body = Package(type=PackageType.MESSAGE, entity=PEER, message_id=NOTE,
                       payload=b"\xc1")  # not msgpack
        h.feed("vm1", body)
        h.feed("vm1", msg(PackageType.MESSAGE, NOTE, "still here"))
        await h.settle()
        assert h.notes == ["still here"]
        assert h.link.limit_stats() == {"vm1": {"bad_packages": 3}}
    run(scenario)


def test_requests_in_flight_are_capped_per_vm() -> None:
    async def scenario(h: Harness) -> None:
        for i in range(3):
            h.feed("vm1", msg(PackageType.REQUEST, SLOW, pid=i + 1))
        h.feed("vm2", msg(PackageType.REQUEST, SLOW, pid=10))
        await h.settle()
        assert h.acks() == [(3, True, "vm1: 2 requests in flight: limit reached")]
        h.release.set()
        await h.settle()
        assert sorted(a[0] for a in h.acks() if not a[1]) == [1, 2, 10]
        assert h.link.budget.vm("vm1").requests == 0
        assert h.link.limit_stats() == {"vm1": {"requests_refused": 1}}
    run(scenario, requests_per_vm=2)


def test_the_bytes_requests_hold_count_with_the_vms_unread_bytes() -> None:
    """requests_per_vm bounds tasks; what their payloads hold is charged to the VM's
    buffered_per_vm while they run, so many requests with big payloads are refused by
    bytes, and given back when they are answered."""
    async def scenario(h: Harness) -> None:
        big = "x" * (400 << 10)
        for i in range(3):
            h.feed("vm1", msg(PackageType.REQUEST, SLOW, big, pid=i + 1))
        h.feed("vm2", msg(PackageType.REQUEST, SLOW, big, pid=10))
        await h.settle()
        refused = h.acks()
        assert len(refused) == 1 and refused[0][:2] == (3, True), refused
        assert "held in requests and unread bytes: limit reached" in refused[0][2]
        assert h.link.budget.vm("vm1").rx > 800 << 10
        h.release.set()
        await h.settle()
        assert sorted(a[0] for a in h.acks() if not a[1]) == [1, 2, 10]
        assert h.link.budget.vm("vm1").rx == h.link.budget.rx == 0
        assert h.link.limit_stats() == {"vm1": {"requests_refused": 1}}
    run(scenario, buffered_per_vm=1 << 20)


def test_an_open_past_the_stream_cap_is_refused_before_its_handler_runs() -> None:
    async def scenario(h: Harness) -> None:
        h.feed("vm1", msg(PackageType.REQUEST, OPEN, pid=1, stream=11))
        h.feed("vm1", msg(PackageType.REQUEST, OPEN, pid=2, stream=12))
        await h.settle()
        assert h.acks() == [(1, False, "open"), (2, True, "vm1: 1 streams open: limit reached")]
        assert len(h.accepted) == 1
        assert h.link.limit_stats() == {"vm1": {"streams_refused": 1}}
    run(scenario, streams_per_vm=1)


def test_a_failed_open_does_not_leave_its_stream_behind() -> None:
    async def scenario(h: Harness) -> None:
        h.feed("vm1", msg(PackageType.REQUEST, OPEN, "fail", pid=1, stream=11))
        await h.settle()
        assert h.acks() == [(1, True, "t: internal error")]
        assert len(h.link.streams) == 0 and h.link.budget.streams == 0
        resets = [p for _, p in h.sent if p.flags & PackageFlag.RESET]
        assert [p.stream for p in resets] == [11]
    run(scenario)


def test_stream_packages_excess_credit_and_unknown_streams() -> None:
    async def scenario(h: Harness) -> None:
        h.feed("vm1", msg(PackageType.REQUEST, OPEN, pid=1, stream=11))
        await h.settle()
        stream = h.accepted[0]
        data = Package(type=PackageType.DATA, entity=PEER, message_id=DATA, stream=11,
                       payload=b"hello")
        h.feed("vm1", data)
        await h.settle()
        assert await stream.read() == b"hello"
        h.feed("vm1", Package(type=PackageType.WINDOW, entity=PEER, message_id=DATA, stream=11,
                              payload=encode_increment(0xFFFFFFFF)))
        await h.settle()
        assert stream.state.value == "reset" and "window" in stream.reset_reason
        h.feed("vm1", data)  # the stream is gone now
        h.feed("vm1", Package(type=PackageType.DATA, entity=PEER, message_id=DATA, stream=77,
                              payload=b"x"))
        await h.settle()
        assert h.link.limit_stats() == {"vm1": {"credit_resets": 1, "unknown_stream": 2}}
    run(scenario)


def test_routes_declare_their_kind_and_go_into_the_registration() -> None:
    async def scenario(h: Harness) -> None:
        assert [PEER, DATA, RouteKind.STREAM] in h.link.routes()
        assert [PEER, ASK, 2] in h.link.routes()
        assert all(len(r) == 3 for r in h.link.routes())
        with pytest.raises(LocalProtocolError):
            h.link.route(PEER, 50, None, RouteKind.MESSAGE)
        with pytest.raises(LocalProtocolError):
            h.link.route(PEER, 50, h.on_ask, RouteKind.STREAM)
    run(scenario)


def test_report_adds_the_limit_counters() -> None:
    async def scenario(h: Harness) -> None:
        sent: list[dict[str, Any]] = []

        async def control(request: dict[str, Any], timeout: float = 0) -> Any:
            sent.append(request)

        h.link.control = control  # type: ignore[method-assign]
        await h.link.report({"open": 1})
        assert sent[-1]["stats"] == {"open": 1}
        h.feed("vm1", msg(PackageType.MESSAGE, ASK))
        await h.settle()
        await h.link.report({"open": 2})
        assert sent[-1]["stats"] == {"open": 2, "limits": {"vm1": {"bad_packages": 1}}}
        # counters that change alone are published by the link, with the worker's last stats
        h.link.registered.set()
        h.feed("vm1", msg(PackageType.MESSAGE, ASK))
        await h.settle()
        h.link._report_limits()
        await h.settle()
        assert sent[-1]["stats"] == {"open": 2, "limits": {"vm1": {"bad_packages": 2}}}
        n = len(sent)
        h.link._report_limits()  # nothing new: nothing sent
        await h.settle()
        assert len(sent) == n
    run(scenario)


# -- liveness ---------------------------------------------------------------------------------

def test_a_stuck_loop_stops_the_heartbeat_and_calls_the_stall_action(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link_module, "REGISTER_INTERVAL", 0.02)

    async def main() -> None:
        stalls: list[str] = []
        link = WorkerLink(Config(role=Role.HOST), "t", [LOCAL], stall_after=0.2,
                          on_stall=stalls.append)
        regs: list[float] = []

        async def send(msg: BusMessage) -> None:
            if isinstance(msg, Reg):
                regs.append(asyncio.get_running_loop().time())

        link._send = send  # type: ignore[method-assign]
        stuck = asyncio.Event()

        async def wait_forever(msg: Inbound) -> None:
            await stuck.wait()

        link.route(PEER, NOTE, wait_forever, RouteKind.MESSAGE)
        loop_task = asyncio.ensure_future(link._receive_loop())
        reg_task = asyncio.ensure_future(link._register_loop())
        # busy but making progress, then idle for longer than stall_after: healthy
        for _ in range(30):
            link._on_bus(Evt(TunnelEvent.UP, "vm1").to_frames())
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.4)
        assert not stalls and not reg_task.done()
        # a handler that waits forever, with messages piling up behind it
        link._on_bus(Pkg.of("vm1", msg(PackageType.MESSAGE, NOTE)).to_frames())
        for _ in range(3):
            link._on_bus(RegOk("", "m").to_frames())
        await asyncio.wait_for(reg_task, 2)
        assert len(stalls) == 1 and "finished no message" in stalls[0]
        assert link.stalled
        last = regs[-1]
        await asyncio.sleep(0.1)
        assert regs[-1] == last  # no heartbeat since
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)

    asyncio.run(main())
