"""The subnet worker's parts that need no root: leases, the nft ruleset, forwarding records,
resolv.conf handling, the outbox, and the DNS forwarder against a loopback upstream."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import subprocess
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, cast

import pytest

from vmbusify.errors import SubnetError
from vmbusify.protocol.subnet import PLAIN_VNET_HDR, iter_frames
from vmbusify.workers.subnet import bearer as bearer_module
from vmbusify.workers.subnet import command, nat
from vmbusify.workers.subnet.bearer import BULK_FRAME, Bearer, Outbox
from vmbusify.workers.subnet.dns import DnsForwarder, resolv_conf_servers
from vmbusify.workers.subnet.leases import LeaseTable
from vmbusify.workers.subnet.routes import ResolvConf
from vmbusify.workers.subnet.tun import check_ifname

NET = ipaddress.IPv4Network("100.77.0.0/24")
NET6 = ipaddress.IPv6Network("fd77:7662:7573::/64")


# --- leases -----------------------------------------------------------------------------------


def test_leases_are_stable_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "leases.json"
    table = LeaseTable(path, NET, NET6)
    assert [table.index_for(v) for v in ("vm1", "vm2", "vm1")] == [2, 3, 2]
    again = LeaseTable(path, NET, NET6)  # the worker restarted
    assert again.index_for("vm2") == 3 and again.index_for("vm3") == 4
    assert str(again.address(3)) == "100.77.0.3"
    assert str(again.address6(3)) == "fd77:7662:7573::3"
    assert again.packed_addresses("vm1") == [ipaddress.ip_address("100.77.0.2").packed,
                                             ipaddress.ip_address("fd77:7662:7573::2").packed]


def test_a_full_subnet_is_a_clear_error(tmp_path: Path) -> None:
    table = LeaseTable(tmp_path / "l.json", ipaddress.IPv4Network("10.9.0.0/30"))
    assert table.index_for("a") == 2
    with pytest.raises(SubnetError, match="is full"):
        table.index_for("b")


def test_corrupt_or_hostile_lease_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    path.write_text("{not json")
    assert LeaseTable(path, NET).index_for("vm1") == 2
    path.write_text(json.dumps({"leases": {"a": 1, "b": 255, "c": 7, "d": 7, "e": "x"}}))
    table = LeaseTable(path, NET)
    assert table.items() == {"c": 7}  # gateway, broadcast, duplicates and junk dropped


# --- nftables ---------------------------------------------------------------------------------


def policy(**over: object) -> nat.NatPolicy:
    kw: dict[str, object] = {"table": "vmbusify", "tun": "vmbus0", "cidr": str(NET),
                             "uplink": "eth0"}
    kw.update(over)
    return nat.NatPolicy(**kw)  # type: ignore[arg-type]


def test_ruleset_replaces_its_own_table_atomically() -> None:
    text = nat.ruleset(policy())
    assert text.startswith("add table inet vmbusify\ndelete table inet vmbusify\n")
    assert 'oifname "eth0" ip saddr 100.77.0.0/24 masquerade' in text
    assert "maxseg size set rt mtu" in text
    assert 'iifname "vmbus0" oifname "vmbus0" drop' in text
    assert 'iifname "eth0" oifname "vmbus0" ct state established,related accept' in text
    assert "ip6 saddr" not in text
    # Nothing outside our own table is named.
    assert all(line.startswith(("add table inet vmbusify", "delete table inet vmbusify",
                                "table inet vmbusify", " ", "}"))
               for line in text.splitlines())


def test_vm_to_vm_allowed_by_config_and_ipv6_masquerade() -> None:
    text = nat.ruleset(policy(allow_vm_to_vm=True, cidr6=str(NET6)))
    assert 'iifname "vmbus0" oifname "vmbus0" accept' in text
    assert f'oifname "eth0" ip6 saddr {NET6} masquerade' in text


def test_without_uplink_nothing_is_forwarded_out() -> None:
    text = nat.ruleset(policy(uplink=""))
    forward = text.split("chain forward {")[1].split("}")[0]
    assert "masquerade" not in text
    assert [r for r in forward.splitlines() if r.strip().endswith("accept")] == []


@pytest.mark.parametrize("name", ["", "1abc", "a b", 'x"; flush ruleset', "a" * 40])
def test_table_names_that_could_escape_are_refused(name: str) -> None:
    with pytest.raises(SubnetError, match="invalid nftables table name"):
        policy(table=name)


@pytest.mark.parametrize("name", ["", "a/b", "x" * 16, "a b", "..", "a:b"])
def test_bad_interface_names_are_refused(name: str) -> None:
    with pytest.raises(SubnetError, match="invalid interface name"):
        check_ifname(name)


@pytest.mark.root
def test_nft_accepts_the_ruleset() -> None:
    """`nft -c` checks the script in the kernel without applying anything."""
    for p in (policy(), policy(allow_vm_to_vm=True, cidr6=str(NET6)), policy(uplink="")):
        proc = subprocess.run(["nft", "-c", "-f", "-"], input=nat.ruleset(p), text=True,
                              capture_output=True, check=False)
        assert proc.returncode == 0, proc.stderr


# --- forwarding -------------------------------------------------------------------------------


def fake_sysctl(root: Path, flags: dict[str, str]) -> Path:
    for ifname, value in flags.items():
        d = root / "ipv4" / "conf" / ifname
        d.mkdir(parents=True)
        (d / "forwarding").write_text(value + "\n")
    return root


def flag(root: Path, ifname: str) -> str:
    return (root / "ipv4" / "conf" / ifname / "forwarding").read_text().strip()


def test_forwarding_restored_only_where_we_changed_it(tmp_path: Path) -> None:
    root = fake_sysctl(tmp_path / "sys", {"all": "0", "tun0": "0", "up0": "0", "up1": "1"})
    fwd = nat.Forwarding(str(tmp_path / "state"), sysctl=root)
    for ifname in ("tun0", "up0", "up1"):
        fwd.enable("ipv4", ifname)
    assert [flag(root, i) for i in ("tun0", "up0", "up1")] == ["1", "1", "1"]
    # kill -9 and a new worker: the record still says what the values were before us.
    fwd2 = nat.Forwarding(str(tmp_path / "state"), sysctl=root)
    fwd2.enable("ipv4", "up0")
    fwd2.restore()
    assert [flag(root, i) for i in ("tun0", "up0", "up1")] == ["0", "0", "1"]
    assert not fwd2.record.exists()


def test_forwarding_left_on_when_someone_turned_it_on_for_all(tmp_path: Path) -> None:
    root = fake_sysctl(tmp_path / "sys", {"all": "0", "up0": "0"})
    fwd = nat.Forwarding(str(tmp_path / "state"), sysctl=root)
    fwd.enable("ipv4", "up0")
    (root / "ipv4" / "conf" / "all" / "forwarding").write_text("1\n")  # e.g. docker started
    fwd.restore()
    assert flag(root, "up0") == "1"


# --- resolv.conf --------------------------------------------------------------------------------


def test_resolv_conf_is_rewritten_in_place_and_restored(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 198.18.0.2\n")
    inode = conf.stat().st_ino
    rc = ResolvConf(str(tmp_path / "state"), path=conf)
    rc.apply(["100.77.0.1"])
    rc.apply(["100.77.0.1"])  # a re-attach must not save our own file as the original
    assert conf.read_text().endswith("nameserver 100.77.0.1\n")
    assert conf.stat().st_ino == inode  # written in place: a bind mount stays valid
    assert resolv_conf_servers(conf) == ["100.77.0.1"]
    rc.restore()
    assert conf.read_text() == "nameserver 198.18.0.2\n"
    rc.restore()  # a second stop changes nothing
    assert conf.read_text() == "nameserver 198.18.0.2\n"


def test_resolv_conf_symlink_is_put_back(tmp_path: Path) -> None:
    target = tmp_path / "stub-resolv.conf"
    target.write_text("nameserver 127.0.0.53\n")
    conf = tmp_path / "resolv.conf"
    conf.symlink_to(target)
    rc = ResolvConf(str(tmp_path / "state"), path=conf)
    rc.apply(["100.77.0.1"])
    assert not conf.is_symlink() and target.read_text() == "nameserver 127.0.0.53\n"
    rc.restore()
    assert conf.is_symlink() and conf.resolve() == target


# --- outbox -------------------------------------------------------------------------------------


def test_outbox_batches_and_drops_when_full() -> None:
    box = Outbox(limit=3000)
    frames = [PLAIN_VNET_HDR + bytes([0x45]) + bytes(989) for _ in range(4)]  # 1000 bytes each
    assert [box.put(f) for f in frames] == [True, True, True, False]
    assert box.dropped == 1
    batch, count = box.take_batch(max_bytes=2008)
    assert count == 2 and [bytes(f) for f in iter_frames(batch)] == frames[:2]
    batch, count = box.take_batch(max_bytes=10)  # at least one frame, whatever the limit
    assert count == 1 and len(box) == 0 and box.bytes == 0


def test_outbox_tells_bulk_from_small_packets() -> None:
    box = Outbox()
    ack = PLAIN_VNET_HDR + bytes([0x45]) + bytes(65)
    big = PLAIN_VNET_HDR + bytes([0x45]) + bytes(BULK_FRAME)
    box.put(ack)
    assert not box.bulk
    box.put(big)
    assert box.bulk
    box.take_batch()
    assert box.bulk  # the batch just sent was bulk: the next one may wait for company
    box.put(ack)
    box.take_batch()
    assert not box.bulk  # a batch of ACKs only: bulk has stopped


class RecordingStream:
    """Stands in for a bearer stream: records every batch written."""

    id = 1

    def __init__(self) -> None:
        self.batches: list[int] = []

    async def write(self, data: bytes) -> None:
        self.batches.append(sum(1 for _ in iter_frames(data)))

    async def read(self) -> bytes:
        await asyncio.Event().wait()
        return b""


@pytest.mark.parametrize(("size", "corked"), [(65, False), (BULK_FRAME, True)])
def test_only_bulk_waits_for_a_fuller_batch(monkeypatch: pytest.MonkeyPatch, size: int,
                                             corked: bool) -> None:
    """ACK-sized packets go out one by one at once; bulk ones are gathered into batches."""
    monkeypatch.setattr(bearer_module, "CORK_BUSY", 5.0)
    monkeypatch.setattr(bearer_module, "CORK_DELAY", 0.3)  # generous: a slow CI still merges

    async def go() -> list[int]:
        stream = RecordingStream()
        b = Bearer(stream, lambda frame: None, "test")  # type: ignore[arg-type]
        b.start()
        for _ in range(6):
            b.outbox.put(PLAIN_VNET_HDR + bytes([0x45]) + bytes(size))
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.4)
        await b.close("done")
        return stream.batches

    batches = asyncio.run(go())
    assert sum(batches) == 6
    if corked:
        assert len(batches) < 6, batches
    else:
        assert batches == [1] * 6


# --- DNS forwarder ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EchoResolver(asyncio.DatagramProtocol):
    """Answers every query with the query itself plus a marker (a stand-in upstream)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A datagram endpoint's transport; a cast, not an isinstance check: on Python 3.11 the
        # selector loop's datagram transport does not subclass asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(b"\xff\xff" + data[2:] + b"!", addr)  # wrong id first
        self.transport.sendto(data + b"!", addr)


async def _dns_round_trip() -> tuple[bytes, int]:
    loop = asyncio.get_running_loop()
    up_port, port = free_port(), free_port()
    upstream, _ = await loop.create_datagram_endpoint(EchoResolver,
                                                      local_addr=("127.0.0.1", up_port))
    fwd = DnsForwarder(["127.0.0.1"], ["127.0.0.1"], port=port, upstream_port=up_port)
    await fwd.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.setblocking(False)
            client.connect(("127.0.0.1", port))
            query = b"\x12\x34" + bytes(10) + b"query"
            await loop.sock_sendall(client, query)
            answer = await asyncio.wait_for(loop.sock_recv(client, 512), 5)
            await loop.sock_sendall(client, b"short")  # malformed: dropped, no answer
            await asyncio.sleep(0.1)
        return answer, fwd.dropped
    finally:
        await fwd.close()
        upstream.close()


def test_dns_forwarder_relays_the_matching_answer() -> None:
    answer, dropped = asyncio.run(_dns_round_trip())
    assert answer == b"\x12\x34" + bytes(10) + b"query!"
    assert dropped == 1


class SilentResolver(asyncio.DatagramProtocol):
    """An upstream that never answers: every query stays in flight for the whole timeout."""


async def _dns_one_client_floods() -> tuple[DnsForwarder, bytes, int]:
    """127.0.0.2 sends more queries than its cap to a silent upstream, then 127.0.0.3 asks."""
    loop = asyncio.get_running_loop()
    up_port, port = free_port(), free_port()
    upstream, _ = await loop.create_datagram_endpoint(SilentResolver,
                                                      local_addr=("127.0.0.1", up_port))
    fwd = DnsForwarder(["127.0.0.1"], ["127.0.0.1"], port=port, upstream_port=up_port,
                       per_client_queries=4, per_client_tcp=2)
    await fwd.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:
            flood.bind(("127.0.0.2", 0))
            for i in range(10):
                flood.sendto(bytes([0, i]) + bytes(10) + b"q", ("127.0.0.1", port))
            await asyncio.sleep(0.2)
        # TCP: the flooder's third connection is closed at once, unread.
        conns = []
        for _ in range(3):
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", port))
            conns.append(s)
        third_eof = await asyncio.wait_for(loop.sock_recv(conns[2], 16), 5)
        for s in conns:
            s.close()
        # Another client is not held up by the flooder's queries: it is answered (here by a
        # second, answering upstream, since the first stays silent).
        fwd.upstreams = ["127.0.0.4"]
        answering, _ = await loop.create_datagram_endpoint(EchoResolver,
                                                           local_addr=("127.0.0.4", up_port))
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                other.bind(("127.0.0.3", 0))
                other.setblocking(False)
                other.connect(("127.0.0.1", port))
                await loop.sock_sendall(other, b"\x77\x77" + bytes(10) + b"q")
                answer = await asyncio.wait_for(loop.sock_recv(other, 512), 5)
        finally:
            answering.close()
        return fwd, answer + b"|" + third_eof, fwd.refused.get("127.0.0.3", 0)
    finally:
        await fwd.close()
        upstream.close()


def test_dns_forwarder_caps_each_client_without_holding_up_the_others() -> None:
    fwd, answer, other_refused = asyncio.run(_dns_one_client_floods())
    # 10 UDP queries with a cap of 4: 6 refused; the third TCP connection (cap 2): refused.
    assert fwd.refused["127.0.0.2"] == 6 + 1
    assert answer == b"\x77\x77" + bytes(10) + b"q!|"  # answered; the third TCP conn got EOF
    assert other_refused == 0


# --- TUN ----------------------------------------------------------------------------------------


@pytest.mark.root
def test_a_tun_held_by_another_worker_is_a_clear_error_and_closing_removes_it() -> None:
    from vmbusify.workers.subnet.routes import link_exists
    from vmbusify.workers.subnet.tun import TunDevice

    name = f"vbtest{os.getpid() % 100000}"
    first = TunDevice.open(name)
    try:
        assert link_exists(name)
        with pytest.raises(SubnetError, match="not a free TUN device"):
            TunDevice.open(name)
        assert first.read_frames(8, 1 << 20) == []  # nothing queued: returns, never blocks
    finally:
        first.close()
    assert not link_exists(name)


# --- the guest re-attaching ---------------------------------------------------------------


class _FakeLink:
    """Just what SubnetGuest._attach_forever uses: streams, sync_send and spawn (no mux)."""

    def __init__(self) -> None:
        from vmbusify.bus.streams import StreamTable

        async def send(vmid: str, pkg: object) -> None:
            return None

        self.streams = StreamTable(send)
        self.attaches: list[int] = []
        self.first_sent = asyncio.Event()
        self.lease = {"vmid": "vm1", "address": "100.77.0.2", "prefixlen": 24,
                      "gateway": "100.77.0.1", "mtu": 65000, "metric": 65000}

    async def open_stream(self, vmid: object, local: int, peer: int, message_id: int) -> object:
        return self.streams.open("host", local, peer, message_id)

    def spawn(self, coro: Coroutine[Any, Any, Any], vmid: str = "", what: str = "task"
              ) -> asyncio.Task[Any]:
        return asyncio.ensure_future(coro)

    async def sync_send(self, vmid: object, msg: object, reply: Any = None, *,
                        stream: int = 0, timeout: float = 10.0) -> object:
        from vmbusify.protocol.subnet import Keepalive

        if isinstance(msg, Keepalive):
            await asyncio.sleep(3600)
        self.attaches.append(stream)
        if len(self.attaches) == 1:  # went to the host's worker while it was stopping
            self.first_sent.set()
            await asyncio.sleep(timeout)
            from vmbusify.errors import RequestTimeout
            raise RequestTimeout("no reply")
        return reply.from_body(self.lease)


def test_guest_attaches_again_at_once_when_the_host_worker_restarts_mid_attach(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An ATTACH lost with the host's stopping worker must not hold the subnet down for the
    whole request timeout: the new worker's HOST_READY makes the guest send it again."""
    from vmbusify.config import Config
    from vmbusify.workers.subnet import guest as guest_module

    monkeypatch.setattr(guest_module.routes, "configure_guest", lambda ifname, lease: None)

    class FakeTun:
        def write_frame(self, frame: object) -> None:
            pass

    async def scenario() -> None:
        link = _FakeLink()
        g = guest_module.SubnetGuest(Config(state_dir=str(tmp_path)), link)  # type: ignore[arg-type]
        g.tun = FakeTun()  # type: ignore[assignment]
        task = asyncio.ensure_future(g._attach_forever())
        try:
            await asyncio.wait_for(link.first_sent.wait(), 2)
            await g._on_host_ready(None)  # type: ignore[arg-type]
            for _ in range(100):
                if g.bearer is not None:
                    break
                await asyncio.sleep(0.01)
            assert g.bearer is not None, "still waiting for the lost ATTACH"
            assert len(link.attaches) == 2
            # the abandoned attempt's stream is not left behind in the table
            assert [s.id for s in link.streams] == [link.attaches[1]]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if g.bearer is not None:
                await g.bearer.close("test over")

    asyncio.run(scenario())


# --- system programs --------------------------------------------------------------------------


def test_ip_and_nft_are_found_in_sbin_without_it_on_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A supervisord started with PATH=/usr/bin:/bin still runs the subnet's ip and nft."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(command, "_found", {})
    for name in ("ip", "nft"):
        path = command.find_program(name)
        assert Path(path).name == name and os.access(path, os.X_OK)
    proc = command.run(["ip", "-o", "link", "show", "lo"])
    assert "lo:" in proc.stdout


def test_a_missing_program_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(command, "_found", {})
    monkeypatch.setitem(command.PACKAGES, "vmbusify-no-such-program", "some-package")
    with pytest.raises(SubnetError, match="vmbusify-no-such-program: command not found on PATH "
                       r"or in .*/usr/sbin.*install the some-package package"):
        command.run(["vmbusify-no-such-program", "x"])


# --- batches built where they travel ------------------------------------------------------------


def test_outbox_builds_a_batch_in_place_as_take_batch_would() -> None:
    frames = [PLAIN_VNET_HDR + bytes([0x45]) + os.urandom(n) for n in (40_000, 70_000, 900)]
    a, b = Outbox(), Outbox()
    for f in frames:
        a.put(f)
        b.put(f)
    size, count = a.batch_size(max_bytes=110_500)
    assert (size, count) == (4 + len(frames[0]) + 4 + len(frames[1]), 2)
    view = memoryview(bytearray(size))
    a.take_into(count, view)
    batch, n = b.take_batch(max_bytes=110_500)
    assert n == count and bytes(view) == batch
    assert (a.bytes, len(a), a.recent_max) == (b.bytes, len(b), b.recent_max)
    assert a.batch_size() == (4 + len(frames[2]), 1)
    a.take_into(1, memoryview(bytearray(4 + len(frames[2]))))
    assert a.bytes == 0 and len(a) == 0 and a.batch_size() == (0, 0)


class BuildingStream(RecordingStream):
    """A bearer stream whose link has a buffer to build batches in (a worker's ring)."""

    def __init__(self, room: bool) -> None:
        super().__init__()
        self.room = room
        self.built: list[bytes] = []
        self.written: list[bytes] = []

    def write_built(self, n: int, build: Any) -> bool:
        if not self.room:
            return False
        view = memoryview(bytearray(n))
        build(view)
        self.built.append(bytes(view))
        return True

    async def write(self, data: bytes) -> None:
        self.written.append(bytes(data))
        await super().write(data)


@pytest.mark.parametrize("room", [True, False])
def test_a_large_batch_is_built_in_the_link_s_buffer_a_small_one_written(room: bool) -> None:
    """Batches of at least the ring's minimum are built where they travel (one copy of each
    frame, no join); without room, and for ACK-sized batches, they are written as before."""
    big = [PLAIN_VNET_HDR + bytes([0x45]) + os.urandom(40_000) for _ in range(3)]
    ack = PLAIN_VNET_HDR + bytes([0x45]) + bytes(65)

    async def go() -> BuildingStream:
        stream = BuildingStream(room)
        b = Bearer(stream, lambda frame: None, "test")  # type: ignore[arg-type]
        for f in big:
            b.outbox.put(f)
        b.start()
        await asyncio.sleep(0.05)
        b.outbox.put(ack)
        await asyncio.sleep(0.05)
        await b.close("done")
        return stream

    stream = asyncio.run(go())
    batches = stream.built + stream.written
    assert [bytes(f) for batch in batches for f in iter_frames(batch)] == [*big, ack]
    if room:
        assert [sum(1 for _ in iter_frames(x)) for x in stream.built] == [3]
        assert [sum(1 for _ in iter_frames(x)) for x in stream.written] == [1]
    else:
        assert stream.built == [] and len(stream.written) == 2
