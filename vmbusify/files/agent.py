"""The guest's half of `vmbusifyctl cp`: a small program the host runs through exec.

The host sends this module's source with wire.py and tree.py as arguments of one exec
(``python3 -I -S -c BOOTSTRAP REQUEST WIRE TREE AGENT``: see vmbusify/files/remote.py), so a
copy needs nothing installed in the guest but ``python3`` (which the guest's VMBusify runs on),
and a guest of an older release copies with the host's code. It runs as the exec's user (``-u``),
so the guest's own permissions decide what it may read and write.

Standard library, wire.py and tree.py only. The request is one JSON object::

    {"v": 1, "op": "recv" | "send" | "probe", "dest": ..., "sources": [...],
     "recursive": bool, "preserve": bool, "checksum": bool, "resume": bool,
     "offset": int, "expect": hex sha256 of the first offset bytes, "stdin": bool,
     "fsync": bool, "raw": bool}

recv (a push): the stream on stdin is written under ``dest``; stdout gets W records for what
was not written, then E with the counts, or X with the reason. send (a pull): ``sources`` are
sent on stdout as a stream. probe (a push's ``--resume``): one E record with the part file's
``size`` and ``sha256``. ``raw``: the stream is in raw mode (wire.py: the data of a first
file entry follows it unframed; the host's fast path for one large file). Names travel as
strings whose undecodable bytes are surrogates.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterable

from vmbusify.files.tree import (
    CopyFailed,
    Counts,
    Receiver,
    Sender,
    _hash_fd,
    end_note,
    failed,
    hash_prefix,
    open_target,
    probe_part,
    sha256,
    show,
)
from vmbusify.files.wire import (
    VERSION,
    Decoder,
    Entry,
    Kind,
    StreamError,
    encode_entry,
    encode_file_end,
    encode_note,
)

#: Bytes gathered before one write to stdout.
WRITE_BATCH = 1 << 20
READ_SIZE = 1 << 20
#: Bytes one splice puts into the part file. Linux (6.x) gives a larger write a large folio
#: of the page cache, taken from the 2 MiB blocks that a VM's free page reporting has handed
#: back to its host, and the first touch of each such page faults in the host: 1 GiB in
#: 1 MiB writes cost 1.0-2.4 s of system time after a 5 s pause, in 16 KiB writes 0.27-0.28
#: (32 and 64 KiB: 0.2-1.0). docs/performance.md, "`vmbusifyctl cp`, one large file".
WRITE_STEP = 16 << 10
#: Pieces in one writev (Linux's IOV_MAX is 1024).
MAX_PIECES = 256


def write_pieces(fd: int, pieces: Iterable[bytes | memoryview]) -> None:
    """Write every piece to ``fd``, small ones gathered into one writev of ~1 MiB."""
    batch: list[bytes | memoryview] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece)
        if size >= WRITE_BATCH or len(batch) >= MAX_PIECES:
            _writev_all(fd, batch)
            batch, size = [], 0
    if batch:
        _writev_all(fd, batch)


def _writev_all(fd: int, batch: list[bytes | memoryview]) -> None:
    views = [memoryview(b) for b in batch]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _fail(exc: CopyFailed) -> int:
    doc = {"kind": exc.kind, "message": str(exc), "path": exc.path}
    write_pieces(1, [encode_note(Kind.FAILURE, doc)])
    return 1


def _recv(req: dict[str, object]) -> int:
    dest = os.fsencode(str(req["dest"]))
    preserve = bool(req.get("preserve"))
    root = os.geteuid() == 0
    target = open_target(dest, int(req.get("n_sources", 1)))  # type: ignore[call-overload]
    if req.get("stdin") and target.rename is None:
        os.close(target.fd)
        raise CopyFailed("is-dir", f"{os.fsdecode(dest)} is a directory: name the file to "
                         "write stdin to", os.fsdecode(dest))
    receiver = Receiver(target, preserve=preserve, chown=preserve and root,
                        allow_setid=preserve and root, checksum=bool(req.get("checksum")),
                        resume=bool(req.get("resume")), fsync=bool(req.get("fsync")),
                        unknown_size=bool(req.get("stdin")))
    decoder = Decoder(raw_first=bool(req.get("raw")))
    _grow_pipe(0)
    try:
        while not decoder.finished:
            data = os.read(0, READ_SIZE)
            if not data:
                receiver.abort(keep_part=True)
                return 1  # the host went away: nobody to tell
            decoder.feed(data)
            while (event := decoder.next_event()) is not None:
                receiver.handle(event)
            if decoder.raw_left and not decoder.buffered and not _splice_raw(receiver,
                                                                              decoder):
                receiver.abort(keep_part=True)
                return 1  # the host went away: nobody to tell
        receiver.finish()
    except StreamError as exc:
        receiver.abort()
        raise CopyFailed("protocol", f"bad stream from the host: {exc}") from None
    except BaseException:
        receiver.abort()
        raise
    write_pieces(1, [end_note(receiver.counts)])
    return 0


def _grow_pipe(fd: int) -> None:
    """Make the pipe ``fd`` (stdin: the exec's worker writes the stream into it) hold
    READ_SIZE bytes, not Linux's 64 KiB: the worker writes what it has in one go and this
    process reads it in one go (a sixteenth of the wake-ups on each side). Nothing happens
    where it is not a pipe or the user's pipe quota is spent."""
    import fcntl

    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), READ_SIZE)
    except OSError:
        pass


def _splice_raw(receiver: Receiver, decoder: Decoder) -> bool:
    """The rest of a raw file (wire.py) from stdin into the part file, moved by the kernel
    (splice: this process never reads it), WRITE_STEP at a time. Does nothing where splice is
    missing (Python < 3.10) or with a checksum (the bytes must be hashed here). False: stdin
    ended first."""
    splice = getattr(os, "splice", None)
    fd = receiver.direct_fd()
    if splice is None or fd < 0 or receiver.checksum:
        return True
    while decoder.raw_left:
        at = os.lseek(fd, 0, os.SEEK_CUR)
        want, n, ended, unsupported = min(decoder.raw_left, READ_SIZE), 0, False, False
        while n < want:
            try:
                got = splice(0, fd, min(want - n, WRITE_STEP))
            except OSError as exc:
                if exc.errno == 22 and not n:  # EINVAL: no splice into this file: read instead
                    unsupported = True
                    break
                raise failed(exc, "cannot write", receiver.landed(receiver.entry_name())) from None
            if not got:
                ended = True
                break
            n += got
        if n:
            decoder.skip_raw(n)
            receiver.wrote_directly(at, n)
        if unsupported:
            return True
        if ended:
            return False
    return True


def _send(req: dict[str, object]) -> int:
    sources = [os.fsencode(str(s)) for s in req["sources"]]  # type: ignore[attr-defined]
    offset = int(req.get("offset") or 0)  # type: ignore[call-overload]
    if offset and (len(sources) != 1 or hash_prefix(sources[0], offset) != req.get("expect")):
        offset = 0  # the part at the host is not a prefix of this file: send it all
    sender = Sender(sources, recursive=bool(req.get("recursive")),
                    checksum=bool(req.get("checksum")), offset=offset)
    sender.check()
    if req.get("raw") and len(sources) == 1 and _send_raw(sender, offset):
        return 0
    write_pieces(1, sender.pieces())
    return 0


def _send_raw(sender: Sender, offset: int) -> bool:
    """Raw mode (wire.py) for one regular file: its entry, then, once the host said "go" on
    stdin (it has made ready to take the data), exactly ``size - offset`` bytes unframed, then
    Z (or W if the file shrank meanwhile: the host drops it) and E. False (nothing sent) when
    the source is not a regular file this process can open: the ordinary stream says why."""
    src, name = sender.sources[0], sender.names[0]
    try:
        # O_NONBLOCK: a FIFO would block the open until a writer came (it is not copied).
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (
            os.O_NOFOLLOW if sender.recursive else 0))
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        size, offset = st.st_size, min(offset, st.st_size)
        digest = sha256() if sender.checksum else None
        if digest is not None and offset:
            _hash_fd(fd, offset, digest)
        write_pieces(1, [encode_entry(Entry(Kind.FILE, name, stat.S_IMODE(st.st_mode),
                                            st.st_uid, st.st_gid, st.st_mtime_ns, size,
                                            offset))])
        if os.read(0, 1) != b"g":
            return True  # the host went away (or broke the protocol): nobody to send to
        count, short = size - offset, ""
        pos = offset
        while pos < size:
            want = min(size - pos, READ_SIZE)
            try:
                if digest is None:
                    n = os.sendfile(1, fd, pos, want)
                else:
                    data = os.pread(fd, want, pos)
                    digest.update(data)
                    write_pieces(1, [data])
                    n = len(data)
            except OSError as exc:
                if exc.errno in (22, 38) and digest is None:  # EINVAL, ENOSYS: no sendfile
                    data = os.pread(fd, want, pos)
                    write_pieces(1, [data])
                    n = len(data)
                else:
                    short = f"cannot read {show(src)}: {exc.strerror}"
                    n = 0
            if not n:  # shrank (or unreadable): pad to what was announced, then drop it
                short = short or f"{show(src)} shrank while it was being copied"
                while pos < size:  # one piece at a time: memory stays bounded
                    n = min(size - pos, READ_SIZE)
                    write_pieces(1, [bytes(n)])
                    pos += n
                break
            pos += n
        if short:
            note = encode_note(Kind.WARNING, {"path": show(name), "kind": "io",
                                              "message": short})
            write_pieces(1, [note, end_note(Counts())])
        else:
            write_pieces(1, [encode_file_end(digest.digest() if digest else b""),
                             end_note(Counts(files=1, bytes=count))])
        return True
    finally:
        os.close(fd)


def _probe(req: dict[str, object]) -> int:
    size, digest = probe_part(os.fsencode(str(req["dest"])), os.fsencode(str(req["name"])))
    write_pieces(1, [encode_note(Kind.END, {"size": size, "sha256": digest})])
    return 0


def main(request: str) -> int:
    """Run one request (the JSON text); the exit status is 0 when the copy was whole."""
    try:
        req = json.loads(request)
        if not isinstance(req, dict) or req.get("v") != VERSION:
            raise CopyFailed("usage", f"this helper speaks version {VERSION} of the stream")
        op = {"recv": _recv, "send": _send, "probe": _probe}.get(str(req.get("op")))
        if op is None:
            raise CopyFailed("usage", f"unknown operation {req.get('op')!r}")
        return op(req)
    except CopyFailed as exc:
        return _fail(exc)
    except BrokenPipeError:
        return 1
    except OSError as exc:
        return _fail(CopyFailed("io", f"{exc.strerror or exc}"))
    except ValueError as exc:
        return _fail(CopyFailed("usage", f"bad request: {exc}"))


#: What the host runs with ``python3 -I -S -c``: it installs the three modules from the
#: arguments under their own names, then runs ``main(REQUEST)``.
BOOTSTRAP = """\
import sys, types
for n in ("vmbusify", "vmbusify.files"):
    m = types.ModuleType(n); m.__path__ = []; sys.modules[n] = m
for n, src in zip(("wire", "tree", "agent"), sys.argv[2:5]):
    m = types.ModuleType("vmbusify.files." + n); m.__file__ = "<vmbusify.files." + n + ">"
    sys.modules[m.__name__] = m; setattr(sys.modules["vmbusify.files"], n, m)
    exec(compile(src, m.__file__, "exec"), m.__dict__)
sys.exit(sys.modules["vmbusify.files.agent"].main(sys.argv[1]))
"""

if __name__ == "__main__":  # pragma: no cover - run by the bootstrap, or by hand for a test
    sys.exit(main(sys.argv[1]))
