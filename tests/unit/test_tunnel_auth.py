"""The guest accepts only its real host: HELLO/AUTH codec, the key proof, key files, the
vsock admission rule and the privileged source port (no sockets but AF_VSOCK binds)."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from vmbusify.config import TunnelConfig
from vmbusify.errors import ConfigError, RemoteProtocolError
from vmbusify.mux.admission import admission
from vmbusify.mux.keys import load_key
from vmbusify.protocol import auth
from vmbusify.protocol.auth import Side
from vmbusify.protocol.entities import Entity
from vmbusify.protocol.serialize import dumps
from vmbusify.protocol.tunnel import NONCE_SIZE, PROOF_SIZE, Auth, Feature, Hello
from vmbusify.transport import vsock
from vmbusify.transport.vsock import GuestTransport, bind_privileged, guest_transport

KEY = b"k" * 32
OTHER = b"o" * 32


def _hello(**kw: Any) -> Hello:
    base: dict[str, Any] = {"role": "host", "hostname": "h", "software_version": "1"}
    return Hello(**{**base, **kw})


def _old_payload(**extra: Any) -> bytes:
    """A HELLO as v0.1.0 sends it: no nonce, no features."""
    return dumps({"role": "guest", "hostname": "g", "software_version": "0.1.0",
                  "protocol_version": 1, "ips": ["10.0.0.1"], **extra})


# -- codec ---------------------------------------------------------------------------------

def test_hello_round_trip_with_nonce_and_features() -> None:
    nonce = auth.new_nonce()
    h = _hello(nonce=nonce, features=auth.features(True))
    back = Hello.from_payload(h.package().payload)
    assert back == h
    assert back.has(Feature.AUTH) and back.has(Feature.KEY)


def test_hello_of_an_older_peer_decodes_with_empty_nonce_and_features() -> None:
    h = Hello.from_payload(_old_payload())
    assert h.nonce == b"" and h.features == []
    assert not h.has(Feature.AUTH)


def test_unknown_features_are_ignored_and_bad_ones_refused() -> None:
    h = Hello.from_payload(_old_payload(features=["teleport", "auth", "x" * 500] + ["f"] * 100))
    assert h.has(Feature.AUTH) and not h.has(Feature.KEY)
    assert len(h.features) == 32 and all(len(f) <= 64 for f in h.features)
    for bad in ("auth", [1], [b"auth"], {"auth": 1}):
        with pytest.raises(RemoteProtocolError, match="features"):
            Hello.from_payload(_old_payload(features=bad))


@pytest.mark.parametrize("nonce", ["text", 5, b"n" * (NONCE_SIZE + 1)])
def test_a_bad_nonce_is_a_protocol_error(nonce: Any) -> None:
    with pytest.raises(RemoteProtocolError, match="nonce"):
        Hello.from_payload(_old_payload(nonce=nonce))


def test_auth_round_trip_and_bad_proofs() -> None:
    a = Auth(b"p" * PROOF_SIZE)
    assert Auth.from_payload(a.package().payload) == a
    bad: list[Any] = [{}, {"proof": "text"}, {"proof": b"short"}, {"proof": b"p" * 33}, []]
    for payload in bad:
        with pytest.raises(RemoteProtocolError, match="AUTH"):
            Auth.from_payload(dumps(payload))


# -- the proof -----------------------------------------------------------------------------

def test_a_proof_checks_with_the_same_key_and_nonces_only() -> None:
    nh, ng = auth.new_nonce(), auth.new_nonce()
    p = auth.proof(KEY, Side.HOST, nh, ng)
    assert len(p) == PROOF_SIZE
    assert auth.verify(KEY, Side.HOST, nh, ng, p)
    assert not auth.verify(OTHER, Side.HOST, nh, ng, p)  # wrong key
    assert not auth.verify(KEY, Side.HOST, nh, ng, auth.proof(OTHER, Side.HOST, nh, ng))


def test_a_replayed_proof_fails_on_a_new_connection() -> None:
    """A proof seen on one connection is useless on the next: the guest's nonce is new."""
    nh, ng = auth.new_nonce(), auth.new_nonce()
    seen = auth.proof(KEY, Side.HOST, nh, ng)
    assert not auth.verify(KEY, Side.HOST, nh, auth.new_nonce(), seen)
    assert not auth.verify(KEY, Side.HOST, auth.new_nonce(), ng, seen)


def test_a_reflected_proof_fails() -> None:
    """The host's proof sent back as the guest's (or the other way) does not check."""
    nh, ng = auth.new_nonce(), auth.new_nonce()
    assert not auth.verify(KEY, Side.GUEST, nh, ng, auth.proof(KEY, Side.HOST, nh, ng))
    assert not auth.verify(KEY, Side.HOST, nh, ng, auth.proof(KEY, Side.GUEST, nh, ng))
    # nor with the nonces swapped (a peer echoing our nonce as its own)
    assert not auth.verify(KEY, Side.GUEST, nh, ng, auth.proof(KEY, Side.HOST, ng, nh))


def test_a_missing_or_empty_proof_or_nonce_fails() -> None:
    nh, ng = auth.new_nonce(), auth.new_nonce()
    assert not auth.verify(KEY, Side.HOST, nh, ng, b"")
    assert not auth.verify(KEY, Side.HOST, nh, ng, b"\0" * PROOF_SIZE)
    assert not auth.verify(KEY, Side.HOST, b"", ng, auth.proof(KEY, Side.HOST, nh, ng))
    with pytest.raises(ValueError, match="a proof needs two nonces"):
        auth.proof(KEY, Side.HOST, b"", ng)


# -- who refuses whom, before any proof -----------------------------------------------------

def test_no_keys_at_all_changes_nothing() -> None:
    old = Hello.from_payload(_old_payload())
    assert auth.guest_refusal(False, old, auth.new_nonce()) is None
    assert auth.host_refusal(False, old, auth.new_nonce()) is None
    # no "key": a keyless peer expects no AUTH
    assert auth.features(False) == ["auth", "error-codes", "stats"]


def test_a_guest_with_a_key_refuses_a_host_that_cannot_prove_it() -> None:
    ng = auth.new_nonce()
    old = _hello()  # 0.1.0: no features at all
    assert "older than this guest" in str(auth.guest_refusal(True, old, ng))
    keyless = _hello(nonce=auth.new_nonce(), features=auth.features(False))
    assert "no key for this VM" in str(auth.guest_refusal(True, keyless, ng))
    no_nonce = _hello(features=auth.features(True))
    assert "no usable nonce" in str(auth.guest_refusal(True, no_nonce, ng))
    echo = _hello(nonce=ng, features=auth.features(True))  # our own nonce sent back
    assert "no usable nonce" in str(auth.guest_refusal(True, echo, ng))
    keyed = _hello(nonce=auth.new_nonce(), features=auth.features(True))
    assert auth.guest_refusal(True, keyed, ng) is None


def test_a_keyless_guest_says_so_to_a_host_with_a_key() -> None:
    keyed = _hello(nonce=auth.new_nonce(), features=auth.features(True))
    assert "this guest has none" in str(auth.guest_refusal(False, keyed, auth.new_nonce()))


def test_a_host_with_a_key_refuses_a_guest_that_cannot_answer() -> None:
    nh = auth.new_nonce()
    old = Hello.from_payload(_old_payload())
    assert "older than this host" in str(auth.host_refusal(True, old, nh))
    keyless = _hello(role="guest", nonce=auth.new_nonce(), features=auth.features(False))
    assert "the guest has no key" in str(auth.host_refusal(True, keyless, nh))
    keyed = _hello(role="guest", nonce=auth.new_nonce(), features=auth.features(True))
    assert auth.host_refusal(True, keyed, nh) is None


def test_refusal_reasons_carry_nothing_of_the_key() -> None:
    texts = [auth.WRONG_HOST_PROOF, auth.WRONG_GUEST_PROOF,
             str(auth.guest_refusal(True, _hello(), auth.new_nonce()))]
    assert not any(KEY.decode() in t for t in texts)


# -- key files -----------------------------------------------------------------------------

def _key_file(tmp_path: Path, text: bytes = b"  " + KEY + b"\n", mode: int = 0o600) -> Path:
    path = tmp_path / "tunnel.key"
    path.write_bytes(text)
    path.chmod(mode)
    return path


def test_a_root_only_key_file_is_read_trimmed(tmp_path: Path) -> None:
    assert load_key(str(_key_file(tmp_path))) == KEY


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_key_file_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = _key_file(tmp_path, mode=mode)
    with pytest.raises(ConfigError, match=f"group or others.*chmod 600 {path}"):
        load_key(str(path))


def test_a_short_missing_or_odd_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"at least 16.*urandom"):
        load_key(str(_key_file(tmp_path, b"short\n")))
    with pytest.raises(ConfigError, match="No such file"):
        load_key(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="not a regular file"):
        load_key(str(tmp_path))
    (tmp_path / "big").write_bytes(b"x" * 5000)
    (tmp_path / "big").chmod(0o600)
    with pytest.raises(ConfigError, match="larger than"):
        load_key(str(tmp_path / "big"))


@pytest.mark.root
def test_a_key_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = _key_file(tmp_path)
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        load_key(str(path))


# -- the vsock admission rule --------------------------------------------------------------

def _rule(setting: str, transport: GuestTransport, key_file: str = "",
          listen: str = "vsock:any:6541") -> Any:
    return admission(TunnelConfig(listen=listen, require_privileged_port=setting,
                                  key_file=key_file), transport)


@pytest.mark.parametrize(("setting", "transport", "key_file", "cid_only", "port"), [
    ("auto", GuestTransport.VIRTIO, "", True, True),     # KVM/QEMU guest, no key
    ("auto", GuestTransport.UNKNOWN, "", True, True),    # unsure: the safe side
    ("auto", GuestTransport.VIRTIO, "/k", True, False),  # the key guards (Firecracker too)
    ("auto", GuestTransport.HYPERV, "", True, False),    # hv_sock: ports say nothing
    ("on", GuestTransport.HYPERV, "", True, True),
    ("off", GuestTransport.VIRTIO, "", False, False),
])
def test_the_rule_per_setting_transport_and_key(setting: str, transport: GuestTransport,
                                                key_file: str, cid_only: bool,
                                                port: bool) -> None:
    rule = _rule(setting, transport, key_file)
    assert (rule.host_cid_only, rule.privileged_port) == (cid_only, port)


def test_a_unix_listener_has_no_port_rule() -> None:
    rule = _rule("on", GuestTransport.VIRTIO, listen="unix:/tmp/x.sock")
    assert rule.refusal("") is None and rule.refusal(None) is None


def test_refusals_by_peer_address() -> None:
    rule = _rule("auto", GuestTransport.VIRTIO)
    assert rule.refusal((2, 1023)) is None
    assert rule.refusal((2, 1)) is None
    assert "port 1024" in str(rule.refusal((2, 1024)))
    assert "port 1073741825" in str(rule.refusal((2, 1073741825)))  # Firecracker's range
    assert "CID 1" in str(rule.refusal((1, 500)))  # vsock loopback: a guest user
    assert "CID 7" in str(rule.refusal((7, 500)))
    assert "not a vsock address" in str(rule.refusal("/tmp/x"))
    keyed = _rule("auto", GuestTransport.VIRTIO, "/k")
    assert keyed.refusal((2, 40000)) is None and keyed.refusal((1, 40000)) is not None
    assert _rule("off", GuestTransport.VIRTIO).refusal((1, 40000)) is None


def _sysfs(tmp_path: Path, virtio: bool = False, vmbus: bool = False) -> str:
    drv = tmp_path / "bus/virtio/drivers/vmw_vsock_virtio_transport"
    drv.mkdir(parents=True)
    if virtio:
        (drv / "virtio3").mkdir()
    if vmbus:
        (tmp_path / "bus/vmbus/devices/some-guid").mkdir(parents=True)
    return str(tmp_path)


def test_the_guest_transport_from_sysfs(tmp_path: Path) -> None:
    assert guest_transport(_sysfs(tmp_path / "a", virtio=True)) is GuestTransport.VIRTIO
    assert guest_transport(_sysfs(tmp_path / "b", vmbus=True)) is GuestTransport.HYPERV
    assert guest_transport(_sysfs(tmp_path / "c")) is GuestTransport.UNKNOWN  # driver, no device
    assert guest_transport(str(tmp_path / "none")) is GuestTransport.UNKNOWN


# -- the host's privileged source port ------------------------------------------------------

class _FakeSock:
    """Fails bind() with ``errors[port]`` where given."""

    def __init__(self, errors: dict[int, int]) -> None:
        self.errors = errors
        self.tried: list[int] = []

    def bind(self, addr: tuple[int, int]) -> None:
        self.tried.append(addr[1])
        err = self.errors.get(addr[1])
        if err is not None:
            raise OSError(err, os.strerror(err))


def test_bind_privileged_skips_taken_ports_downward() -> None:
    s = _FakeSock({1023: errno.EADDRINUSE, 1022: errno.EADDRINUSE})
    assert bind_privileged(s) == 1021  # type: ignore[arg-type]
    assert s.tried == [1023, 1022, 1021]


def test_bind_privileged_gives_up_without_the_right_or_a_free_port() -> None:
    assert bind_privileged(_FakeSock({1023: errno.EACCES})) is None  # type: ignore[arg-type]
    full = _FakeSock(dict.fromkeys(range(1, 1024), errno.EADDRINUSE))
    assert bind_privileged(full) is None  # type: ignore[arg-type]
    assert full.tried == list(range(1023, 0, -1))
    with pytest.raises(OSError, match=os.strerror(errno.EINVAL)):
        bind_privileged(_FakeSock({1023: errno.EINVAL}))  # type: ignore[arg-type]


def _vsock_or_skip() -> socket.socket:
    try:
        return vsock.new_socket()
    except OSError as exc:
        pytest.skip(f"no AF_VSOCK here: {exc}")


@pytest.mark.root
def test_bind_privileged_on_real_vsock_sockets() -> None:
    """Two sockets get two different ports below 1024 (the kernel lets root bind them)."""
    a, b = _vsock_or_skip(), _vsock_or_skip()
    try:
        pa = bind_privileged(a)
        pb = bind_privileged(b)
        assert pa is not None and pb is not None and pb < pa <= 1023
        assert a.getsockname()[1] == pa and b.getsockname()[1] == pb
    finally:
        a.close()
        b.close()


@pytest.mark.root
def test_an_ordinary_user_cannot_bind_a_privileged_vsock_port() -> None:
    """What the guest relies on: as ``nobody`` (setpriv) no port below 1024 can be had, so
    bind_privileged gives up (None) and the socket stays unbound for an ordinary port."""
    import subprocess
    import sys
    _vsock_or_skip().close()
    code = ("from vmbusify.transport.vsock import bind_privileged, new_socket\n"
            "s = new_socket(); print(bind_privileged(s)); s.bind((0xFFFFFFFF, 0xFFFFFFFF))\n"
            "print(s.getsockname()[1] > 1023)\n")
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=False, cwd="/", env={**os.environ, "PYTHONPATH": str(
                             Path(__file__).resolve().parents[2])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "True"]


# -- the guest's listener applies the rule before reading a byte -----------------------------

class _FakeWriter:
    """Just what the guest's refusal path uses of a StreamWriter."""

    def __init__(self, peername: Any) -> None:
        self.peername = peername
        self.written = b""
        self.closed = False

    def get_extra_info(self, name: str) -> Any:
        return self.peername if name == "peername" else None

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


def test_the_guest_refuses_an_unprivileged_vsock_peer_with_a_bye_and_few_log_lines(
        caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import logging

    from vmbusify.config import Config, Role
    from vmbusify.mux.app import MuxApp
    from vmbusify.mux.guest import GuestSide
    from vmbusify.protocol.package import PackageDecoder
    from vmbusify.protocol.tunnel import Bye

    config = Config(role=Role.GUEST, tunnel=TunnelConfig(require_privileged_port="on"))
    app = MuxApp(config)
    try:
        side = GuestSide(app)
        assert side.admission.privileged_port
        writers = [_FakeWriter((2, 40000 + i)) for i in range(15)]

        async def connect_all() -> None:
            for w in writers:
                await side._on_connection(None, w)  # type: ignore[arg-type]

        with caplog.at_level(logging.WARNING, logger="vmbusify.mux.guest"):
            asyncio.run(connect_all())
    finally:
        app.close()
    for w in writers:
        assert w.closed
        dec = PackageDecoder()
        dec.receive_data(w.written)
        (bye,) = dec.packages()
        assert f"from port {w.peername[1]}:" in Bye.from_payload(bye.payload).reason
    lines = [r.getMessage() for r in caplog.records if "refused a host connection" in r.message]
    assert len(lines) == config.limits.log_lines_per_minute  # a flood cannot flood the log
    assert "(2, 40000)" in lines[0]
    assert side.peer.tunnel is None


# -- the Tunnel's handshake reads: AUTH, a BYE instead, nothing dispatched early ----------------

def _tunnel_on_socketpair(got: list[Any]) -> Any:
    import asyncio

    from vmbusify.mux.tunnel import Tunnel

    async def make() -> tuple[Tunnel, socket.socket]:
        a, b = socket.socketpair()
        b.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=a)
        return Tunnel(reader, writer, TunnelConfig(ping_interval=30, dead_after=60), "t",
                      lambda t, p: got.append(p)), b
    return make()


def test_receive_auth_holds_what_comes_behind_until_run() -> None:
    import asyncio

    from vmbusify.protocol.package import Package, PackageType
    from vmbusify.runtime import run_async

    async def scenario() -> None:
        got: list[Any] = []
        tunnel, peer = await _tunnel_on_socketpair(got)
        loop = asyncio.get_running_loop()
        proof = Auth(b"p" * PROOF_SIZE)
        behind = Package(type=PackageType.MESSAGE, entity=Entity.CMD_EXECUTOR, message_id=9,
                         payload=b"x")
        await loop.sock_sendall(peer, _hello(role="guest").package().encode()
                                + proof.package().encode() + behind.encode())
        await tunnel.handshake(_hello(), 5)
        assert await tunnel.receive_auth(5) == proof
        await asyncio.sleep(0.1)
        assert got == []  # not dispatched before run()
        runner = asyncio.ensure_future(tunnel.run())
        await asyncio.sleep(0.1)
        assert [p.message_id for p in got] == [9]
        tunnel.close()
        await runner
        peer.close()

    run_async(scenario())


def test_receive_auth_reports_a_bye_printably_and_refuses_anything_else() -> None:
    import asyncio

    from vmbusify.errors import ProtocolError, TunnelError
    from vmbusify.protocol.tunnel import Bye, Ping
    from vmbusify.runtime import run_async

    async def scenario() -> None:
        for after, error, match in (
                (Bye("no\nforged line").package(), TunnelError, r"peer refused: no\\x0aforged"),
                (Ping(1).package(), ProtocolError, "expected AUTH")):
            tunnel, peer = await _tunnel_on_socketpair([])
            await asyncio.get_running_loop().sock_sendall(
                peer, _hello(role="guest").package().encode() + after.encode())
            await tunnel.handshake(_hello(), 5)
            with pytest.raises(error, match=match):
                await tunnel.receive_auth(5)
            await tunnel.abort()
            peer.close()
        tunnel, peer = await _tunnel_on_socketpair([])
        await asyncio.get_running_loop().sock_sendall(peer, _hello(role="guest").package()
                                                      .encode())
        await tunnel.handshake(_hello(), 5)
        with pytest.raises(TunnelError, match=r"no AUTH within 0\.2s"):
            await tunnel.receive_auth(0.2)
        await tunnel.abort()
        peer.close()

    run_async(scenario())
