"""virtio-serial (vport:): finding the port, the resync that skips what an earlier host left,
and the listener's sessions against stand-ins for the character device (a socketpair that
can be swapped for a new one, as a host reconnects; a pty)."""

from __future__ import annotations

import asyncio
import os
import pty
import random
import socket
import tty
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmbusify.errors import AddressError, TransportError
from vmbusify.protocol.entities import Entity, TunnelMessage
from vmbusify.protocol.package import (
    MAX_PAYLOAD_LIMIT,
    Package,
    PackageDecoder,
    PackageType,
)
from vmbusify.protocol.tunnel import Bye, Hello, Ping
from vmbusify.transport import (
    PortDevice,
    TransportKind,
    VportAddress,
    connect,
    find_port,
    parse_address,
)
from vmbusify.transport.resync import (
    HELLO_MAX,
    SIGNATURE_BYTES,
    Deliver,
    Lost,
    NewHost,
    PortReader,
)
from vmbusify.transport.vport import (
    BYE_REASON,
    VportListener,
    host_address,
    libvirt_channel,
    qemu_args,
)

# -- helpers -------------------------------------------------------------------------------


def hello(role: str = "host", nonce: bytes | None = None, name: str = "host") -> bytes:
    n = os.urandom(32) if nonce is None else nonce
    return Hello(role, name, "0.0", nonce=n).package().encode()


def ping(n: int = 1) -> bytes:
    return Ping(n).package().encode()


def exec_start() -> bytes:
    """An exec START as an earlier host would have sent it (a REQUEST to the executor)."""
    return Package(type=PackageType.REQUEST, entity=Entity.CMD_LISTENER, id=7, message_id=1,
                   stream=3, payload=b"\x82\xa4argv\x91\xa2id\xa3env\x80").encode()


def delivered(events: list[Any]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Deliver))


def packages(data: bytes) -> list[Package]:
    dec = PackageDecoder(MAX_PAYLOAD_LIMIT)
    dec.receive_data(data)
    out = []
    while (pkg := dec.next_package()) is not None:
        out.append(pkg)
    return out


# -- addresses -----------------------------------------------------------------------------


def test_vport_addresses_parse_and_round_trip() -> None:
    a = parse_address("vport:org.vmbusify.0")
    assert isinstance(a, VportAddress) and a.kind is TransportKind.VPORT
    assert a.port == "org.vmbusify.0" and not a.is_path
    assert parse_address(str(a)) == a
    b = parse_address("vport:/dev/vport0p1")
    assert isinstance(b, VportAddress) and b.is_path and str(b) == "vport:/dev/vport0p1"


@pytest.mark.parametrize(("text", "words"), [
    ("vport:", "needs a port name"),
    ("vport:org vmbusify", "must be letters"),
    ("vport:../etc/passwd", "must be letters"),
    ("vport:" + "a" * 129, "must be letters"),
])
def test_bad_vport_addresses_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(AddressError, match=words):
        parse_address(text)


def test_the_host_cannot_connect_to_a_vport_and_is_told_what_to_use() -> None:
    with pytest.raises(TransportError, match=r"unix:/path"):
        asyncio.run(connect("vport:org.vmbusify.0", 1.0))


# -- finding the port ----------------------------------------------------------------------


def test_find_port_by_udev_link(tmp_path: Path) -> None:
    (tmp_path / "dev/virtio-ports").mkdir(parents=True)
    (tmp_path / "dev/virtio-ports/org.vmbusify.0").write_text("")
    assert find_port("org.vmbusify.0", str(tmp_path / "dev"), str(tmp_path / "sys")) == \
        str(tmp_path / "dev/virtio-ports/org.vmbusify.0")


def test_find_port_by_sysfs_name_without_udev(tmp_path: Path) -> None:
    for port, name in (("vport0p1", "org.qemu.guest_agent.0"), ("vport1p1", "org.vmbusify.0")):
        d = tmp_path / "sys/class/virtio-ports" / port
        d.mkdir(parents=True)
        (d / "name").write_text(name + "\n")
    got = find_port("org.vmbusify.0", str(tmp_path / "dev"), str(tmp_path / "sys"))
    assert got == str(tmp_path / "dev/vport1p1")


def test_find_port_names_the_ports_it_saw(tmp_path: Path) -> None:
    d = tmp_path / "sys/class/virtio-ports/vport0p1"
    d.mkdir(parents=True)
    (d / "name").write_text("org.qemu.guest_agent.0\n")
    with pytest.raises(TransportError, match=r"no virtio-serial port named.*vport0p1"):
        find_port("org.vmbusify.0", str(tmp_path / "dev"), str(tmp_path / "sys"))


# -- resync (sans-I/O) ---------------------------------------------------------------------


def test_stale_half_package_and_old_start_are_skipped_until_a_fresh_hello() -> None:
    r = PortReader(1 << 20)
    stale = exec_start()[:30] + exec_start() + ping()
    assert r.feed(stale) == []  # nothing delivered: no session
    h = hello()
    events = r.feed(h + ping(2))
    assert isinstance(events[0], NewHost) and events[0].skipped == len(stale)
    assert delivered(events) == h + ping(2)
    assert [p.message_id for p in packages(delivered(events))] == [
        TunnelMessage.HELLO, TunnelMessage.PING]


def test_a_hello_split_byte_by_byte_is_found() -> None:
    r = PortReader(1 << 20)
    h = hello()
    events: list[Any] = []
    for i in range(len(h)):
        events += r.feed(h[i:i + 1])
    assert sum(isinstance(e, NewHost) for e in events) == 1
    assert delivered(events) == h


@pytest.mark.parametrize("bad", [
    hello(role="guest"),                 # not the host
    hello(nonce=b""),                    # a 0.1.0 host: no nonce to make the session fresh
    hello(nonce=b"x" * 16),              # a short nonce
    Package(type=PackageType.MESSAGE, entity=Entity.TUNNEL, message_id=TunnelMessage.HELLO,
            payload=b"\xc1garbage").encode(),
])
def test_what_is_not_a_fresh_host_hello_starts_nothing(bad: bytes) -> None:
    r = PortReader(1 << 20)
    assert r.feed(bad + ping()) == []
    assert not r.in_session


def test_a_replayed_hello_starts_nothing() -> None:
    r = PortReader(1 << 20)
    h = hello()
    assert isinstance(r.feed(h)[0], NewHost)
    r.reset()  # the host went away; its HELLO comes round again
    assert r.feed(h + ping()) == []


def test_a_fake_header_promising_a_long_payload_does_not_hide_the_real_hello() -> None:
    r = PortReader(1 << 20)
    fake = Package(type=PackageType.MESSAGE, entity=Entity.TUNNEL,
                   message_id=TunnelMessage.HELLO).header()
    fake = fake[:20] + (HELLO_MAX).to_bytes(4, "big")  # waits for 64 KiB that never come
    h = hello()
    events = r.feed(fake + h)
    assert isinstance(events[0], NewHost) and delivered(events) == h


def test_garbage_never_crashes_and_keeps_little() -> None:
    rng = random.Random(14)
    r = PortReader(1 << 20)
    for _ in range(200):
        chunk = bytearray(rng.randbytes(rng.randrange(1, 5000)))
        for _ in range(rng.randrange(0, 4)):  # sprinkle signatures and HELLO-like headers
            at = rng.randrange(len(chunk))
            chunk[at:at] = rng.choice([SIGNATURE_BYTES, hello()[:24], hello()[:40]])
        assert all(not isinstance(e, NewHost) for e in r.feed(bytes(chunk)))
        assert len(r._buf) <= HELLO_MAX + 24 + 5000 + 200
    h = hello()
    events = r.feed(h)
    assert isinstance(events[0], NewHost) and delivered(events).endswith(h)


def test_in_session_a_new_host_hello_starts_a_new_session() -> None:
    r = PortReader(1 << 20)
    first = r.feed(hello() + ping(1))
    assert isinstance(first[0], NewHost)
    h2 = hello(name="host-2")
    events = r.feed(ping(2) + h2 + ping(3))
    assert isinstance(events[0], Deliver) and events[0].data == ping(2)
    assert isinstance(events[1], NewHost) and events[1].hello.hostname == "host-2"
    assert delivered(events[1:]) == h2 + ping(3)


def test_a_hello_inside_a_data_payload_is_data() -> None:
    """Only package boundaries are looked at: bytes a program sends cannot start a session."""
    r = PortReader(1 << 20)
    r.feed(hello())
    data = Package(type=PackageType.DATA, entity=Entity.CMD_LISTENER, message_id=0, stream=1,
                   payload=b"x" * 100 + hello() + b"y" * 100).encode()
    events = r.feed(data)
    assert events == [Deliver(data)]


def test_in_session_a_broken_header_ends_it_and_the_next_hello_is_found() -> None:
    r = PortReader(1 << 20)
    r.feed(hello())
    h2 = hello()
    events = r.feed(b"not a header at all, longer than 24" + h2)
    assert isinstance(events[0], Lost)
    assert isinstance(events[1], NewHost) and delivered(events) == h2


# -- the listener, against stand-ins for the character device ------------------------------


class SwappablePort:
    """A stand-in for a virtio-serial port: the guest's end of a socketpair that the test
    swaps for a fresh one when "the host" reconnects (the guest's fd would stay the same; the
    listener re-reads fileno() when it re-arms). No socket at all: the host is away."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.closed = False

    def attach(self) -> socket.socket:
        """A host connects: returns its end."""
        if self.sock is not None:
            self.sock.close()
        ours, host = socket.socketpair()
        ours.setblocking(False)
        self.sock = ours
        return host

    def fileno(self) -> int:
        assert self.sock is not None
        return self.sock.fileno()

    def read(self, n: int) -> bytes | None:
        if self.sock is None:
            return b""
        try:
            return self.sock.recv(n)
        except BlockingIOError:
            return None

    def write(self, data: bytes | memoryview) -> int:
        if self.sock is None:
            raise BrokenPipeError
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0

    def host_connected(self) -> bool:
        return self.sock is not None and PortDevice(self.sock.fileno(), "t").host_connected()

    def close(self) -> None:
        self.closed = True


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Sessions:
    """Records each session the listener hands out: what the tunnel end read."""

    def __init__(self) -> None:
        self.started: list[asyncio.StreamReader] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.ended = 0
        self.got: list[bytes] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        self.started.append(reader)
        self.writers.append(writer)
        self.got.append(b"")
        i = len(self.got) - 1
        while chunk := await reader.read(65536):
            self.got[i] += chunk
        self.ended += 1
        writer.close()


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def recv_some(sock: socket.socket, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    return await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout)


def test_sessions_follow_the_host_going_and_coming_back() -> None:
    async def scenario() -> None:
        port = SwappablePort()
        host1 = port.attach()
        host1.sendall(exec_start()[:30] + exec_start())  # left by an earlier host
        sessions = Sessions()
        listener = VportListener(port, sessions, "vport:test", hup_poll=0.02)
        listener.start()
        # A host was connected when the guest started: it is told to connect again.
        bye = packages(await recv_some(host1))
        assert bye[0].message_id == TunnelMessage.BYE
        assert Bye.from_payload(bye[0].payload).reason == BYE_REASON
        assert sessions.started == []
        h1 = hello(name="one")
        host1.sendall(h1 + ping(1))
        await until(lambda: len(sessions.got) == 1 and len(sessions.got[0]) == len(h1 + ping(1)))
        assert sessions.got[0] == h1 + ping(1)  # the stale START never reached the tunnel
        assert listener.skipped == len(exec_start()) + 30
        # The tunnel's answer reaches the host.
        sessions.writers[0].write(b"guest says hi")
        assert await recv_some(host1) == b"guest says hi"
        # The host goes away (POLLHUP): the session's tunnel sees its connection closed.
        host1.sendall(ping(2)[:10])  # and leaves half a package behind
        host1.close()
        await until(lambda: sessions.ended == 1)
        assert listener.host_away_count == 1
        # It comes back: a new session, only after the first handler returned.
        host2 = port.attach()
        h2 = hello(name="two")
        host2.sendall(b"\x00garbage" + h2)
        await until(lambda: len(sessions.got) == 2 and sessions.got[1] == h2)
        assert listener.sessions == 2
        listener.close()
        await until(lambda: sessions.ended == 2)
        assert port.closed
        host2.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_new_hello_mid_session_hands_over_to_the_new_host() -> None:
    async def scenario() -> None:
        port = SwappablePort()
        sessions = Sessions()
        listener = VportListener(port, sessions, "vport:test", hup_poll=0.02)
        listener.start()  # no host yet: polls
        await asyncio.sleep(0.05)
        host = port.attach()
        host.sendall(hello() + ping(1))
        await until(lambda: len(sessions.got) == 1)
        h2 = hello(name="back")
        host.sendall(ping(2)[:5] + h2)  # a half package of the old host, then a new HELLO
        await until(lambda: sessions.ended == 1 and len(sessions.got) == 2)
        await until(lambda: sessions.got[1] == h2)
        listener.close()
        host.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_when_the_guest_ends_the_session_the_host_gets_a_bye() -> None:
    async def scenario() -> None:
        port = SwappablePort()
        seen: list[bytes] = []

        async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(await reader.readexactly(len(h)))
            writer.close()  # e.g. the tunnel refused this host

        listener = VportListener(port, refuse, "vport:test", hup_poll=0.02)
        listener.start()
        await asyncio.sleep(0.05)
        host = port.attach()
        h = hello()
        host.sendall(h)
        got = packages(await recv_some(host))
        assert seen == [h]
        assert [Bye.from_payload(p.payload).reason for p in got] == [BYE_REASON]
        # The port scans again: the same host's later bytes start nothing ...
        host.sendall(ping(5))
        await asyncio.sleep(0.1)
        assert len(seen) == 1
        # ... and its next connection (a fresh HELLO) is a new session.
        host.sendall(hello())
        await until(lambda: len(seen) == 2)
        listener.close()
        host.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_port_device_reports_pollhup_when_the_other_end_goes() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    dev = PortDevice(os.dup(ours.fileno()), "t")
    try:
        assert dev.host_connected()
        assert dev.read(10) is None  # nothing yet, would block
        theirs.sendall(b"abc")
        assert dev.read(10) == b"abc"
        assert dev.write(b"xyz") == 3 and theirs.recv(10) == b"xyz"
        theirs.close()
        assert not dev.host_connected()
        assert dev.read(10) == b""
    finally:
        dev.close()
        ours.close()


def test_a_pty_stands_in_for_the_port() -> None:
    """A pty's slave is a character device like the port: the listener opens it by path
    (vport:/dev/pts/N), reads a session from it, and sees POLLHUP when the master closes."""
    async def scenario() -> None:
        master, slave = pty.openpty()
        tty.setraw(slave)
        path = os.ttyname(slave)
        sessions = Sessions()
        dev = PortDevice.open(path, f"vport:{path}")
        listener = VportListener(dev, sessions, f"vport:{path}", hup_poll=0.02)
        listener.start()
        h = hello()
        os.write(master, b"stale" + h)
        await until(lambda: bool(sessions.got) and sessions.got[0] == h)
        os.close(master)
        await until(lambda: sessions.ended == 1)
        assert not dev.host_connected()
        listener.close()
        os.close(slave)

    asyncio.run(asyncio.wait_for(scenario(), 30))


# -- fuzzing the resync ----------------------------------------------------------------------


_STALE = st.one_of(
    st.binary(max_size=300),
    st.just(SIGNATURE_BYTES),
    st.builds(lambda n: exec_start()[:n], st.integers(0, 39)),
    st.builds(lambda n: ping(7)[:n], st.integers(0, 40)),
    st.just(exec_start()),
    st.just(hello(role="guest")),
    st.builds(lambda b: hello(nonce=b), st.binary(max_size=31)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stale=st.lists(_STALE, max_size=12), cuts=st.lists(st.integers(1, 400), max_size=20))
def test_whatever_came_before_only_a_fresh_host_hello_starts_a_session(
        stale: list[bytes], cuts: list[int]) -> None:
    r = PortReader(1 << 20)
    h = hello()
    stream = b"".join(stale) + h + ping(9)
    events: list[Any] = []
    at = 0
    for n in cuts:
        events += r.feed(stream[at:at + n])
        at += n
    events += r.feed(stream[at:])
    starts = [e for e in events if isinstance(e, NewHost)]
    assert len(starts) == 1 and starts[0].hello == Hello.from_payload(h[24:])
    assert delivered(events) == h + ping(9)


def test_a_truncated_host_hello_before_the_real_one_is_skipped() -> None:
    r = PortReader(1 << 20)
    old = hello(name="old")
    for cut in (25, 40, len(old) - 1):
        r.reset()
        h = hello()
        events = r.feed(old[:cut] + h + ping())
        assert [type(e) for e in events] == [NewHost, Deliver]
        assert delivered(events) == h + ping()


# -- what a lab gives QEMU -----------------------------------------------------------------


def test_qemu_args_and_libvirt_xml_for_a_port() -> None:
    args = qemu_args("/run/vmbusify-qemu/vm1.sock")
    assert args == [
        "-device", "virtio-serial-pci,id=vmbusify-vser0",
        "-chardev", "socket,id=vmbusify0,path=/run/vmbusify-qemu/vm1.sock,server=on,wait=off",
        "-device", "virtserialport,bus=vmbusify-vser0.0,chardev=vmbusify0,name=org.vmbusify.0"]
    assert host_address("/run/vmbusify-qemu/vm1.sock") == "unix:/run/vmbusify-qemu/vm1.sock"
    assert parse_address(host_address("/run/vmbusify-qemu/vm1.sock")).kind is TransportKind.UNIX
    xml = libvirt_channel("/run/vmbusify-qemu/vm1.sock")
    assert "<source mode='bind' path='/run/vmbusify-qemu/vm1.sock'/>" in xml
    assert "<target type='virtio' name='org.vmbusify.0'/>" in xml
    with pytest.raises(TransportError, match="','"):
        qemu_args("/run/a,b.sock")
    with pytest.raises(AddressError):
        qemu_args("/run/x.sock", name="bad name")


def test_a_tunnel_that_does_not_read_stops_the_port_being_read() -> None:
    """Flow control: what waits for the session's tunnel is bounded (the port is not read
    meanwhile), and every byte arrives once the tunnel reads again."""
    from vmbusify.transport.vport import HIGH_WATER

    async def scenario() -> None:
        port = SwappablePort()
        release = asyncio.Event()
        got = bytearray()

        async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await release.wait()
            while chunk := await reader.read(1 << 20):
                got.extend(chunk)

        listener = VportListener(port, slow, "vport:test", hup_poll=0.02)
        listener.start()
        await asyncio.sleep(0.05)
        host = port.attach()
        host.setblocking(False)
        loop = asyncio.get_running_loop()
        h = hello()
        # More than the handler's StreamReader takes before it stops reading (2 x its
        # limit), the socket buffers, and the listener's own HIGH_WATER.
        big = b"".join(Package(type=PackageType.DATA, entity=Entity.CMD_LISTENER, message_id=0,
                               stream=1, payload=os.urandom(12 << 20)).encode()
                       for _ in range(2))
        sender = loop.create_task(loop.sock_sendall(host, h + big))
        await asyncio.sleep(0.5)
        session = listener._session
        assert session is not None
        assert session.to_tunnel.pending <= HIGH_WATER + (64 << 10)
        assert not listener._reading  # the port waits for the tunnel
        assert not sender.done()      # and so the host waits for the port
        release.set()
        await asyncio.wait_for(sender, 10)
        await until(lambda: len(got) == len(h + big), 10)
        assert bytes(got) == h + big
        listener.close()
        host.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_the_port_is_read_again_when_a_tunnel_that_stopped_reading_ends() -> None:
    async def scenario() -> None:
        port = SwappablePort()
        stop = asyncio.Event()
        sessions: list[int] = []

        async def stuck(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sessions.append(1)
            if len(sessions) == 1:
                await stop.wait()  # reads nothing, then gives up (its dead_after, say)
                writer.close()
                return
            await reader.read(100)

        listener = VportListener(port, stuck, "vport:test", hup_poll=0.02)
        listener.start()
        await asyncio.sleep(0.05)
        host = port.attach()
        host.setblocking(False)
        loop = asyncio.get_running_loop()
        big = b"".join(Package(type=PackageType.DATA, entity=Entity.CMD_LISTENER, message_id=0,
                               stream=1, payload=bytes(12 << 20)).encode() for _ in range(2))
        sender = loop.create_task(loop.sock_sendall(host, hello() + big))
        await until(lambda: not listener._reading and listener._session is not None)
        stop.set()  # the stuck tunnel ends: what is left of its stream is skipped
        await asyncio.wait_for(sender, 10)
        await loop.sock_sendall(host, hello())
        await until(lambda: len(sessions) == 2, 10)
        listener.close()
        host.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_broken_stream_ends_the_session_tells_the_host_and_a_new_hello_is_taken() -> None:
    async def scenario() -> None:
        port = SwappablePort()
        sessions = Sessions()
        listener = VportListener(port, sessions, "vport:test", hup_poll=0.02)
        listener.start()
        await asyncio.sleep(0.05)
        host = port.attach()
        host.sendall(hello())
        await until(lambda: len(sessions.got) == 1)
        h2 = hello(name="again")
        host.sendall(b"this is no header, not at all" + h2[:30])  # the next HELLO, in parts
        await until(lambda: sessions.ended == 1)
        got = packages(await recv_some(host))
        assert [Bye.from_payload(p.payload).reason for p in got] == [BYE_REASON]
        host.sendall(h2[30:])
        await until(lambda: len(sessions.got) == 2 and sessions.got[1] == h2)
        listener.close()
        host.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
