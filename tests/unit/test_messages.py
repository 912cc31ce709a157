"""Every message of every entity in one shape (vmbusify.protocol.message), the bytes it
puts on the wire unchanged since 0.1.0, strict decoding of hostile bodies, and the link's
typed sync_send / async_send (no sockets, no ZeroMQ)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_bus_dispatch import Harness
from vmbusify.errors import RemoteProtocolError
from vmbusify.lab.release import release_file
from vmbusify.protocol import exec as ex
from vmbusify.protocol import proxy, tunnel
from vmbusify.protocol import subnet as sn
from vmbusify.protocol.entities import Entity, TunnelMessage
from vmbusify.protocol.exec_api import ExitReason
from vmbusify.protocol.message import Message
from vmbusify.protocol.package import Package, PackageFlag, PackageType
from vmbusify.protocol.proxy import Command, OpenAck, ProxyMessage, ProxyOpen, ReplyCode
from vmbusify.protocol.serialize import dumps
from vmbusify.protocol.tunnel import Auth, Bye, Hello, Ping, Pong, Stats, WorkerLost

#: One sample of each message, as the code before the one-scheme change built it (the call
#: sites' dicts for SIGNAL, RESIZE, KILL, KEEPALIVE and HOST_READY, which had no class).
SAMPLES: dict[str, Message] = {
    "START": ex.ExecSpec(argv=["sh", "-c", "echo hi"], env={"A": "1"}, cwd="/tmp", user="root",
                      tty=True, stdin=True, timeout=5.0, rows=24, cols=80, term="xterm",
                      side_stream=7),
    "START_min": ex.ExecSpec(argv=["true"]),
    "START_detach": ex.ExecSpec(argv=["sleep", "9"], detach=True),
    "START_reply_pid": ex.StartReply(pid=4242),
    "START_reply_fail": ex.StartReply(exit_code=127, message="x: not found"),
    "EXIT": ex.ExitStatus(130, ExitReason.SIGNALED, "killed by SIGINT", 5, 2),
    "EXIT_plain": ex.ExitStatus(0, ExitReason.EXITED),
    "SIGNAL": ex.SendSignal(5, "INT"),
    "RESIZE": ex.Resize(50, 132, 5),
    "KILL": ex.Kill(5, "client went away"),
    "OPEN": ProxyOpen("example.org", 443),
    "OPEN_udp": ProxyOpen("10.0.0.1", 53, Command.UDP),
    "OPEN_ACK": OpenAck(ReplyCode.SUCCEEDED, "10.0.0.2", 40000),
    "OPEN_ACK_fail": OpenAck(ReplyCode.NOT_ALLOWED, reason="policy"),
    "ATTACH": sn.Attach("g1", False),
    "LEASE": sn.Lease("vm1", "100.77.0.2", 24, "100.77.0.1", 65000, 65000, ["100.77.0.1"],
                   "fd00::2", 64, "fd00::1"),
    "KEEPALIVE": sn.Keepalive(3),
    "KEEPALIVE_reply": sn.KeepaliveReply(),
    "HOST_READY": sn.HostReady(),
    "HELLO": Hello("guest", "vm1", "0.2.0", 1, ["10.0.0.2"], b"n" * 32, ["auth", "key"]),
    "HELLO_old": Hello("host", "h", "0.1.0"),
    "PING": Ping(77),
    "PONG": Pong(77),
    "WORKER_LOST": WorkerLost([3, 4]),
    "BYE": Bye("another host"),
    "AUTH": Auth(b"p" * 32),
    "STATS": Stats({"mux.bytes_in": 10.0}),
}

#: The payloads those samples had before the change (hex of the msgpack), fixed here.
GOLDEN: dict[str, str | tuple[str, ...]] = {
    "START": (
        "8ba46172677693a27368a22d63a76563686f206869a3656e7681a141a131a3637764a42f746d70a4"
        "75736572a4726f6f74a3747479c3a5737464696ec3a774696d656f7574cb4014000000000000a472"
        "6f777318a4636f6c7350a47465726da5787465726dab736964655f73747265616d07"
    ),
    "START_min": "81a46172677691a474727565",
    "START_detach": "82a46172677692a5736c656570a139a6646574616368c3",
    "START_reply_pid": "81a3706964cd1092",
    "START_reply_fail": (
        "82a9657869745f636f64657fa76d657373616765ac783a206e6f7420666f756e64"
    ),
    "EXIT": (
        "85a9657869745f636f6465cc82a6726561736f6ea87369676e616c6564a76d657373616765b06b69"
        "6c6c656420627920534947494e54a2696405a67369676e616c02"
    ),
    "EXIT_plain": "82a9657869745f636f646500a6726561736f6ea6657869746564",
    "SIGNAL": "82a2696405a67369676e616ca3494e54",
    "RESIZE": "83a2696405a4726f777332a4636f6c73cc84",
    "KILL": "82a2696405a6726561736f6eb0636c69656e742077656e742061776179",
    "OPEN": "83a4686f7374ab6578616d706c652e6f7267a4706f7274cd01bba3636d6401",
    "OPEN_udp": "83a4686f7374a831302e302e302e31a4706f727435a3636d6403",
    "OPEN_ACK": (
        "84a57265706c7900a4686f7374a831302e302e302e32a4706f7274cd9c40a6726561736f6ea0"
    ),
    "OPEN_ACK_fail": (
        "84a57265706c7902a4686f7374a7302e302e302e30a4706f727400a6726561736f6ea6706f6c6963"
        "79"
    ),
    "ATTACH": "82a46e616d65a26731a76f66666c6f6164c2",
    "LEASE": (
        "8aa4766d6964a3766d31a761646472657373aa3130302e37372e302e32a97072656669786c656e18"
        "a767617465776179aa3130302e37372e302e31a36d7475cdfde8a66d6574726963cdfde8a3646e73"
        "91aa3130302e37372e302e31a86164647265737336a7666430303a3a32aa7072656669786c656e36"
        "40a86761746577617936a7666430303a3a31"
    ),
    "KEEPALIVE": "81a673747265616d03",
    "KEEPALIVE_reply": "81a26f6bc3",
    "HOST_READY": "80",
    "HELLO": (
        "87a4726f6c65a56775657374a8686f73746e616d65a3766d31b0736f6674776172655f7665727369"
        "6f6ea5302e322e30b070726f746f636f6c5f76657273696f6e01a369707391a831302e302e302e32"
        "a56e6f6e6365c4206e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e"
        "a8666561747572657392a461757468a36b6579"
    ),
    "HELLO_old": (
        "87a4726f6c65a4686f7374a8686f73746e616d65a168b0736f6674776172655f76657273696f6ea5"
        "302e312e30b070726f746f636f6c5f76657273696f6e01a369707390a56e6f6e6365c400a8666561"
        "747572657390"
    ),
    "PING": "81a56e6f6e63654d",
    "PONG": "81a56e6f6e63654d",
    "WORKER_LOST": "81a8656e746974696573920304",
    "BYE": "81a6726561736f6eac616e6f7468657220686f7374",
    "AUTH": (
        "81a570726f6f66c42070707070707070707070707070707070707070707070707070707070707070"
        "70"
    ),
    "STATS": "81a8636f756e7465727381ac6d75782e62797465735f696ecb4024000000000000",
}

#: (entity, message id) each message goes out as (the package header).
HEADERS: dict[type[Message], tuple[int, int]] = {
    ex.ExecSpec: (Entity.CMD_LISTENER, ex.ExecMessage.START),
    ex.StartReply: (Entity.CMD_EXECUTOR, ex.ExecMessage.START),
    ex.ExitStatus: (Entity.CMD_EXECUTOR, ex.ExecMessage.EXIT),
    ex.SendSignal: (Entity.CMD_LISTENER, ex.ExecMessage.SIGNAL),
    ex.Resize: (Entity.CMD_LISTENER, ex.ExecMessage.RESIZE),
    ex.Kill: (Entity.CMD_LISTENER, ex.ExecMessage.KILL),
    ProxyOpen: (Entity.PROXY_CLIENT, ProxyMessage.OPEN),
    OpenAck: (Entity.PROXY_SERVER, ProxyMessage.OPEN),
    sn.Attach: (Entity.IP_BEARER, sn.SubnetMessage.ATTACH),
    sn.Lease: (Entity.IP_BEARER, sn.SubnetMessage.ATTACH),
    sn.Keepalive: (Entity.IP_BEARER, sn.SubnetMessage.KEEPALIVE),
    sn.KeepaliveReply: (Entity.IP_BEARER, sn.SubnetMessage.KEEPALIVE),
    sn.HostReady: (Entity.IP_BEARER, sn.SubnetMessage.HOST_READY),
    Hello: (Entity.TUNNEL, TunnelMessage.HELLO),
    Ping: (Entity.TUNNEL, TunnelMessage.PING),
    Pong: (Entity.TUNNEL, TunnelMessage.PONG),
    WorkerLost: (Entity.TUNNEL, TunnelMessage.WORKER_LOST),
    Bye: (Entity.TUNNEL, TunnelMessage.BYE),
    Auth: (Entity.TUNNEL, TunnelMessage.AUTH),
    Stats: (Entity.TUNNEL, TunnelMessage.STATS),
}


def _golden(name: str) -> bytes:
    value = GOLDEN[name]
    return bytes.fromhex(value if isinstance(value, str) else "".join(value))


def _message_classes() -> list[type[Message]]:
    """Every Message subclass the protocol modules define."""
    found = []
    for module in (ex, proxy, sn, tunnel):
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Message) and obj is not Message \
                    and obj.__module__ == module.__name__:
                found.append(obj)
    return found


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_the_wire_bytes_are_those_of_before(name: str) -> None:
    msg = SAMPLES[name]
    assert msg.payload() == _golden(name)
    assert type(msg).from_payload(_golden(name)) == msg


def test_every_message_has_one_shape_and_its_header() -> None:
    classes = _message_classes()
    assert set(classes) == set(HEADERS), "a message class without a header entry (or gone)"
    assert {type(m) for m in SAMPLES.values()} == set(HEADERS)
    for cls, (entity, message_id) in HEADERS.items():
        assert (entity, message_id) == (cls.ENTITY, cls.MESSAGE_ID), cls
        assert cls.NAME


def test_a_tunnel_message_packages_itself() -> None:
    pkg = Bye("closing").package()
    assert (pkg.type, pkg.entity, pkg.message_id) == (PackageType.MESSAGE, Entity.TUNNEL,
                                                     TunnelMessage.BYE)
    assert Bye.from_payload(pkg.payload) == Bye("closing")


HOSTILE_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=8)


@pytest.mark.parametrize("name", sorted(SAMPLES))
@given(data=st.data())
def test_a_hostile_body_is_a_remote_protocol_error_or_a_message(name: str,
                                                                data: st.DataObject) -> None:
    """Any key of a real body set to anything (wrong type, null, nesting), or dropped, or the
    body not a map at all: the decoder returns a message or raises RemoteProtocolError."""
    msg = SAMPLES[name]
    body: Any = dict(msg.to_body())
    for key in data.draw(st.lists(st.sampled_from(sorted(body) or ["x"]), max_size=3)):
        if data.draw(st.booleans()):
            body[key] = data.draw(HOSTILE_VALUES)
        else:
            body.pop(key, None)
    if data.draw(st.integers(0, 9)) == 0:
        body = data.draw(HOSTILE_VALUES)
    try:
        decoded = type(msg).from_body(body)
    except RemoteProtocolError as exc:
        error = str(exc)
    else:
        assert isinstance(decoded, type(msg))
        return
    assert "\n" not in error and error


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"\x93\x01\x02\x03", dumps([1]),
                                     dumps("x"), b"\x81\xa1x" + b"\x91" * 5000])
def test_a_payload_that_is_no_map_is_a_remote_protocol_error(payload: bytes) -> None:
    for cls in _message_classes():
        with pytest.raises(RemoteProtocolError):
            cls.from_payload(payload)


# -- against the codecs of v0.1.0 -------------------------------------------------------------

def _v010(module: str, where: Path) -> ModuleType:
    """``vmbusify/protocol/<module>.py`` as tagged v0.1.0 (from git, or the archive the
    repository ships), loaded beside today's package."""
    source = release_file("v0.1.0", f"vmbusify/protocol/{module}.py").decode()
    path = where / f"v010_{module}.py"
    path.write_text(source)
    name = f"_v010_{module}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[name]
    return mod


def _v010_package(type: PackageType, entity: int, message_id: int, id: int = 0,
                  stream: int = 0, flags: PackageFlag = PackageFlag.NONE,
                  payload: bytes = b"") -> Package:
    """v0.1.0's ``Package(type, entity, message_id, id, stream, flags, payload)``, positional as
    its codecs call it, made with today's keyword-only Package (same fields, same wire)."""
    return Package(type=type, flags=flags, entity=entity, id=id, message_id=message_id,
                   stream=stream, payload=payload)


def test_the_bodies_match_what_v0_1_0_sends(tmp_path: Path) -> None:
    """The same messages encoded by v0.1.0's codecs: the very same bytes (HELLO gained
    optional fields since, which 0.1.0 ignores; its own test is in test_tunnel_auth)."""
    ox, op, os_, ot = (_v010(m, tmp_path) for m in ("exec", "proxy", "subnet", "tunnel"))
    vars(ot)["Package"] = _v010_package  # its package() calls Package positionally, as 0.1.0 did
    pairs: list[tuple[str, Any]] = []
    for name in ("START", "START_min", "START_detach"):
        spec = SAMPLES[name]
        assert isinstance(spec, ex.ExecSpec)
        pairs.append((name, ox.ExecSpec(**vars(spec)).to_body()))
    pairs += [
        ("START_reply_pid", ox.StartReply(pid=4242).to_body()),
        ("START_reply_fail", ox.StartReply(exit_code=127, message="x: not found").to_body()),
        ("EXIT", ox.ExitStatus(130, ExitReason.SIGNALED, "killed by SIGINT", 5, 2).to_body()),
        ("EXIT_plain", ox.ExitStatus(0, ExitReason.EXITED).to_body()),
        ("OPEN", op.ProxyOpen("example.org", 443).encode()),
        ("OPEN_udp", op.ProxyOpen("10.0.0.1", 53, op.Command.UDP).encode()),
        ("OPEN_ACK", op.OpenAck(op.ReplyCode.SUCCEEDED, "10.0.0.2", 40000).encode()),
        ("OPEN_ACK_fail", op.OpenAck(op.ReplyCode.NOT_ALLOWED, reason="policy").encode()),
        ("ATTACH", os_.Attach("g1", False).to_body()),
        ("LEASE", os_.Lease("vm1", "100.77.0.2", 24, "100.77.0.1", 65000, 65000,
                            ["100.77.0.1"], "fd00::2", 64, "fd00::1").to_body()),
    ]
    for name, body in pairs:
        assert SAMPLES[name].payload() == dumps(body), name
    for name, old_msg in (("PING", ot.Ping(77)), ("PONG", ot.Pong(77)),
                          ("WORKER_LOST", ot.WorkerLost([3, 4])),
                          ("BYE", ot.Bye("another host"))):
        assert SAMPLES[name].payload() == bytes(old_msg.package().payload), name


# -- the link's typed sends -------------------------------------------------------------------

def test_sync_send_goes_out_as_its_entity_and_decodes_the_typed_reply() -> None:
    async def scenario() -> None:
        h = Harness()
        try:
            call = asyncio.ensure_future(h.link.sync_send("vm1", SAMPLES["OPEN"], OpenAck,
                                                          stream=9, timeout=5))
            await h.settle()
            vmid, req = h.sent[-1]
            assert (vmid, req.type, req.entity, req.message_id, req.stream) == (
                "vm1", PackageType.REQUEST, Entity.PROXY_CLIENT, ProxyMessage.OPEN, 9)
            assert bytes(req.payload) == _golden("OPEN")
            h.feed("vm1", Package(type=PackageType.ACK, entity=Entity.PROXY_SERVER, id=req.id,
                                  message_id=ProxyMessage.OPEN, stream=9,
                                  payload=_golden("OPEN_ACK")))
            assert await call == SAMPLES["OPEN_ACK"]

            # A reply that does not fit its type: RemoteProtocolError, with the reason.
            keepalive = asyncio.ensure_future(h.link.sync_send("vm1", sn.Keepalive(3),
                                                               sn.KeepaliveReply, timeout=5))
            await h.settle()
            req = h.sent[-1][1]
            h.feed("vm1", Package(type=PackageType.ACK, entity=Entity.IP_BEARER, id=req.id,
                                  message_id=sn.SubnetMessage.KEEPALIVE,
                                  payload=dumps({"ok": "yes"})))
            with pytest.raises(RemoteProtocolError, match="KEEPALIVE reply: 'ok'"):
                await keepalive

            # No reply type: the ACK's payload is not looked at.
            bare = asyncio.ensure_future(h.link.sync_send("vm1", sn.HostReady(), timeout=5))
            await h.settle()
            req = h.sent[-1][1]
            h.feed("vm1", Package(type=PackageType.ACK, flags=PackageFlag(0),
                                  entity=Entity.IP_BEARER, id=req.id,
                                  message_id=sn.SubnetMessage.HOST_READY, payload=b""))
            await bare
            assert bare.result() is None
        finally:
            await h.close()

    asyncio.run(scenario())


def test_async_send_goes_out_as_a_message_of_its_entity() -> None:
    async def scenario() -> None:
        h = Harness()
        try:
            await h.link.async_send("vm1", SAMPLES["KILL"], stream=5)
            vmid, pkg = h.sent[-1]
            assert (vmid, pkg.type, pkg.entity, pkg.message_id, pkg.stream) == (
                "vm1", PackageType.MESSAGE, Entity.CMD_LISTENER, ex.ExecMessage.KILL, 5)
            assert bytes(pkg.payload) == _golden("KILL")
        finally:
            await h.close()

    asyncio.run(scenario())
