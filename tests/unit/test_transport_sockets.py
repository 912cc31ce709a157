"""Transport sockets on this machine: Unix, TCP on loopback, hybrid vsock against a stand-in
VMM, AF_VSOCK bind/listen, and the Hyper-V path (its error on Linux, its logic on a fake).

Nothing here leaves the machine: TCP uses 127.0.0.1 / ::1 only, and AF_VSOCK is only bound,
never connected, unless the vsock_loopback module is loaded (then to this machine's own CID).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Self, TypeVar

import pytest

from vmbusify.errors import AddressError, TransportError
from vmbusify.transport import (
    STREAM_LIMIT,
    FirecrackerAddress,
    HypervAddress,
    connect,
    firecracker,
    hyperv,
    listen,
    local_cid,
    service_guid,
)

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine on a fresh event loop."""
    return asyncio.run(coro)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then close."""
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def one_line(exc: BaseException) -> str:
    """The exception's message, asserted to be one line."""
    message = str(exc)
    assert message and "\n" not in message
    return message


async def exchange(address: str, payload: bytes) -> bytes:
    """Connect, send ``payload``, half-close, read everything back."""
    reader, writer = await connect(address, timeout=5)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        return await reader.read(-1)
    finally:
        writer.close()
        await writer.wait_closed()


async def serve_and_exchange(address: str, payload: bytes, handler: Handler = echo) -> bytes:
    """Listen on ``address`` with ``handler``, exchange ``payload`` with it, shut down."""
    server = await listen(address, handler)
    try:
        return await exchange(address, payload)
    finally:
        server.close()
        await server.wait_closed()


# -- Unix --------------------------------------------------------------------------------

def test_unix_data_both_ways(tmp_path: Path) -> None:
    payload = os.urandom(3 << 20)
    assert run(serve_and_exchange(f"unix:{tmp_path}/t.sock", payload)) == payload


def test_unix_server_speaks_first_and_reader_takes_big_reads(tmp_path: Path) -> None:
    address = f"unix:{tmp_path}/t.sock"
    blob = os.urandom(1 << 20)

    async def greeter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello\n" + blob)
        await writer.drain()
        assert await reader.readline() == b"thanks\n"
        writer.close()

    async def main() -> tuple[bytes, bytes]:
        server = await listen(address, greeter)
        async with server:
            reader, writer = await connect(address, timeout=5)
            first = await reader.readline()
            # One read of up to 1 MiB: the stream limit must allow it.
            await asyncio.sleep(0.05)
            chunk = await reader.read(1 << 20)
            rest = await reader.readexactly(len(blob) - len(chunk))
            writer.write(b"thanks\n")
            await writer.drain()
            assert await reader.read() == b""
            writer.close()
            return first, chunk + rest

    first, got = run(main())
    assert first == b"hello\n"
    assert got == blob
    assert STREAM_LIMIT >= 1 << 20


def test_unix_listener_is_private(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    old = os.umask(0)  # even with a wide-open umask
    try:
        async def main() -> int:
            server = await listen(f"unix:{path}", echo)
            mode = stat.S_IMODE(path.stat().st_mode)
            server.close()
            await server.wait_closed()
            return mode
        assert run(main()) == 0o600
    finally:
        os.umask(old)


def test_unix_listen_removes_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays behind, nothing listens
    assert path.exists()
    assert run(serve_and_exchange(f"unix:{path}", b"ping")) == b"ping"


def test_unix_listen_refuses_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    path.write_text("precious")
    with pytest.raises(TransportError) as info:
        run(listen(f"unix:{path}", echo))
    assert "exists and is not a socket" in one_line(info.value)
    assert path.read_text() == "precious"


def test_unix_listen_refuses_a_live_socket(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen()
    try:
        with pytest.raises(TransportError) as info:
            run(listen(f"unix:{path}", echo))
        assert "another process listens" in one_line(info.value)
        assert stat.S_ISSOCK(path.stat().st_mode)
    finally:
        live.close()


def test_unix_listen_in_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(TransportError) as info:
        run(listen(f"unix:{tmp_path}/nope/t.sock", echo))
    assert "directory does not exist" in one_line(info.value)


def test_unix_connect_errors(tmp_path: Path) -> None:
    address = f"unix:{tmp_path}/t.sock"
    with pytest.raises(TransportError) as info:
        run(connect(address, timeout=2))
    message = one_line(info.value)
    assert message.startswith(address)
    assert "ENOENT" in message

    dead = socket.socket(socket.AF_UNIX)
    dead.bind(f"{tmp_path}/t.sock")
    dead.close()
    with pytest.raises(TransportError) as info:
        run(connect(address, timeout=2))
    assert "nothing listens" in one_line(info.value)


def test_connect_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(AddressError):
        run(connect("unix:relative", timeout=1))
    with pytest.raises(TransportError, match="timeout must be > 0"):
        run(connect(f"unix:{tmp_path}/t.sock", timeout=0))


# -- TCP ---------------------------------------------------------------------------------

def test_tcp_data_both_ways() -> None:
    payload = os.urandom(1 << 20)
    address = f"tcp:127.0.0.1:{free_tcp_port()}"
    assert run(serve_and_exchange(address, payload)) == payload


def test_tcp_ipv6_loopback() -> None:
    try:
        port = free_tcp_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    assert run(serve_and_exchange(f"tcp:[::1]:{port}", b"six")) == b"six"


def test_tcp_connect_refused() -> None:
    address = f"tcp:127.0.0.1:{free_tcp_port()}"
    with pytest.raises(TransportError) as info:
        run(connect(address, timeout=2))
    message = one_line(info.value)
    assert message.startswith(address)
    assert "nothing listens" in message


def test_tcp_listen_port_taken() -> None:
    port = free_tcp_port()
    address = f"tcp:127.0.0.1:{port}"

    async def main() -> None:
        server = await listen(address, echo)
        try:
            await listen(address, echo)
        finally:
            server.close()
            await server.wait_closed()

    with pytest.raises(TransportError) as info:
        run(main())
    assert "EADDRINUSE" in one_line(info.value)


# -- Firecracker hybrid vsock ------------------------------------------------------------

class StandInVmm:
    """A stand-in for a VMM's hybrid vsock socket.

    It reads ``CONNECT <port>\\n``; for the first ``drops`` connections it closes the
    socket without answering (a guest whose driver is not up), then it answers ``reply``
    and echoes.
    """

    def __init__(self, path: Path, drops: int = 0, reply: bytes = b"OK 1073741824\n",
                 silent: bool = False) -> None:
        self.path = path
        self.drops = drops
        self.reply = reply
        self.silent = silent
        self.requests: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        self.requests.append(line)
        if len(self.requests) <= self.drops:
            writer.close()
            return
        if self.silent:
            await reader.read()  # never answers
            writer.close()
            return
        writer.write(self.reply)
        await echo(reader, writer)

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_unix_server(self.handle, str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def test_fc_handshake_then_data(tmp_path: Path) -> None:
    vmm_path = tmp_path / "v.sock"
    payload = os.urandom(1 << 20)

    async def main() -> tuple[bytes, list[bytes]]:
        async with StandInVmm(vmm_path) as vmm:
            got = await exchange(f"fc:{vmm_path}:52", payload)
            return got, vmm.requests

    got, requests = run(main())
    assert requests == [b"CONNECT 52\n"]
    assert got == payload


def test_fc_default_port_and_bytes_right_after_ok(tmp_path: Path) -> None:
    """Bytes the guest sends in the same segment as OK must reach the caller."""
    vmm_path = tmp_path / "v.sock"

    async def main() -> tuple[bytes, list[bytes]]:
        async with StandInVmm(vmm_path, reply=b"OK 1073741824\nHELLO\n") as vmm:
            reader, writer = await connect(f"fc:{vmm_path}", timeout=5)
            line = await reader.readline()
            writer.close()
            return line, vmm.requests

    line, requests = run(main())
    assert requests == [b"CONNECT 6541\n"]
    assert line == b"HELLO\n"


def test_fc_retries_while_the_vmm_drops(tmp_path: Path) -> None:
    vmm_path = tmp_path / "v.sock"

    async def main() -> tuple[bytes, int]:
        async with StandInVmm(vmm_path, drops=3) as vmm:
            got = await exchange(f"fc:{vmm_path}:52", b"after three drops")
            return got, len(vmm.requests)

    got, attempts = run(main())
    assert got == b"after three drops"
    assert attempts == 4


def test_fc_gives_up_after_the_timeout(tmp_path: Path) -> None:
    vmm_path = tmp_path / "v.sock"
    address = f"fc:{vmm_path}:52"

    async def main() -> int:
        async with StandInVmm(vmm_path, drops=10**9) as vmm:
            with pytest.raises(TransportError) as info:
                await connect(address, timeout=0.6)
            message = one_line(info.value)
            assert message.startswith(address)
            assert "timed out after 0.6 s" in message
            assert "nothing listens on vsock port 52" in message
            return len(vmm.requests)

    started = time.monotonic()
    attempts = run(main())
    assert 0.5 < time.monotonic() - started < 3
    assert attempts >= 3  # it retried, with backoff, until the deadline


def test_fc_vmm_that_never_answers(tmp_path: Path) -> None:
    vmm_path = tmp_path / "v.sock"

    async def main() -> None:
        async with StandInVmm(vmm_path, silent=True):
            await connect(f"fc:{vmm_path}:52", timeout=0.3)

    with pytest.raises(TransportError) as info:
        run(main())
    assert "never answered CONNECT" in one_line(info.value)


def test_fc_unexpected_reply_fails_at_once(tmp_path: Path) -> None:
    vmm_path = tmp_path / "v.sock"

    async def main() -> int:
        async with StandInVmm(vmm_path, reply=b"SSH-2.0-OpenSSH\n") as vmm:
            with pytest.raises(TransportError) as info:
                await connect(f"fc:{vmm_path}:52", timeout=5)
            assert "not 'OK <port>'" in one_line(info.value)
            return len(vmm.requests)

    assert run(main()) == 1


def test_fc_missing_vmm_socket_fails_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(TransportError) as info:
        run(connect(f"fc:{tmp_path}/v.sock:52", timeout=5))
    assert "no VMM socket there" in one_line(info.value)
    assert time.monotonic() - started < 2


def test_fc_listen_uses_port_suffixed_path(tmp_path: Path) -> None:
    """Guest-initiated: the VMM connects to <uds_path>_<port> and relays the stream."""
    address = FirecrackerAddress(f"{tmp_path}/v.sock", 7000)

    async def main() -> bytes:
        server = await listen(address, echo)
        try:
            path = Path(address.listen_path)
            assert path.name == "v.sock_7000"
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            # Play the VMM: connect to the per-port socket.
            return await exchange(f"unix:{path}", b"from the guest")
        finally:
            server.close()
            await server.wait_closed()

    assert run(main()) == b"from the guest"


def test_fc_backoff_is_bounded() -> None:
    assert 0 < firecracker.BACKOFF_INITIAL < firecracker.BACKOFF_MAX <= 2


# -- AF_VSOCK ----------------------------------------------------------------------------

def _vsock_available() -> bool:
    try:
        socket.socket(getattr(socket, "AF_VSOCK", 40), socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


needs_vsock = pytest.mark.skipif(not _vsock_available(), reason="no AF_VSOCK in this kernel")
VSOCK_TEST_PORT = 46541


@needs_vsock
def test_vsock_bind_and_listen_on_any() -> None:
    async def main() -> tuple[int, int, int]:
        server = await listen(f"vsock:any:{VSOCK_TEST_PORT}", echo)
        try:
            assert isinstance(server, asyncio.Server)
            sock = server.sockets[0]
            cid, port = sock.getsockname()
            # The buffers were sized before listen() (hv_sock sizes its rings from them).
            sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            return cid, port, sndbuf
        finally:
            server.close()
            await server.wait_closed()

    cid, port, sndbuf = run(main())
    assert (cid, port) == (0xFFFFFFFF, VSOCK_TEST_PORT)
    assert sndbuf >= 256 << 10


@needs_vsock
def test_vsock_port_taken() -> None:
    async def main() -> None:
        server = await listen(f"vsock:any:{VSOCK_TEST_PORT + 1}", echo)
        try:
            await listen(f"vsock:any:{VSOCK_TEST_PORT + 1}", echo)
        finally:
            server.close()
            await server.wait_closed()

    with pytest.raises(TransportError) as info:
        run(main())
    message = one_line(info.value)
    assert message.startswith(f"vsock:any:{VSOCK_TEST_PORT + 1}")
    assert "already taken" in message


def test_vsock_connect_to_any_is_refused_without_touching_the_network() -> None:
    with pytest.raises(TransportError, match="'any' is for listening"):
        run(connect("vsock:any:6541", timeout=1))


def _vsock_loopback_loaded() -> bool:
    return Path("/sys/module/vsock_loopback").exists()


@needs_vsock
@pytest.mark.skipif(not _vsock_loopback_loaded(),
                    reason="vsock_loopback is not loaded: AF_VSOCK cannot connect locally "
                           "here, and any other CID would leave this machine")
def test_vsock_connect_over_loopback() -> None:
    port = VSOCK_TEST_PORT + 2

    async def main() -> bytes:
        server = await listen(f"vsock:any:{port}", echo)
        try:
            return await exchange(f"vsock:{local_cid()}:{port}", b"over vsock")
        finally:
            server.close()
            await server.wait_closed()

    assert run(main()) == b"over vsock"


@needs_vsock
@pytest.mark.skipif(not _vsock_loopback_loaded(),
                    reason="vsock_loopback is not loaded: a connect would leave this machine")
def test_vsock_connect_to_closed_port_says_nothing_listens() -> None:
    with pytest.raises(TransportError, match="nothing listens on vsock port"):
        run(connect(f"vsock:{local_cid()}:{VSOCK_TEST_PORT + 3}", timeout=3))


@pytest.mark.skipif(not Path("/dev/vsock").exists(), reason="no /dev/vsock")
def test_local_cid() -> None:
    try:
        cid = local_cid()
    except TransportError as exc:
        pytest.skip(f"cannot read the local CID: {exc}")
    assert 2 <= cid < 0xFFFFFFFF


# -- Hyper-V -----------------------------------------------------------------------------

VMID = "5D8E6F0A-1C2B-4D3E-9F40-0123456789AB"


@pytest.mark.skipif(hasattr(socket, "AF_HYPERV"), reason="this Python has AF_HYPERV")
@pytest.mark.parametrize("action", ["connect", "listen"])
def test_hyperv_needs_windows(action: str) -> None:
    address = f"hyperv:{VMID}"

    def attempt() -> None:
        if action == "connect":
            run(connect(address, timeout=1))
        else:
            run(listen(address, echo))

    with pytest.raises(TransportError) as info:
        attempt()
    message = one_line(info.value)
    assert message.startswith(f"hyperv:{VMID}:6541: ")
    assert "Windows host with AF_HYPERV" in message
    assert "vsock" in message and "hv_sock" in message


class FakeHvSocket(socket.socket):
    """One end of a socketpair posing as a blocking AF_HYPERV socket."""

    connect_delay = 0.0
    connect_error: OSError | None = None

    def __init__(self, fileno: int, log: list[tuple[str, object]]) -> None:
        super().__init__(fileno=fileno)
        self.log = log

    def setsockopt(self, level: int, option: int, value: Any, *rest: Any) -> None:
        self.log.append(("setsockopt", (level, option, value)))

    def connect(self, address: Any) -> None:
        self.log.append(("connect", address))
        time.sleep(self.connect_delay)
        if self.connect_error is not None:
            raise self.connect_error


@pytest.fixture
def fake_hyperv(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Make hyperv.py believe it runs on Windows; its sockets are socketpair ends."""
    state: dict[str, Any] = {"log": [], "peers": [], "cls": FakeHvSocket}

    def open_socket() -> socket.socket:
        ours, theirs = socket.socketpair()
        state["peers"].append(theirs)
        fd = ours.detach()
        made: socket.socket = state["cls"](fd, state["log"])
        return made

    monkeypatch.setattr(hyperv, "available", lambda: True)
    monkeypatch.setattr(hyperv, "_open_socket", open_socket)
    yield state
    for peer in state["peers"]:
        peer.close()


def test_hyperv_connect_logic_on_a_fake_socket(fake_hyperv: dict[str, Any]) -> None:
    async def main() -> bytes:
        reader, writer = await connect(HypervAddress(VMID, 6541), timeout=2.5)
        peer: socket.socket = fake_hyperv["peers"][0]
        writer.write(b"to the guest")
        await writer.drain()
        got = peer.recv(100)
        peer.sendall(b"to the host")
        back = await reader.readexactly(11)
        writer.close()
        return got + b"|" + back

    assert run(main()) == b"to the guest|to the host"
    assert fake_hyperv["log"] == [
        ("setsockopt", (hyperv.HV_PROTOCOL_RAW, hyperv.HVSOCKET_CONNECT_TIMEOUT, 2500)),
        ("connect", (VMID, service_guid(6541))),
    ]


def test_hyperv_connect_refused_names_the_registry_key(fake_hyperv: dict[str, Any]) -> None:
    class Refusing(FakeHvSocket):
        connect_error = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    fake_hyperv["cls"] = Refusing
    with pytest.raises(TransportError) as info:
        run(connect(f"hyperv:{VMID}", timeout=1))
    message = one_line(info.value)
    assert "hyperv-register.ps1" in message
    assert message.startswith(f"hyperv:{VMID}:6541")


def test_hyperv_connect_guard_timeout(fake_hyperv: dict[str, Any],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    class Hanging(FakeHvSocket):
        connect_delay = 1.0

    fake_hyperv["cls"] = Hanging
    monkeypatch.setattr(hyperv, "_GUARD_SLACK", 0.1)
    with pytest.raises(TransportError) as info:
        run(connect(f"hyperv:{VMID}", timeout=0.2))
    assert "timed out after 0.2 s" in one_line(info.value)


def test_hyperv_listen_is_refused_even_on_windows(fake_hyperv: dict[str, Any]) -> None:
    with pytest.raises(TransportError, match="the host connects and the guest listens"):
        run(listen(f"hyperv:{VMID}", echo))


# -- vsock connect logic, without a vsock peer ---------------------------------------------

def test_nonblocking_connect_helper_on_loopback_tcp() -> None:
    """The hand-rolled non-blocking connect that vsock uses, exercised on loopback TCP."""
    from vmbusify.transport._streams import connect_nonblocking, open_streams

    port = free_tcp_port()

    async def main() -> bytes:
        server = await listen(f"tcp:127.0.0.1:{port}", echo)
        try:
            sock = socket.socket()
            sock.setblocking(False)
            await connect_nonblocking(sock, ("127.0.0.1", port))
            reader, writer = await open_streams(sock)
            writer.write(b"nonblocking")
            writer.write_eof()
            got = await reader.read()
            writer.close()
            return got
        finally:
            server.close()
            await server.wait_closed()

    assert run(main()) == b"nonblocking"

    async def refused() -> None:
        with socket.socket() as sock:
            sock.setblocking(False)
            await connect_nonblocking(sock, ("127.0.0.1", port))

    with pytest.raises(ConnectionRefusedError):
        run(refused())


@pytest.mark.parametrize(("err", "fragment"), [
    (errno.ECONNRESET, "nothing listens on vsock port 6541 in CID 3"),
    (errno.ENODEV, "no VM with CID 3 is running here"),
    (errno.EAFNOSUPPORT, "no AF_VSOCK support"),
])
def test_vsock_connect_errors_explain_themselves(monkeypatch: pytest.MonkeyPatch, err: int,
                                                 fragment: str) -> None:
    from vmbusify.transport import vsock

    async def fail(address: object) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(vsock, "_attempt", fail)
    with pytest.raises(TransportError) as info:
        run(connect("vsock:3", timeout=1))
    message = one_line(info.value)
    assert message.startswith("vsock:3:6541: connect failed")
    assert fragment in message


def test_vsock_connect_retries_kernel_timeouts_until_the_deadline(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel gives up after 2 s; a longer caller timeout means trying again."""
    from vmbusify.transport import vsock

    attempts: list[float] = []

    async def slow_timeout(address: object) -> None:
        attempts.append(time.monotonic())
        await asyncio.sleep(0.1)  # stands in for the kernel's 2 s
        raise OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))

    monkeypatch.setattr(vsock, "_attempt", slow_timeout)
    with pytest.raises(TransportError) as info:
        run(connect("vsock:3", timeout=0.7))
    message = one_line(info.value)
    assert "timed out after 0.7 s" in message
    assert "did not answer" in message
    assert len(attempts) >= 3


def test_take_over_hands_on_unread_bytes_and_eof() -> None:
    """A tunnel takes a connected transport from its asyncio streams: bytes the StreamReader
    already received, and an EOF it already saw, are not lost."""
    from vmbusify.transport import take_over

    class Sink(asyncio.Protocol):
        def __init__(self) -> None:
            self.data = b""

        def data_received(self, data: bytes) -> None:
            self.data += data

    async def scenario() -> None:
        a, b = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=a)
        b.sendall(b"early")
        await asyncio.sleep(0.05)
        sink = Sink()
        early, eof = take_over(reader, writer, sink)
        assert (early, eof) == (b"early", False)
        b.sendall(b"later")
        await asyncio.sleep(0.05)
        assert sink.data == b"later"
        writer.close()
        b.close()

        a, b = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=a)
        b.sendall(b"bye")
        b.close()
        await asyncio.sleep(0.05)
        early, eof = take_over(reader, writer, Sink())
        assert (early, eof) == (b"bye", True)
        writer.close()

    asyncio.run(scenario())
