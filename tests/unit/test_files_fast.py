"""The fast path's parts without a lab: the raw mode of the stream (wire.py), the receiver
taking bytes another process wrote, and the listener's side of a file by descriptor
(workers/exec/fdfile.py) on a real Unix socket pair."""

from __future__ import annotations

import array
import asyncio
import errno
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from vmbusify.errors import ControlError
from vmbusify.files.tree import Receiver, open_target
from vmbusify.files.wire import (
    Chunk,
    Decoder,
    Entry,
    FileEnd,
    Kind,
    StreamError,
    encode_entry,
    encode_file_end,
    encode_note,
)
from vmbusify.workers.exec.fdfile import WRITE_STEP, Divert, FdRequest, receive_fd

END = encode_note(Kind.END, {"files": 1})


def _events(decoder: Decoder, data: bytes) -> list[object]:
    decoder.feed(data)
    out: list[object] = []
    while (event := decoder.next_event()) is not None:
        out.append(event)
    return out


def test_raw_mode_takes_exactly_the_announced_bytes_then_records() -> None:
    data = os.urandom(3000)
    stream = encode_entry(Entry(Kind.FILE, b"f", size=3000)) + data + encode_file_end(b"") + END
    decoder = Decoder(raw_first=True)
    got: list[object] = []
    for i in range(0, len(stream), 700):  # in pieces, as a pipe gives them
        got += _events(decoder, stream[i:i + 700])
    assert isinstance(got[0], Entry) and isinstance(got[-2], FileEnd)
    assert b"".join(e.data for e in got if isinstance(e, Chunk)) == data
    assert decoder.finished


def test_raw_mode_bytes_past_the_announced_size_are_records_not_data() -> None:
    """A sender with more than it announced: the surplus is parsed as a record (and
    refused), never taken as file data."""
    stream = encode_entry(Entry(Kind.FILE, b"f", size=10)) + b"x" * 20
    decoder = Decoder(raw_first=True)
    with pytest.raises(StreamError, match="unknown record kind"):
        got = _events(decoder, stream)
    got = []  # what came before the error
    decoder = Decoder(raw_first=True)
    decoder.feed(stream[:-10])
    while (event := decoder.next_event()) is not None:
        got.append(event)
    assert sum(len(e.data) for e in got if isinstance(e, Chunk)) == 10


def test_raw_mode_only_for_a_first_file_entry() -> None:
    stream = (encode_entry(Entry(Kind.DIR, b"d")) + encode_entry(Entry(Kind.FILE, b"d/f",
                                                                       size=3))
              + b"\x43\0\0\0\x03abc" + encode_file_end(b"") + END)
    events = _events(Decoder(raw_first=True), stream)
    assert [type(e).__name__ for e in events] == ["Entry", "Entry", "Chunk", "FileEnd",
                                                   "Note"]


def test_skip_raw_is_checked() -> None:
    decoder = Decoder(raw_first=True)
    _events(decoder, encode_entry(Entry(Kind.FILE, b"f", size=100)))
    assert decoder.raw_left == 100
    with pytest.raises(StreamError):
        decoder.skip_raw(101)
    decoder.feed(b"x")
    with pytest.raises(StreamError):  # bytes still buffered: they come first
        decoder.skip_raw(99)


def test_the_receiver_counts_and_hashes_what_another_process_wrote(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    receiver = Receiver(open_target(os.fsencode(tmp_path), 1), checksum=True)
    decoder = Decoder(raw_first=True)
    for event in _events(decoder, encode_entry(Entry(Kind.FILE, b"f", size=len(data)))):
        receiver.handle(event)  # type: ignore[arg-type]
    fd = receiver.direct_fd()
    os.pwrite(fd, data, 0)  # the listener's write, here
    decoder.skip_raw(len(data))
    receiver.wrote_directly(0, len(data))
    for event in _events(decoder, encode_file_end(hashlib.sha256(data).digest()) + END):
        receiver.handle(event)  # type: ignore[arg-type]
    receiver.finish()
    assert (tmp_path / "f").read_bytes() == data and receiver.counts.bytes == len(data)
    assert sorted(os.listdir(tmp_path)) == ["f"]


@pytest.mark.parametrize(("body", "reason"), [
    (b"nope", "not JSON"),
    (json.dumps({"op": "delete", "count": 1}).encode(), "unknown op"),
    (json.dumps({"op": "read", "count": -1}).encode(), "bad count"),
    (json.dumps({"op": "read", "count": 1, "offset": 1.5}).encode(), "bad offset"),
    (json.dumps({"op": "write", "count": True}).encode(), "bad count"),
])
def test_fd_open_requests_are_checked(body: bytes, reason: str) -> None:
    with pytest.raises(ControlError, match=reason):
        FdRequest.parse(body)


class _Transport:
    """What receive_fd uses of a transport: its socket and pausing."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.paused: list[bool] = []

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None

    def pause_reading(self) -> None:
        self.paused.append(True)

    def resume_reading(self) -> None:
        self.paused.append(False)

    def is_closing(self) -> bool:
        return False


def _send_fd(sock: socket.socket, fd: int) -> None:
    sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def test_a_descriptor_crosses_and_only_a_regular_file_is_taken(tmp_path: Path) -> None:
    listener, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    (tmp_path / "f").write_bytes(b"hello")
    transport = _Transport(listener)

    async def run(fd_to_send: int) -> int:
        async def ready() -> None:
            _send_fd(client, fd_to_send)
        return await receive_fd(transport, ready)

    with open(tmp_path / "f", "rb") as f:
        got = asyncio.run(run(f.fileno()))
    try:
        assert os.pread(got, 5, 0) == b"hello" and transport.paused == [True, False]
    finally:
        os.close(got)
    r, w = os.pipe()
    try:
        with pytest.raises(ControlError, match="not a regular file"):
            asyncio.run(run(r))
    finally:
        os.close(r)
        os.close(w)
    listener.close()
    client.close()


def test_a_divert_writes_at_most_count_bytes(tmp_path: Path) -> None:
    reports: list[dict[str, Any]] = []

    async def report(doc: dict[str, Any]) -> None:
        reports.append(doc)

    async def run() -> bytes:
        fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
        divert = Divert(fd, FdRequest("write", 0, 10), report)
        rest = await divert.take(b"0123456789ABC")
        assert divert.left == 0
        await divert.end()
        return bytes(rest)

    assert asyncio.run(run()) == b"ABC"
    assert (tmp_path / "f").read_bytes() == b"0123456789"
    assert reports[-1] == {"bytes": 10, "end": True, "error": "", "errno": 0}


def test_a_divert_that_cannot_write_reports_at_once_and_drops_the_rest() -> None:
    """A full disk (/dev/full): the last FD_DONE goes with the reason and ENOSPC at the first
    chunk; the rest of the announced bytes is dropped, never handed on as output."""
    reports: list[dict[str, Any]] = []

    async def report(doc: dict[str, Any]) -> None:
        reports.append(doc)

    async def run() -> list[bytes]:
        fd = os.open("/dev/full", os.O_WRONLY)
        divert = Divert(fd, FdRequest("write", 0, 30), report)
        rests = [bytes(await divert.take(b"x" * 20))]
        assert reports and reports[-1]["end"] and divert.fd == -1
        rests.append(bytes(await divert.take(b"y" * 15)))  # 10 dropped, 5 past the count
        await divert.end()  # idempotent
        return rests

    assert asyncio.run(run()) == [b"", b"y" * 5]
    assert [r["end"] for r in reports] == [True]
    assert reports[0]["errno"] == errno.ENOSPC and "No space left" in reports[0]["error"]


def test_a_divert_writes_a_chunk_of_many_steps_whole(tmp_path: Path) -> None:
    """A chunk larger than WRITE_STEP goes into the file in several writes, all of it, in
    order, at the divert's offset."""
    data = os.urandom(5 * WRITE_STEP + 123)

    async def report(doc: dict[str, object]) -> None:
        pass

    async def run() -> None:
        fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
        os.write(fd, b"head")
        divert = Divert(fd, FdRequest("write", 4, len(data)), report)
        assert not await divert.take(data)
        await divert.end()

    asyncio.run(run())
    assert (tmp_path / "f").read_bytes() == b"head" + data
