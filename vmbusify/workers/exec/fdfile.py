"""A file handed over by descriptor: the command listener's side of Channel.FD_OPEN.

The fast path of ``vmbusifyctl cp`` for one large file (docs/files.md, docs/exec.md "A file
by descriptor"): instead of sending a file's bytes over the WebSocket (one more process and
two more copies of every byte), the client passes its open file to the listener over the Unix
socket (SCM_RIGHTS), and the listener reads it into the exec's stdin stream or writes the
exec's stdout into it. The descriptor gives the listener only what the client could do itself
(it opened the file, with its own permissions); the WebSocket carried the token before.

The stream's credit windows still apply (``Stream.write`` waits for credit; a write into the
file is one chunk at a time), so memory stays bounded, and the tunnel's turn-taking is
untouched. File I/O runs in the default thread pool, so a slow disk never stalls the
listener's other execs.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from vmbusify.bus.streams import Stream
from vmbusify.errors import ControlError
from vmbusify.protocol.window import MAX_CHUNK

#: Seconds the client has to send the descriptor once told to.
FD_TIMEOUT = 10.0
#: Seconds between two progress reports (FD_DONE with "end": false).
REPORT_EVERY = 0.25
#: Bytes one ``pwrite`` puts into the client's file: a larger write gets a large folio of the
#: page cache, whose pages a VM's free page reporting may have handed back to the host (a
#: fault there at the first touch of each): 1 GiB in 1 MiB writes cost 1.0-2.4 s of system
#: time after a pause, in 16 KiB writes 0.27 (vmbusify/files/agent.py, WRITE_STEP).
WRITE_STEP = 16 << 10
#: The largest transfer one FD_OPEN may ask for (1 PiB: a sanity bound, not a policy).
MAX_COUNT = 1 << 50

Report = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class FdRequest:
    """One FD_OPEN: ``op`` "read" (file -> stdin) or "write" (stdout -> file)."""

    op: str
    offset: int
    count: int

    @classmethod
    def parse(cls, data: bytes) -> FdRequest:
        """The request from the FD_OPEN message's JSON (ControlError if malformed)."""
        try:
            doc = json.loads(data)
        except ValueError:
            raise ControlError("FD_OPEN: not JSON") from None
        if not isinstance(doc, dict):
            raise ControlError("FD_OPEN: not a JSON object")
        op = doc.get("op")
        if op not in ("read", "write"):
            raise ControlError(f"FD_OPEN: unknown op {op!r}")
        numbers = []
        for name in ("offset", "count"):
            value = doc.get(name, 0 if name == "offset" else None)
            if type(value) is not int or not 0 <= value <= MAX_COUNT:
                raise ControlError(f"FD_OPEN: bad {name} {value!r}")
            numbers.append(value)
        return cls(str(op), *numbers)


def _recv_fd(sock: socket.socket) -> int:
    """One byte with one descriptor (blocking, with the socket's timeout)."""
    # CLOEXEC at once: the listener's own children never inherit a client's file.
    data, anc, flags, _ = sock.recvmsg(1, socket.CMSG_SPACE(array.array("i").itemsize),
                                       socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    if data != b"\0" or len(fds) != 1 or flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise ControlError("FD_OPEN: expected one byte carrying one descriptor")
    return fds[0]


async def receive_fd(transport: Any, ready: Callable[[], Awaitable[None]]) -> int:
    """Take a descriptor from the client on the WebSocket's own Unix socket.

    The transport stops reading (its reads would drop the descriptor), ``ready()`` tells the
    client to send it, and one ``recvmsg`` on a duplicate of the socket takes it; then the
    transport reads on. The client sends nothing else in between (it waits for FD_READY).
    """
    raw = transport.get_extra_info("socket") if transport is not None else None
    if raw is None or raw.family != socket.AF_UNIX:
        raise ControlError("FD_OPEN needs the listener's Unix socket")
    transport.pause_reading()
    try:
        await ready()
        dup = socket.socket(fileno=os.dup(raw.fileno()))
        try:
            dup.settimeout(FD_TIMEOUT)
            try:
                fd = await asyncio.get_running_loop().run_in_executor(None, _recv_fd, dup)
            except OSError as exc:
                raise ControlError(f"FD_OPEN: no descriptor came: {exc}") from None
        finally:
            dup.close()  # the duplicate only: the transport's descriptor stays open
    finally:
        if not transport.is_closing():
            transport.resume_reading()
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ControlError("FD_OPEN: the descriptor is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


async def _blocking(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in the default thread pool. Cancelled, it still waits for the thread to
    finish before it raises: the caller closes the descriptor the thread uses only after
    (a closed number may be reused by another file at once)."""
    job = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        await asyncio.wait([job])
        raise


def _pread_full(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset`` (fewer only at the end of the file)."""
    data = os.pread(fd, n, offset)
    while 0 < len(data) < n:
        more = os.pread(fd, n - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """All of ``data`` at ``offset``, WRITE_STEP at a time."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view[:WRITE_STEP], offset)
        view, offset = view[n:], offset + n


class _Meter:
    """FD_DONE progress reports, at most every REPORT_EVERY seconds."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.done = 0
        self._last = time.monotonic()

    async def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= REPORT_EVERY:
            self._last = now
            await self.report({"bytes": self.done, "end": False, "error": ""})

    async def end(self, error: str = "", code: int = 0) -> None:
        await self.report({"bytes": self.done, "end": True, "error": error, "errno": code})


async def file_to_stream(fd: int, req: FdRequest, stream: Stream, report: Report,
                         gone: Callable[[], bool]) -> None:
    """``req.count`` bytes of ``fd`` from ``req.offset`` into ``stream`` (the exec's stdin),
    then the last FD_DONE. A file shorter than announced ends early (the client pads);
    ``gone()`` (the client or the exec went away) stops it."""
    meter = _Meter(report)
    error, code = "", 0
    try:
        while meter.done < req.count and not gone():
            want = min(MAX_CHUNK, req.count - meter.done)
            data = await _blocking(_pread_full, fd, want, req.offset + meter.done)
            if not data:
                break
            await stream.write(data)
            await meter.add(len(data))
    except OSError as exc:
        error, code = f"cannot read the file: {exc.strerror or exc}", exc.errno or 0
    finally:
        os.close(fd)
    await meter.end(error, code)


class Divert:
    """The next ``count`` bytes of the exec's stdout go into a file, not to the client.

    After a write failed (disk full...), the last FD_DONE goes at once with the reason, and
    the rest of the ``count`` bytes is dropped (never sent to the client as output)."""

    def __init__(self, fd: int, req: FdRequest, report: Report) -> None:
        self.fd = fd
        self.offset = req.offset
        self.left = req.count
        self.meter = _Meter(report)
        self.error, self.errno = "", 0
        self._busy: asyncio.Future[None] | None = None

    async def take(self, chunk: bytes | memoryview) -> memoryview:
        """Write what of ``chunk`` belongs to the file; returns the rest (for the client)."""
        view = memoryview(chunk)
        n = min(len(view), self.left)
        if n and self.fd >= 0:
            self._busy = asyncio.ensure_future(_blocking(_pwrite_all, self.fd, view[:n],
                                                         self.offset))
            try:
                await self._busy
            except OSError as exc:
                self.error = f"cannot write the file: {exc.strerror or exc}"
                self.errno = exc.errno or 0
            finally:
                self._busy = None
        self.offset += n
        self.left -= n
        if self.error:
            await self.end()
        else:
            await self.meter.add(n)
        return view[n:]

    async def end(self) -> None:
        """Close the file and send the last FD_DONE (short if the stream ended early);
        a write still running in its thread finishes first."""
        if self._busy is not None:
            await asyncio.wait([self._busy])
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            await self.meter.end(self.error, self.errno)
