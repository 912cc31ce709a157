"""The mux's sans-I/O switch: packages and events in, actions out (no sockets, no loop)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import pytest

from vmbusify.bus.frames import RouteKind
from vmbusify.errors import ErrorCode, RemoteProtocolError
from vmbusify.mux.switch import (
    Action,
    AnswerError,
    Drop,
    DropReason,
    Hold,
    Switch,
    ToTunnel,
    ToWorker,
    WorkerGone,
    WorkerJoined,
)
from vmbusify.protocol.entities import Entity, TunnelMessage, may_send_as
from vmbusify.protocol.package import (
    MAX_PAYLOAD_LIMIT,
    ErrorReply,
    Package,
    PackageFlag,
    PackageType,
    decode_header,
)
from vmbusify.protocol.tunnel import WorkerLost

NO_FLAGS = PackageFlag(0)
M, R, S = int(RouteKind.MESSAGE), int(RouteKind.REQUEST), int(RouteKind.STREAM)
PROXY_C, PROXY_S = int(Entity.PROXY_CLIENT), int(Entity.PROXY_SERVER)
OPEN, DATA = 1, 2

T = TypeVar("T")


def reg(name: str, routes: list[list[int]], entities: list[int] | None = None,
        pid: int = 100, since: int | None = None) -> dict[str, Any]:
    body = {"name": name, "pid": pid, "entities": entities or [], "routes": routes}
    return body if since is None else {**body, "since": since}


def host_switch(vms: tuple[str, ...] = ("vm1", "vm2"), up: tuple[str, ...] = ("vm1",)
                ) -> Switch:
    sw = Switch("host", "hostA", set(vms))
    for vmid in up:
        assert sw.tunnel_up(vmid, coded_errors=True) == []
    return sw


def pkg(ptype: PackageType, entity: int = PROXY_C, message_id: int = OPEN, pid: int = 7,
        stream: int = 0, payload: bytes = b"\x80", flags: PackageFlag = NO_FLAGS
        ) -> Package:
    return Package(type=ptype, flags=flags, entity=entity, id=pid, message_id=message_id,
                   stream=stream, payload=payload)


def header_of(action: ToWorker | ToTunnel) -> Any:
    return decode_header(action.header, MAX_PAYLOAD_LIMIT)


def of(actions: Sequence[Action], cls: type[T]) -> list[T]:
    """``actions``, each checked to be a ``cls`` (and narrowed to it for the type checker)."""
    assert all(isinstance(a, cls) for a in actions), actions
    return [a for a in actions if isinstance(a, cls)]


def one(action: Action, cls: type[T]) -> T:
    """``action``, checked to be a ``cls`` (and narrowed to it for the type checker)."""
    assert isinstance(action, cls), action
    return action


# -- tunnel -> workers: routes and types ---------------------------------------------------

def test_a_request_goes_to_the_first_handler_and_copies_as_messages_to_the_others() -> None:
    sw = host_switch()
    sw.register(b"w1", reg("first", [[PROXY_C, OPEN]]))
    sw.register(b"w2", reg("second", [[PROXY_C, OPEN]]))
    sw.register(b"w3", reg("third", [[PROXY_C, OPEN, M]]))
    p = pkg(PackageType.REQUEST, pid=41, payload=b"\x81\xa1a\x01")
    acts = sw.from_tunnel("vm1", p)
    assert [type(a) for a in acts] == [ToWorker, ToWorker, ToWorker]
    workers = of(acts, ToWorker)
    assert [a.identity for a in workers] == [b"w1", b"w2", b"w3"]  # registration order
    first, *copies = workers
    assert header_of(first).type is PackageType.REQUEST and first.retry is p
    assert header_of(first).id == 41 and first.payload == p.payload and first.vmid == "vm1"
    for c in copies:
        h = header_of(c)
        assert h.type is PackageType.MESSAGE and h.id == 41 and c.retry is None
        assert (h.entity, h.message_id) == (PROXY_C, OPEN)


def test_a_request_is_answered_by_the_first_worker_that_takes_requests() -> None:
    sw = host_switch()
    sw.register(b"w1", reg("listener", [[PROXY_C, OPEN, M]]))  # notifications only
    sw.register(b"w2", reg("server", [[PROXY_C, OPEN, R]]))
    sw.register(b"w3", reg("strict", [[PROXY_C, OPEN, R]]))  # takes no one-way copy
    acts = of(sw.from_tunnel("vm1", pkg(PackageType.REQUEST)), ToWorker)
    assert [(a.identity, header_of(a).type) for a in acts] == [
        (b"w2", PackageType.REQUEST), (b"w1", PackageType.MESSAGE)]


def test_a_message_reaches_every_worker_that_takes_messages() -> None:
    sw = host_switch()
    sw.register(b"w1", reg("a", [[PROXY_C, OPEN]]))
    sw.register(b"w2", reg("b", [[PROXY_C, OPEN, M | R]]))
    sw.register(b"w3", reg("c", [[PROXY_C, OPEN, R]]))
    acts = of(sw.from_tunnel("vm1", pkg(PackageType.MESSAGE)), ToWorker)
    assert [a.identity for a in acts] == [b"w1", b"w2"]
    assert all(header_of(a).type is PackageType.MESSAGE for a in acts)


def test_a_one_way_message_where_a_request_is_due_is_dropped() -> None:
    """The issue's first attack: a KEEPALIVE (or PROXY-OPEN) sent as a MESSAGE to a handler
    that expects a REQUEST never reaches the worker."""
    sw = host_switch()
    sw.register(b"w1", reg("proxy", [[PROXY_C, OPEN, R], [PROXY_C, DATA, S]]))
    acts = sw.from_tunnel("vm1", pkg(PackageType.MESSAGE))
    assert acts == [Drop("vm1", DropReason.WRONG_TYPE, PackageType.MESSAGE, PROXY_C, OPEN, R)]
    assert one(acts[0], Drop).detail == ("MESSAGE for proxy-client message 1, whose route "
                                         "takes request")


def test_a_request_where_a_message_is_due_gets_an_error_ack() -> None:
    sw = host_switch()
    sw.register(b"w1", reg("subnet", [[PROXY_C, OPEN, M]]))
    acts = sw.from_tunnel("vm1", pkg(PackageType.REQUEST, pid=9, stream=3))
    drop = one(acts[0], Drop)
    assert drop.reason is DropReason.WRONG_TYPE
    assert drop.detail == ("REQUEST for proxy-client message 1 (stream 3), whose route "
                           "takes message")
    answer = one(acts[1], AnswerError)
    assert answer == AnswerError("vm1", 9, OPEN, "wrong package type for proxy-client message 1",
                                 None, 3, ErrorCode.PROTOCOL)
    ack = answer.package()
    assert ack.type is PackageType.ACK and ack.flags & PackageFlag.ERROR
    assert (ack.id, ack.message_id, ack.stream, ack.entity) == (9, OPEN, 3, 0)
    assert ErrorReply.decode(ack.payload) == ErrorReply(
        ErrorCode.PROTOCOL, "wrong package type for proxy-client message 1")


@pytest.mark.parametrize("ptype", [PackageType.DATA, PackageType.WINDOW])
def test_stream_packages_need_a_stream_route(ptype: PackageType) -> None:
    sw = host_switch()
    sw.register(b"w1", reg("proxy", [[PROXY_C, OPEN, R], [PROXY_C, DATA, S]]))
    ok = of(sw.from_tunnel("vm1", pkg(ptype, message_id=DATA, stream=5)), ToWorker)
    assert [(a.identity, header_of(a).type, header_of(a).stream) for a in ok] == [
        (b"w1", ptype, 5)]
    bad = sw.from_tunnel("vm1", pkg(ptype, message_id=OPEN, stream=5))
    assert [type(a) for a in bad] == [Drop] and one(bad[0], Drop).reason is DropReason.WRONG_TYPE
    assert one(bad[0], Drop).detail == (f"{ptype.name} for proxy-client message 1 (stream 5), "
                                        "whose route takes request")


def test_a_route_without_a_kind_takes_every_type() -> None:
    sw = host_switch()
    sw.register(b"w1", reg("old", [[PROXY_C, OPEN]]))
    for ptype in (PackageType.MESSAGE, PackageType.REQUEST, PackageType.DATA,
                  PackageType.WINDOW):
        acts = sw.from_tunnel("vm1", pkg(ptype))
        assert [type(a) for a in acts] == [ToWorker], ptype


def test_no_worker_answers_a_request_with_an_error_and_drops_the_rest() -> None:
    sw = host_switch()
    acts = sw.from_tunnel("vm1", pkg(PackageType.REQUEST, message_id=4242, pid=3))
    assert one(acts[0], Drop).reason is DropReason.NO_ROUTE
    assert acts[1] == AnswerError("vm1", 3, 4242,
                                  "no worker on hostA handles proxy-client message 4242",
                                  code=ErrorCode.NO_HANDLER)
    for ptype in (PackageType.MESSAGE, PackageType.DATA):
        dropped = sw.from_tunnel("vm1", pkg(ptype, message_id=4242))
        assert [type(a) for a in dropped] == [Drop]
        drop = one(dropped[0], Drop)
        assert drop.reason is DropReason.NO_ROUTE and drop.reason.from_peer
        assert drop.detail == (f"{ptype.name} for proxy-client message 4242: "
                               "no worker handles it")


# -- sides -----------------------------------------------------------------------------------

def test_entities_live_on_their_side() -> None:
    assert may_send_as("host", Entity.CMD_LISTENER) and not may_send_as("guest",
                                                                         Entity.CMD_LISTENER)
    assert may_send_as("guest", Entity.CMD_EXECUTOR) and not may_send_as("host",
                                                                          Entity.CMD_EXECUTOR)
    for e in (Entity.PROXY_CLIENT, Entity.PROXY_SERVER, Entity.IP_BEARER, 77):
        assert may_send_as("host", e) and may_send_as("guest", e)


def test_a_guest_cannot_send_as_the_command_listener() -> None:
    sw = host_switch()
    sw.register(b"w1", reg("control", [[Entity.CMD_LISTENER, 1], [Entity.CMD_EXECUTOR, 2]]))
    acts = sw.from_tunnel("vm1", pkg(PackageType.REQUEST, entity=Entity.CMD_LISTENER,
                                     message_id=1, pid=5))
    assert acts == [Drop("vm1", DropReason.FOREIGN_ENTITY, PackageType.REQUEST,
                         Entity.CMD_LISTENER, 1, 1),
                    AnswerError("vm1", 5, 1, "cmd-listener is not an entity of a guest",
                                code=ErrorCode.PROTOCOL)]
    assert one(acts[0], Drop).detail == ("REQUEST for cmd-listener message 1: cmd-listener "
                                         "is not an entity of a guest")
    # nor ACK as it, even a pending one (the id stays pending for the real answer)
    sw.from_worker(b"w1", "vm1", pkg(PackageType.REQUEST, entity=Entity.CMD_LISTENER,
                                     message_id=1, pid=11).header(), b"")
    forged = sw.from_tunnel("vm1", pkg(PackageType.ACK, entity=Entity.CMD_LISTENER,
                                       message_id=1, pid=1))
    assert [a.reason for a in forged if isinstance(a, Drop)] == [DropReason.FOREIGN_ENTITY]
    real = sw.from_tunnel("vm1", pkg(PackageType.ACK, entity=Entity.CMD_EXECUTOR,
                                     message_id=1, pid=1))
    assert [type(a) for a in real] == [ToWorker]
    # what a guest may send still goes through
    ok = sw.from_tunnel("vm1", pkg(PackageType.MESSAGE, entity=Entity.CMD_EXECUTOR,
                                   message_id=2))
    assert [type(a) for a in ok] == [ToWorker]


def test_a_host_cannot_send_as_the_command_executor() -> None:
    sw = Switch("guest", "vm1", {"host"})
    sw.tunnel_up("host", coded_errors=True)
    sw.register(b"w1", reg("exec", [[Entity.CMD_EXECUTOR, 3], [Entity.CMD_LISTENER, 3]]))
    bad = sw.from_tunnel("host", pkg(PackageType.MESSAGE, entity=Entity.CMD_EXECUTOR,
                                     message_id=3))
    assert [a.reason for a in bad if isinstance(a, Drop)] == [DropReason.FOREIGN_ENTITY]
    assert one(bad[0], Drop).detail.endswith("cmd-executor is not an entity of a host")
    ok = sw.from_tunnel("host", pkg(PackageType.MESSAGE, entity=Entity.CMD_LISTENER,
                                    message_id=3))
    assert [type(a) for a in ok] == [ToWorker]


# -- ACK id rewriting ------------------------------------------------------------------------

def test_request_ids_are_rewritten_and_the_ack_finds_the_worker_with_its_own_id() -> None:
    sw = host_switch()
    out1 = sw.from_worker(b"wA", "vm1", pkg(PackageType.REQUEST, pid=500).header(), b"x")
    out2 = sw.from_worker(b"wB", "vm1", pkg(PackageType.REQUEST, pid=500).header(), b"y")
    t1, t2 = out1[0], out2[0]
    assert isinstance(t1, ToTunnel) and isinstance(t2, ToTunnel)
    id1, id2 = header_of(t1).id, header_of(t2).id
    assert id1 != id2 and 0 not in (id1, id2)  # same worker id, distinct tunnel ids
    assert (t1.type, t1.entity, t1.payload) == (PackageType.REQUEST, PROXY_C, b"x")
    back = of(sw.from_tunnel("vm1", pkg(PackageType.ACK, entity=PROXY_S, pid=id2,
                                        payload=b"\xc3", stream=4)), ToWorker)
    assert [a.identity for a in back] == [b"wB"]
    h = header_of(back[0])
    assert (h.type, h.id, h.entity, h.stream, back[0].payload) == (
        PackageType.ACK, 500, PROXY_S, 4, b"\xc3")
    # each ACK is taken once: a second copy answers nothing
    again = of(sw.from_tunnel("vm1", pkg(PackageType.ACK, entity=PROXY_S, pid=id2)), Drop)
    assert [a.reason for a in again] == [DropReason.STRAY_ACK]
    assert again[0].detail == f"ACK for proxy-server message 1: its id {id2} answers no request"
    # another VM's tunnel has ids of its own: vm1's id means nothing there
    sw.tunnel_up("vm2", coded_errors=True)
    stray = sw.from_tunnel("vm2", pkg(PackageType.ACK, entity=PROXY_S, pid=id1))
    assert [type(a) for a in stray] == [Drop]


def test_other_packages_from_workers_go_out_unchanged() -> None:
    sw = host_switch()
    p = pkg(PackageType.DATA, message_id=DATA, stream=8, payload=b"bytes", pid=0)
    (act,) = sw.from_worker(b"wA", "vm1", p.header(), p.payload)
    assert act == ToTunnel("vm1", p.header(), b"bytes", PackageType.DATA, PROXY_C, 8)


def test_a_vm_that_is_not_up_holds_what_may_wait_and_an_unknown_vm_is_an_error() -> None:
    sw = host_switch()
    req = pkg(PackageType.REQUEST, pid=12).header()
    (hold,) = sw.from_worker(b"wA", "vm2", req, b"x")
    assert hold == Hold("vm2", b"wA", req, b"x", True)
    (data_hold,) = sw.from_worker(b"wA", "vm2", pkg(PackageType.DATA).header(), b"")
    assert isinstance(data_hold, Hold) and not data_hold.may_wait
    (err,) = sw.from_worker(b"wA", "nope", req, b"x")
    assert err == AnswerError("nope", 12, OPEN, "unknown VM 'nope'", b"wA",
                              code=ErrorCode.UNKNOWN_VM)
    (drop,) = sw.from_worker(b"wA", "nope", pkg(PackageType.MESSAGE).header(), b"")
    assert isinstance(drop, Drop)
    assert drop.reason is DropReason.UNKNOWN_VM and not drop.reason.from_peer


def test_a_tunnel_going_down_fails_every_request_waiting_on_it() -> None:
    sw = host_switch(up=("vm1", "vm2"))
    sw.from_worker(b"wA", "vm1", pkg(PackageType.REQUEST, pid=1).header(), b"")
    sw.from_worker(b"wB", "vm1", pkg(PackageType.REQUEST, pid=2).header(), b"")
    sw.from_worker(b"wA", "vm2", pkg(PackageType.REQUEST, pid=3).header(), b"")
    acts = sw.tunnel_down("vm1", "peer closed the connection")
    reason = "not connected: tunnel to vm1 lost (peer closed the connection)"
    assert sorted(of(acts, AnswerError), key=lambda a: a.call_id) == [
        AnswerError("vm1", 1, 0, reason, b"wA", code=ErrorCode.NOT_CONNECTED),
        AnswerError("vm1", 2, 0, reason, b"wB", code=ErrorCode.NOT_CONNECTED)]
    assert not sw.is_up("vm1") and sw.is_up("vm2")
    assert isinstance(sw.from_worker(b"wA", "vm1", pkg(PackageType.MESSAGE).header(),
                                     b"")[0], Hold)
    # a new tunnel starts with no pending request: an old id's ACK is stray
    sw.tunnel_up("vm1", coded_errors=True)
    assert [type(a) for a in sw.from_tunnel("vm1", pkg(PackageType.ACK, pid=1))] == [Drop]


# -- workers coming and going ----------------------------------------------------------------

def test_a_gone_answering_worker_hands_the_request_to_the_next_one() -> None:
    sw = host_switch(up=("vm1", "vm2"))
    sw.register(b"w1", reg("first", [[PROXY_C, OPEN]], [PROXY_S]))
    sw.register(b"w2", reg("second", [[PROXY_C, OPEN]]))
    first, _copy = sw.from_tunnel("vm1", pkg(PackageType.REQUEST, pid=3))
    acts = sw.undeliverable(one(first, ToWorker))
    gone, *rest = acts
    assert isinstance(gone, WorkerGone) and gone.info.name == "first"
    announce = [a for a in rest if isinstance(a, ToTunnel)]
    assert sorted(a.vmid for a in announce) == ["vm1", "vm2"]
    assert WorkerLost.from_payload(announce[0].payload).entities == [PROXY_S]
    assert header_of(announce[0]).message_id == TunnelMessage.WORKER_LOST
    routed = [a for a in rest if isinstance(a, ToWorker)]
    assert [(a.identity, header_of(a).type) for a in routed] == [(b"w2", PackageType.REQUEST)]
    # when the last one is gone too, the peer hears "no worker"
    again = sw.undeliverable(routed[0])
    assert [a for a in again if isinstance(a, AnswerError)] == [
        AnswerError("vm1", 3, OPEN, "no worker on hostA handles proxy-client message 1",
                    code=ErrorCode.NO_HANDLER)]


def test_a_gone_worker_that_was_only_copied_is_forgotten_and_nothing_rerouted() -> None:
    sw = host_switch()
    sw.register(b"w1", reg("a", [[PROXY_C, OPEN]]))
    (act,) = sw.from_tunnel("vm1", pkg(PackageType.MESSAGE))
    acts = sw.undeliverable(one(act, ToWorker))
    assert [type(a) for a in acts] == [WorkerGone]  # no entities: nothing to announce
    assert sw.routes.destinations(PROXY_C, OPEN) == []


def test_registration_heartbeats_restarts_and_silence() -> None:
    sw = host_switch()
    joined = sw.register(b"w1", reg("proxy", [[PROXY_C, OPEN, R]], [PROXY_S], pid=1))
    assert [type(a) for a in joined] == [WorkerJoined]
    assert sw.register(b"w1", reg("proxy", [[PROXY_C, OPEN, R]], [PROXY_S], pid=1)) == []
    # a new process of the same worker: the peers hear the old one's streams are gone
    restarted = sw.register(b"w9", reg("proxy", [[PROXY_C, OPEN, R]], [PROXY_S], pid=2))
    assert [type(a) for a in restarted] == [WorkerGone, ToTunnel, WorkerJoined]
    assert one(restarted[0], WorkerGone).why == "restarted"
    assert one(restarted[1], ToTunnel).vmid == "vm1"
    assert [w.identity for w, _ in sw.routes.destinations(PROXY_C, OPEN)] == [b"w9"]
    gone = sw.silent(6.0, now=10**12)
    assert [type(a) for a in gone] == [WorkerGone, ToTunnel]
    assert "silent" in one(gone[0], WorkerGone).why
    assert sw.routes.workers() == []


def test_a_replaced_links_late_heartbeat_does_not_displace_its_successor() -> None:
    """Two links of one name reach the mux over two ZeroMQ connections, in no set order: the
    old link's last REG may come after its successor's. The older ``since`` loses."""
    sw = host_switch()
    routes = [[PROXY_C, OPEN, R]]
    sw.register(b"old", reg("proxy", routes, [PROXY_S], pid=1, since=1000))
    sw.register(b"new", reg("proxy", routes, [PROXY_S], pid=2, since=2000))
    assert sw.register(b"old", reg("proxy", routes, [PROXY_S], pid=1, since=1000)) == []
    assert [w.identity for w, _ in sw.routes.destinations(PROXY_C, OPEN)] == [b"new"]
    assert sw.routes.by_identity(b"old") is None
    # a worker that does not say (an older release) is taken, as before
    sw.register(b"other", reg("proxy", routes, [PROXY_S], pid=3))
    assert [w.identity for w, _ in sw.routes.destinations(PROXY_C, OPEN)] == [b"other"]


@pytest.mark.parametrize("routes", [[[3]], [[3, 1, 0]], [[3, 1, 8]], [[3, 1, 2, 4]], ["x"]])
def test_a_malformed_route_is_refused(routes: list[Any]) -> None:
    sw = host_switch()
    with pytest.raises(RemoteProtocolError):
        sw.register(b"w1", reg("bad", routes))
    assert sw.routes.workers() == []


def test_status_shows_route_kinds() -> None:
    sw = host_switch()
    sw.register(b"w1", reg("p", [[PROXY_C, OPEN, R], [PROXY_C, DATA, S], [PROXY_C, 3],
                                 [PROXY_C, 4, M | R]]))
    assert sw.routes.workers()[0].describe()["routes"] == [
        "proxy-client:1/request", "proxy-client:2/stream", "proxy-client:3",
        "proxy-client:4/message|request"]


# -- error codes, and peers of 0.1.0 (plain-text reasons) -------------------------------------

def _error_ack(pid: int, payload: bytes) -> Package:
    return pkg(PackageType.ACK, entity=PROXY_S, pid=pid, payload=payload,
               flags=PackageFlag.ERROR)


def test_a_coded_peer_gets_and_gives_coded_error_acks_unchanged() -> None:
    sw = host_switch()
    (req,) = of(sw.from_worker(b"wA", "vm1", pkg(PackageType.REQUEST, pid=7).header(), b""),
                ToTunnel)
    coded = ErrorReply(ErrorCode.LIMIT, "vm1: 512 requests in flight: limit reached").encode()
    (back,) = of(sw.from_tunnel("vm1", _error_ack(header_of(req).id, coded)), ToWorker)
    assert back.payload == coded and header_of(back).length == len(coded)
    assert header_of(back).id == 7
    # a worker's coded ERROR ACK goes out as it is
    mine = _error_ack(3, coded)
    (out,) = of(sw.from_worker(b"wA", "vm1", mine.header(), mine.payload), ToTunnel)
    assert out.payload == coded and out.header == mine.header()
    # and the mux's own answers are coded too
    (_drop, answer) = sw.from_tunnel("vm1", pkg(PackageType.REQUEST, message_id=4242, pid=5))
    assert not one(answer, AnswerError).plain
    assert ErrorReply.decode(one(answer, AnswerError).package().payload).code is (
        ErrorCode.NO_HANDLER)


def test_an_old_peers_plain_reason_reaches_the_worker_coded_as_generic() -> None:
    """A guest of 0.1.0 lists no error-codes: its ERROR ACK is the reason alone, as text."""
    sw = Switch("host", "hostA", {"vm1"})
    sw.tunnel_up("vm1", coded_errors=False)
    (req,) = of(sw.from_worker(b"wA", "vm1", pkg(PackageType.REQUEST, pid=7).header(), b""),
                ToTunnel)
    text = b"no worker on guest1 handles cmd-listener message 1"
    (back,) = of(sw.from_tunnel("vm1", _error_ack(header_of(req).id, text)), ToWorker)
    h = header_of(back)
    assert h.flags & PackageFlag.ERROR and h.id == 7 and h.length == len(back.payload)
    assert ErrorReply.decode(back.payload) == ErrorReply(ErrorCode.GENERIC, text.decode())
    # invalid UTF-8 from it is read, not refused
    (req2,) = of(sw.from_worker(b"wA", "vm1", pkg(PackageType.REQUEST, pid=8).header(), b""),
                 ToTunnel)
    (bad,) = of(sw.from_tunnel("vm1", _error_ack(header_of(req2).id, b"\xff\xfeoops")),
                ToWorker)
    assert ErrorReply.decode(bad.payload).reason == "\ufffd\ufffdoops"


def test_an_old_peer_gets_plain_text_from_workers_and_from_the_mux() -> None:
    sw = Switch("host", "hostA", {"vm1"})
    sw.tunnel_up("vm1", coded_errors=False)
    coded = ErrorReply(ErrorCode.UNKNOWN_VM, "unknown VM 'x'").encode()
    mine = _error_ack(3, coded)
    (out,) = of(sw.from_worker(b"wA", "vm1", mine.header(), mine.payload), ToTunnel)
    h = header_of(out)
    assert out.payload == b"unknown VM 'x'" and h.length == len(out.payload)
    assert (h.type, h.flags, h.id, h.entity) == (PackageType.ACK, PackageFlag.ERROR, 3, PROXY_S)
    # a reply that is not an error passes untouched
    ok = pkg(PackageType.ACK, entity=PROXY_S, pid=4, payload=b"\xc3")
    (out_ok,) = of(sw.from_worker(b"wA", "vm1", ok.header(), ok.payload), ToTunnel)
    assert out_ok.payload == b"\xc3" and out_ok.header == ok.header()
    # the mux's own refusal: plain text, exactly what 0.1.0 sent
    (_drop, answer) = sw.from_tunnel("vm1", pkg(PackageType.REQUEST, message_id=4242, pid=5))
    err = one(answer, AnswerError)
    assert err.plain and err.code is ErrorCode.NO_HANDLER
    assert err.package().payload == b"no worker on hostA handles proxy-client message 4242"
