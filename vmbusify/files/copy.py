"""The host's half of a copy: ``push`` (host -> guest) and ``pull`` (guest -> host).

Each is one exec of the guest's helper (agent.py) through the command listener
(channel.py); ``--resume`` of a push adds one short exec before it (the probe of the part
file). The host's side of a pull is tree.Receiver: the guest's stream is hostile.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from vmbusify.control.client import ControlClient
from vmbusify.errors import FileCopyError, TunnelError, VMBusifyError
from vmbusify.files import fast, remote
from vmbusify.files.channel import MAX_MESSAGE, ExecChannel, Status
from vmbusify.files.tree import (
    READ_CHUNK,
    CopyFailed,
    Counts,
    Receiver,
    Sender,
    StdoutReceiver,
    end_note,
    failed,
    hash_prefix,
    note_doc,
    open_target,
    probe_part,
)
from vmbusify.files.wire import (
    UNKNOWN_SIZE,
    Decoder,
    Entry,
    Kind,
    Note,
    StreamError,
    encode_chunk_header,
    encode_entry,
    encode_file_end,
)
from vmbusify.protocol.exec_api import EXIT_NOT_FOUND, Channel
from vmbusify.text import printable

if TYPE_CHECKING:
    from vmbusify.config import Config

PathArg = str | bytes | os.PathLike[str] | os.PathLike[bytes]
#: What a helper may write on stderr that is kept for an error message.
STDERR_KEEP = 8 << 10
#: Pieces in one stdin message (one sendmsg: Linux's IOV_MAX is 1024).
MAX_PIECES = 256
#: Seconds to wait for the helper's answer after sending failed.
DRAIN_TIMEOUT = 10.0
#: Seconds between two progress reports (besides one at each new file).
PROGRESS_EVERY = 0.2


@dataclass(frozen=True)
class Progress:
    """Where a copy is, for a progress line: the current file and the totals so far."""

    name: str
    file_bytes: int
    file_size: int
    bytes: int
    total_bytes: int | None
    files: int
    elapsed: float


@dataclass
class CopyResult:
    """What a copy did. ``warnings``: entries not copied (``{"path", "kind", "message"}``)."""

    vm: str
    direction: str
    files: int = 0
    dirs: int = 0
    links: int = 0
    bytes: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    warnings: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every entry was copied."""
        return not self.warnings

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` summary."""
        return {"vm": self.vm, "direction": self.direction, "ok": self.ok,
                "files": self.files, "dirs": self.dirs, "links": self.links,
                "bytes": self.bytes, "seconds": round(self.seconds, 3),
                "rate_bps": int(self.bytes / self.seconds) if self.seconds > 0 else None,
                "resumed_from": self.resumed_from, "warnings": self.warnings}


class _Meter:
    """Turns the sender's or receiver's callbacks into Progress reports (throttled)."""

    def __init__(self, report: Callable[[Progress], None] | None, total: int | None) -> None:
        self.report = report
        self.total = total
        self.start = time.monotonic()
        self.name, self.file_bytes, self.file_size = "", 0, 0
        self.bytes = 0
        self.files = 0
        self._last = 0.0

    def on_file(self, name: str, size: int) -> None:
        if self.name:
            self.files += 1
        self.name, self.file_bytes, self.file_size = name, 0, size
        self._emit(force=True)

    def on_bytes(self, n: int) -> None:
        self.file_bytes += n
        self.bytes += n
        self._emit()

    def _emit(self, force: bool = False) -> None:
        if self.report is None:
            return
        now = time.monotonic()
        if force or now - self._last >= PROGRESS_EVERY:
            self._last = now
            self.report(Progress(self.name, self.file_bytes, self.file_size, self.bytes,
                                 self.total, self.files, now - self.start))


def _load(config: Config | None, client: ControlClient | None) -> Config | ControlClient:
    """Where the copy's exec goes: ``client`` if given, else ``config`` (by default this
    endpoint's, loaded here: the configuration model costs a start ~45 ms, which
    vmbusifyctl's client, made from the listener's keys alone, does not pay)."""
    if client is not None:
        return client
    if config is not None:
        return config
    from vmbusify.config import load_config
    return load_config(None)


def _error(exc: CopyFailed) -> FileCopyError:
    return FileCopyError(str(exc), exc.kind, exc.path)


def _size_of(paths: Sequence[bytes], recursive: bool) -> int:
    """Bytes of regular files under ``paths`` (for the progress line's ETA)."""
    total = 0
    for path in paths:
        try:
            st = os.lstat(path) if recursive else os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
        elif stat.S_ISDIR(st.st_mode) and recursive:
            for root, _dirs, files in os.walk(path):
                for name in files:
                    try:
                        fst = os.lstat(os.path.join(root, name))
                    except OSError:
                        continue
                    if stat.S_ISREG(fst.st_mode):
                        total += fst.st_size
    return total


def _stdin_pieces(fd: int, name: bytes, checksum: bool, meter: _Meter
                  ) -> Iterator[bytes | memoryview]:
    """A stream of one file read from ``fd`` (``cp - VM:FILE``)."""
    import hashlib

    digest = hashlib.sha256() if checksum else None
    yield encode_entry(Entry(Kind.FILE, name, mode=0o644, mtime_ns=time.time_ns(),
                             size=UNKNOWN_SIZE))
    meter.on_file("-", 0)
    n = 0
    while data := os.read(fd, READ_CHUNK):
        if digest is not None:
            digest.update(data)
        yield encode_chunk_header(len(data))
        yield data
        n += len(data)
        meter.on_bytes(len(data))
    yield encode_file_end(digest.digest() if digest is not None else b"")
    yield end_note(Counts(files=1, bytes=n))


class _Replies:
    """What the guest's helper writes back during a push: W records, then E or X."""

    def __init__(self) -> None:
        self.decoder = Decoder()
        self.warnings: list[dict[str, str]] = []
        self.end: dict[str, object] | None = None
        self.failure: FileCopyError | None = None
        self.stderr = bytearray()

    def take(self, events: list[tuple[Channel, object]]) -> Status | None:
        for channel, data in events:
            if channel is Channel.STATUS:
                assert isinstance(data, Status)
                return data
            if channel in (Channel.FD_READY, Channel.FD_DONE):
                continue  # a file by descriptor still reporting after the helper stopped
            assert isinstance(data, bytes)
            if channel is Channel.STDERR:
                self.stderr += data[:max(0, STDERR_KEEP - len(self.stderr))]
                continue
            try:
                self.decoder.feed(data)
                while (event := self.decoder.next_event()) is not None:
                    if not isinstance(event, Note):
                        raise StreamError("the guest's helper answered with file data")
                    self._note(event)
            except StreamError as exc:
                self.failure = FileCopyError(f"bad answer from the guest's helper: {exc}",
                                             "protocol")
        return None

    def answer(self, channel: ExecChannel, status: Status | None) -> dict[str, object]:
        """The helper's E record; else the error why there is none: its X record, the exec's
        end (``status``), or the copy lost (no status)."""
        if self.failure is not None:
            raise self.failure
        if self.end is None:
            if status is None:
                raise TunnelError(f"lost the copy to {channel.vm}")
            raise _helper_error(channel, status, bytes(self.stderr))
        return self.end

    def _note(self, note: Note) -> None:
        doc = note_doc(note)
        if note.kind is Kind.WARNING and len(self.warnings) < 1000:
            self.warnings.append(doc)
        elif note.kind is Kind.END:
            self.end = note.doc
        elif note.kind is Kind.FAILURE and self.failure is None:
            self.failure = FileCopyError(doc["message"] or "the copy failed in the guest",
                                         doc["kind"] or "io", doc["path"])


def _finish(channel: ExecChannel, replies: _Replies) -> Status:
    """Read until the STATUS (stopping early at an X record)."""
    while True:
        status = replies.take(channel.receive())
        if status is not None:
            return status


def _drain(channel: ExecChannel, replies: _Replies) -> Status | None:
    """What is left to read after sending failed (None if the connection is gone)."""
    if channel.sock is not None:
        channel.sock.settimeout(DRAIN_TIMEOUT)
    try:
        return _finish(channel, replies)
    except VMBusifyError:
        return None


def _helper_error(channel: ExecChannel, status: Status, stderr: bytes) -> VMBusifyError:
    """Why the helper ended without an answer: the exec's own reason, or its stderr."""
    if status.reason in ("exited", "signaled") and not (
            status.exit_code == EXIT_NOT_FOUND and not stderr):
        last = stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
        why = printable(last[0], 400) if last else (
            f"it ended ({status.reason}, status {status.exit_code}) before the end of its "
            "stream")
        return FileCopyError(f"the copy's helper in {channel.vm} failed: {why}", "protocol")
    return channel.explain(status)


def _probe(where: Config | ControlClient, vm: str, dest: str, name: bytes, user: str
           ) -> tuple[int, str]:
    """The size and sha256 of the guest's part file for a resumed push."""
    channel = ExecChannel(where, vm, remote.agent_argv(
        {"op": "probe", "dest": dest, "name": os.fsdecode(name)}), user=user, stdin=False)
    replies = _Replies()
    channel.open()
    try:
        status = _finish(channel, replies)
    finally:
        channel.close()
    end = replies.answer(channel, status)
    size, digest = end.get("size"), end.get("sha256")
    return (size, str(digest)) if isinstance(size, int) and size > 0 else (0, "")


def push(vm: str, sources: Sequence[PathArg], dest: str, *, recursive: bool = False,
         preserve: bool = False, user: str = "", resume: bool = False,
         checksum: bool = False, config: Config | None = None,
         progress: Callable[[Progress], None] | None = None,
         stdin: BinaryIO | None = None, fsync: bool = False,
         client: ControlClient | None = None) -> CopyResult:
    """Copy local ``sources`` to ``dest`` in the VM ``vm`` (a vmid or an address it reported).

    As cp: an existing directory ``dest`` receives the sources by their names; otherwise
    (one source) ``dest`` is the new name. ``recursive`` copies directories; ``preserve``
    keeps modes and times (and owners when the guest's helper runs as root); ``user`` runs
    the helper as that guest user (owner of what it creates, as exec's ``-u``); ``resume``
    continues a single file from its part file in the guest after checking it is a prefix of
    the source; ``checksum`` compares sha256 at both ends. A source ``"-"`` is ``stdin``
    (default: this process's stdin), written to the file ``dest``. ``fsync``: the guest
    flushes each file to its disk before the rename, and each directory changed after.
    ``client``: the command listener's client to use instead of ``config``'s.
    """
    where = _load(config, client)
    started = time.monotonic()
    srcs = [os.fsencode(s) for s in sources]
    if not srcs:
        raise FileCopyError("nothing to copy", "usage")
    from_stdin = srcs == [b"-"]
    if b"-" in srcs and not from_stdin:
        raise FileCopyError("'-' (stdin) must be the only source", "usage")
    offset = 0
    request: dict[str, Any] = {"op": "recv", "dest": dest, "n_sources": len(srcs),
                               "preserve": preserve, "checksum": checksum, "resume": resume,
                               "stdin": from_stdin, "fsync": fsync}
    if from_stdin:
        fd = (stdin or sys.stdin.buffer).fileno()
        leaf = os.path.basename(os.fsencode(dest).rstrip(b"/")) or b"stdin"
        meter = _Meter(progress, None)
        pieces: Iterator[bytes | memoryview] = _stdin_pieces(fd, leaf, checksum, meter)
        sender: Sender | None = None
    else:
        sender = Sender(srcs, recursive=recursive, checksum=checksum)
        try:
            sender.check()
        except CopyFailed as exc:
            raise _error(exc) from None
        meter = _Meter(progress, _size_of(srcs, recursive) if progress else None)
        if progress is not None:  # else no call for each file
            sender.on_file, sender.on_bytes = meter.on_file, meter.on_bytes
        if resume:
            if len(srcs) != 1 or not os.path.isfile(srcs[0]):
                raise FileCopyError("--resume continues one regular file", "usage")
            size, digest = _probe(where, vm, dest, sender.names[0], user)
            if size and size <= os.path.getsize(srcs[0]) and \
                    hash_prefix(srcs[0], size) == digest:
                offset = sender.offset = size
        pieces = sender.pieces()
    one = _fast_source(srcs, recursive) if sender is not None else None
    if one is not None:
        request["raw"] = True
    channel = ExecChannel(where, vm, remote.agent_argv(request), user=user)
    replies = _Replies()
    channel.open()
    try:
        try:
            if sender is not None and one is not None:
                status, warned = fast.push_file(
                    channel, srcs[0], sender.names[0], offset, recursive=recursive,
                    checksum=checksum, take=replies.take,
                    stop=lambda: replies.failure is not None, on_file=meter.on_file,
                    on_bytes=meter.on_bytes)
                sender.counts.warnings += warned
            else:
                status = _send_all(channel, pieces, replies)
        except TunnelError as exc:
            # The helper may have stopped first (disk full, permission denied): its answer
            # is still to be read, and says more than the broken pipe.
            status = _drain(channel, replies)
            if replies.failure is None:
                raise exc from None
        if status is None:
            channel.close_stdin()
            status = _finish(channel, replies)
    finally:
        channel.close()
    end = replies.answer(channel, status)
    result = CopyResult(vm, "push", seconds=time.monotonic() - started, resumed_from=offset)
    for key in ("files", "dirs", "links", "bytes"):
        value = end.get(key)
        setattr(result, key, value if isinstance(value, int) else 0)
    result.warnings = (sender.counts.warnings if sender else []) + replies.warnings
    return result


def _fast_source(srcs: Sequence[bytes], recursive: bool) -> bytes | None:
    """The one source a push sends by the fast path (fast.py), if it takes it."""
    if len(srcs) != 1 or not fast.enabled():
        return None
    try:
        st = os.lstat(srcs[0]) if recursive else os.stat(srcs[0])
    except OSError:
        return None
    return srcs[0] if stat.S_ISREG(st.st_mode) and st.st_size >= fast.FAST_MIN else None


def _send_all(channel: ExecChannel, pieces: Iterator[bytes | memoryview], replies: _Replies
              ) -> Status | None:
    """Send the stream as stdin messages of up to MAX_MESSAGE bytes; between messages, read
    what came back, and stop at the helper's failure (its X record, or its end)."""
    batch: list[bytes | memoryview] = []
    size = 1
    for piece in pieces:
        if batch and (size + len(piece) > MAX_MESSAGE - 64 or len(batch) >= MAX_PIECES):
            channel.send(batch)
            batch, size = [], 1
            while channel.readable():
                status = replies.take(channel.receive())
                if status is not None:
                    return status
                if replies.failure is not None:
                    return None
        batch.append(piece)
        size += len(piece)
    if batch:
        channel.send(batch)
    return None


def pull(vm: str, sources: Sequence[str], dest: PathArg, *, recursive: bool = False,
         preserve: bool = False, user: str = "", resume: bool = False,
         checksum: bool = False, config: Config | None = None,
         progress: Callable[[Progress], None] | None = None,
         stdout: BinaryIO | None = None, fsync: bool = False,
         client: ControlClient | None = None) -> CopyResult:
    """Copy ``sources`` of the VM ``vm`` to the local ``dest`` (cp's rules, as ``push``).

    The guest's stream is checked as hostile: nothing is written outside ``dest`` (no
    absolute names, no ``..``, no symlink followed), setuid/setgid bits are dropped, device
    nodes never made, owners set only when this process is root and ``preserve`` is asked.
    ``dest`` ``"-"`` writes the one file's data to ``stdout`` (default: this process's).
    ``fsync``: each file is flushed to disk before the rename, each directory changed after
    (not for ``"-"``). ``client``: as for ``push``.
    """
    where = _load(config, client)
    started = time.monotonic()
    if not sources:
        raise FileCopyError("nothing to copy", "usage")
    meter = _Meter(progress, None)
    dest_b = os.fsencode(dest)
    request: dict[str, Any] = {"op": "send", "sources": list(sources), "recursive": recursive,
                               "checksum": checksum}
    receiver: Receiver | StdoutReceiver
    try:
        if dest_b == b"-":
            if len(sources) != 1:
                raise CopyFailed("usage", "only one file can be written to stdout")
            out = stdout or sys.stdout.buffer
            out.flush()
            receiver = StdoutReceiver(out.fileno(), checksum, meter.on_file, meter.on_bytes)
        else:
            if resume:
                if len(sources) != 1:
                    raise CopyFailed("usage", "--resume continues one regular file")
                name = os.path.basename(os.fsencode(sources[0]).rstrip(b"/"))
                size, digest = probe_part(dest_b, name)
                if size:
                    request.update(offset=size, expect=digest)
            receiver = Receiver(open_target(dest_b, len(sources)), preserve=preserve,
                                chown=preserve and os.geteuid() == 0, checksum=checksum,
                                resume=resume, on_file=meter.on_file if progress else None,
                                on_bytes=meter.on_bytes if progress else None,
                                fsync=fsync)
    except CopyFailed as exc:
        raise _error(exc) from None
    raw = dest_b != b"-" and len(sources) == 1 and fast.enabled()
    if raw:
        request["raw"] = True  # the helper waits for fast.GO on stdin before the data
    channel = ExecChannel(where, vm, remote.agent_argv(request), user=user, stdin=raw)
    try:
        channel.open()
        status, stderr, decoder = _receive_all(channel, receiver, raw, meter)
        if not decoder.finished:
            raise _helper_error(channel, status, stderr)
        receiver.finish()
    except CopyFailed as exc:
        receiver.abort()
        raise _error(exc) from None
    except StreamError as exc:
        receiver.abort()
        raise FileCopyError(f"bad stream from {vm}: {exc}", "protocol") from None
    except FileCopyError:
        receiver.abort()
        raise
    except BaseException:
        # Cut off half-way (the tunnel, the listener, Ctrl-C): the part file is kept for
        # --resume; it is never at the target's name.
        receiver.abort(keep_part=True)
        raise
    finally:
        channel.close()
    c = receiver.counts
    return CopyResult(vm, "pull", c.files, c.dirs, c.links, c.bytes,
                      time.monotonic() - started, c.resumed_from, c.warnings)


def _receive_all(channel: ExecChannel, receiver: Receiver | StdoutReceiver, raw: bool = False,
                 meter: _Meter | None = None) -> tuple[Status, bytes, Decoder]:
    """Feed the helper's stdout to the receiver until the STATUS. ``raw``: the stream is in
    raw mode, and a first file's data comes by the fast path (``_take_raw``)."""
    decoder = Decoder(raw_first=raw)
    stderr = bytearray()
    asked = not raw
    while True:
        events = channel.receive()
        while events:
            ch, data = events.pop(0)
            if ch is Channel.STATUS:
                assert isinstance(data, Status)
                return data, bytes(stderr), decoder
            if ch is Channel.STDERR:
                assert isinstance(data, bytes)
                stderr += data[:max(0, STDERR_KEEP - len(stderr))]
                continue
            if ch is not Channel.STDOUT:
                continue
            assert isinstance(data, bytes)
            decoder.feed(data)
            while (event := decoder.next_event()) is not None:
                receiver.handle(event)
                if not asked and isinstance(event, Entry):
                    asked = True
                    if event.kind is Kind.FILE:
                        assert isinstance(receiver, Receiver)
                        channel.pending_events = events + channel.pending_events
                        events = []
                        _take_raw(channel, decoder, receiver, event, stderr, meter)


def _take_raw(channel: ExecChannel, decoder: Decoder, receiver: Receiver, entry: Entry,
              stderr: bytearray, meter: _Meter | None) -> None:
    """A pull's raw file (the first entry): the listener writes it into the part file
    (fast.py), or, when small, the helper sends it as stdout. Returns once the data is in;
    if the exec ended first, its STATUS is the next event (the stream is then short)."""
    if decoder.buffered:
        raise StreamError("file data came before it was asked for")
    count = decoder.raw_left
    if count < fast.FAST_MIN:
        channel.send([fast.GO])
        return
    ok, events = channel.hand_over("write", receiver.direct_fd(), entry.offset, count)
    if ok:
        channel.send([fast.GO])
    status: list[Status] = []

    def take(got: list[tuple[Channel, object]]) -> Status | None:
        for ch, data in got:
            if ch is Channel.STATUS:
                assert isinstance(data, Status)
                status.append(data)
                return data
            if ch is Channel.STDOUT:
                raise StreamError("file data came outside the file's descriptor")
            if ch is Channel.STDERR and isinstance(data, bytes):
                stderr.extend(data[:max(0, STDERR_KEEP - len(stderr))])
        return None

    end, _ = fast.wait_done(channel, events, take, meter.on_bytes if meter else None,
                            lambda: False)
    if end is None:  # the exec ended: its STATUS goes to the caller, the file is short
        channel.pending_events = [(Channel.STATUS, status[0]), *channel.pending_events]
        return
    if end["error"]:
        code = end.get("errno")
        if not ok or not isinstance(code, int) or not code:
            raise TunnelError(f"the command listener could not write the file: "
                              f"{end['error']}")
        raise failed(OSError(code, os.strerror(code)), "cannot write",
                     receiver.landed(entry.name))
    if end["bytes"] == count:
        decoder.skip_raw(count)
        receiver.wrote_directly(entry.offset, count)
