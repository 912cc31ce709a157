"""The host mux checks what a guest sends against the routes its workers registered: wrong
types and forged entities are dropped, answered when a request is due, and counted per VM.

The guest is written by hand here (raw wire packages on the VM's socket) and so is the
worker (REG and PKG on the mux's ZeroMQ bus, with route kinds, framed by bus/frames.py's
dataclasses on a bare DEALER), so the test depends on neither the guest mux nor the worker
library.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from tests.integration.flood_guest import msgpack_map, package
from tests.integration.harness import MuxProc, free_port, write_config
from vmbusify.bus.frames import CtlReply, CtlRequest, Pkg, Reg, RegOk, from_mux
from vmbusify.errors import ErrorCode
from vmbusify.protocol.package import ErrorReply, PackageDecoder, PackageFlag, PackageType

MESSAGE, REQUEST, ACK = 1, 2, 3
CMD_LISTENER, CMD_EXECUTOR, PROXY_CLIENT = 1, 2, 3
OPEN, NOTE, NOBODY = 700, 701, 702  # REQUEST-only, MESSAGE-only, unrouted
KIND_MESSAGE, KIND_REQUEST = 1, 2


class FakeGuest:
    """Accepts the host mux's connection, says HELLO, and collects what the host sends."""

    def __init__(self, path: Path, features: list[str] | None = None) -> None:
        #: The HELLO's features: None sends none at all (as a guest of 0.1.0).
        self.features = features
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(1)
        self.conn: socket.socket | None = None
        self.received: list[Any] = []
        self.connected = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.srv.accept()
        dec = PackageDecoder()
        fields: dict[str, Any] = {"role": "guest", "hostname": "fake",
                                  "software_version": "0", "protocol_version": 1, "ips": []}
        if self.features is not None:
            fields["features"] = self.features
        hello = msgpack_map(fields)
        conn.sendall(package(MESSAGE, 0, 1, hello))
        self.conn = conn
        self.connected.set()
        while data := conn.recv(65536):
            dec.receive_data(data)
            self.received.extend(dec.packages())

    def send(self, ptype: int, entity: int, message_id: int, pid: int, body: Any = None
             ) -> None:
        assert self.conn is not None
        self.conn.sendall(package(ptype, entity, message_id, msgpack.packb(body), pid))

    def answer_to(self, pid: int, timeout: float = 5.0) -> Any:
        """The ACK the host sent for our request ``pid``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.received:
                if p.type is PackageType.ACK and p.id == pid:
                    return p
            time.sleep(0.02)
        raise AssertionError(f"no ACK for request {pid}; got {self.received}")


class RawWorker:
    """A worker speaking the bus by hand: REG with route kinds, PKG in and out."""

    def __init__(self, endpoint: str, routes: list[list[int]]) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, b"raw-worker")
        self.sock.connect(endpoint)
        self.sock.send_multipart(Reg(name="raw", pid=4242, entities=[4],
                                     routes=routes).to_frames())
        assert self.sock.poll(10_000), "no REGOK"
        assert isinstance(from_mux(self.sock.recv_multipart()), RegOk)
        self.packages: list[tuple[bytes, bytes]] = []

    def collect(self, seconds: float) -> None:
        """Gather PKG frames for a while (heartbeats included, as a worker would)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.sock.poll(int(left * 1000) + 1):
                msg = from_mux(self.sock.recv_multipart())
                if isinstance(msg, Pkg):
                    self.packages.append((msg.header, bytes(msg.payload)))

    def status(self) -> dict[str, Any]:
        """The mux's built-in status command (CTL), as vmbusifyctl status --json shows it."""
        self.sock.send_multipart(CtlRequest(b"1", "status").to_frames())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.sock.poll(1000):
                reply = from_mux(self.sock.recv_multipart())
                if isinstance(reply, CtlReply) and reply.call_id == b"1":
                    assert reply.ok, reply
                    return reply.result  # type: ignore[no-any-return]
        raise AssertionError("no status from the mux")

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture(params=[None, ["auth", "error-codes"]], ids=["v0.1.0-guest", "coded-guest"])
def host_with_fake_guest(tmp_path: Path, request: pytest.FixtureRequest
                         ) -> Iterator[tuple[MuxProc, FakeGuest]]:
    guest = FakeGuest(tmp_path / "vm2.sock", request.param)
    cfg = write_config(tmp_path / "host.toml", (
        f'role = "host"\nname = "hostA"\nrun_dir = "{tmp_path}/host-run"\n'
        f'state_dir = "{tmp_path}/host-state"\n'
        f'[tunnel]\nping_interval = 1.0\ndead_after = 10.0\n'
        f'[host]\nkeep_connected = true\n'
        f'[[vms]]\nvmid = "vm2"\naddress = "unix:{tmp_path}/vm2.sock"\n'
        f'[control]\nlisten = "127.0.0.1:{free_port()}"\n'))
    host = MuxProc("host", cfg, tmp_path / "host.log")
    host.start()
    try:
        assert guest.connected.wait(20), host.log()
        yield host, guest
    finally:
        host.kill()


@pytest.mark.timeout(60)
def test_wrong_types_and_forged_entities_are_dropped_answered_and_counted(
        host_with_fake_guest: tuple[MuxProc, FakeGuest]) -> None:
    host, guest = host_with_fake_guest
    worker = RawWorker(host.config.bus_endpoint,
                       [[PROXY_CLIENT, OPEN, KIND_REQUEST], [PROXY_CLIENT, NOTE, KIND_MESSAGE],
                        [CMD_LISTENER, OPEN]])
    try:
        guest.send(REQUEST, CMD_LISTENER, OPEN, 1, "forged")   # only the host has it
        guest.send(MESSAGE, PROXY_CLIENT, OPEN, 0, "one-way")  # a request is due
        guest.send(REQUEST, PROXY_CLIENT, NOTE, 2, "request")  # a message is due
        guest.send(REQUEST, PROXY_CLIENT, NOBODY, 3, "?")      # nobody handles it
        guest.send(ACK, PROXY_CLIENT, OPEN, 99, "stray")        # answers nothing
        guest.send(REQUEST, PROXY_CLIENT, OPEN, 4, "good")     # the one that goes through
        guest.send(MESSAGE, PROXY_CLIENT, NOTE, 0, "good too")
        for pid, text, code in (
                (1, "cmd-listener is not an entity of a guest", ErrorCode.PROTOCOL),
                (2, "wrong package type for proxy-client message 701", ErrorCode.PROTOCOL),
                (3, "no worker on hostA handles proxy-client message 702",
                 ErrorCode.NO_HANDLER)):
            ack = guest.answer_to(pid)
            assert ack.flags & PackageFlag.ERROR
            if guest.features is None:  # 0.1.0: the reason alone, as text
                assert bytes(ack.payload).decode() == text
            else:  # both list error-codes: msgpack {code, reason}
                assert ErrorReply.decode(ack.payload) == ErrorReply(code, text)
        worker.collect(1.0)
        got = [(struct.unpack(">B", h[5:6])[0], struct.unpack(">H", h[14:16])[0],
                msgpack.unpackb(p)) for h, p in worker.packages]
        assert got == [(REQUEST, OPEN, "good"), (MESSAGE, NOTE, "good too")]
        assert not any(p.type is PackageType.ACK and p.id == 4 for p in guest.received)
        vm2 = worker.status()["vms"][0]
        assert vm2["dropped"] == {"foreign-entity": 1, "wrong-type": 2, "no-route": 1,
                                  "stray-ack": 1}
        assert vm2["state"] == "connected" and vm2["backlog_closes"] == 0
    finally:
        worker.close()
    log = host.log()
    assert "vm=vm2: package dropped (wrong-type): MESSAGE for proxy-client message 700" in log
