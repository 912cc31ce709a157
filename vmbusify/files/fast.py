"""The fast path of one large regular file: its data never crosses the client's socket.

The ordinary copy sends every byte from the client to the command listener over the
WebSocket (push) or back (pull). Here the client hands the listener its open file instead
(ExecChannel.hand_over: SCM_RIGHTS on the same authenticated Unix socket; docs/exec.md, "A
file by descriptor") and the listener reads it into the exec's stdin, or writes the exec's
stdout into it; the stream is in raw mode (wire.py: the file's data follows its entry
unframed), so nothing needs to parse it on the way. Everything else is the ordinary copy's:
the guest's helper, its part file and rename, ``--resume``, ``--checksum`` (hashed here, from
the file), the receiver's checks of a pull.

Chosen automatically (copy.py) for one regular file of at least FAST_MIN bytes, unless the
environment says ``VMBUSIFY_CP_FAST=0`` (the ordinary path, for comparisons).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from vmbusify.errors import FileCopyError, TunnelError
from vmbusify.files.channel import READ_SIZE, ExecChannel, Status
from vmbusify.files.tree import Counts, _hash_fd, end_note, sha256, show
from vmbusify.files.wire import Entry, Kind, encode_entry, encode_file_end, encode_note
from vmbusify.protocol.exec_api import Channel

#: Files smaller than this take the ordinary path (the hand-over costs a round trip).
FAST_MIN = 4 << 20
#: The byte a pull's helper waits for before it sends a raw file's data.
GO = b"g"

Events = list[tuple[Channel, object]]
Take = Callable[[Events], "Status | None"]


def enabled() -> bool:
    """Whether the fast path may be chosen (``VMBUSIFY_CP_FAST=0`` turns it off)."""
    return os.environ.get("VMBUSIFY_CP_FAST", "1") != "0"


def wait_done(channel: ExecChannel, events: Events, take: Take,
              on_bytes: Callable[[int], None] | None, stop: Callable[[], bool]
              ) -> tuple[dict[str, object] | None, Status | None]:
    """Read until the hand-over's last FD_DONE (returned) or the exec's end (its status).
    Other events go to ``take``; ``stop()`` true (the helper failed) ends the wait early."""
    done = 0
    while True:
        for i, (channel_, data) in enumerate(events):
            if channel_ is Channel.FD_DONE:
                assert isinstance(data, dict)
                n = int(data["bytes"])
                if n > done and on_bytes is not None:
                    on_bytes(n - done)
                done = max(done, n)
                if data["end"]:
                    channel.pending_events = events[i + 1:] + channel.pending_events
                    return data, None
            elif channel_ is not Channel.FD_READY:
                status = take([(channel_, data)])
                if status is not None:
                    return None, status
        if stop():
            return None, None
        events = channel.receive()


def push_file(channel: ExecChannel, path: bytes, name: bytes, offset: int, *,
              recursive: bool, checksum: bool, take: Take, stop: Callable[[], bool],
              on_file: Callable[[str, int], None] | None,
              on_bytes: Callable[[int], None] | None) -> tuple[Status | None, list[dict[str, str]]]:
    """Send the one file ``path`` as a raw stream (the helper was asked for ``"raw": true``):
    its entry, its data by descriptor, its Z and the E. Returns the exec's status if it ended
    meanwhile, and the warning if the file could not be sent whole (the helper drops it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_NOFOLLOW if recursive else 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileCopyError(f"{show(path)} is no longer a regular file", "io", show(path))
        size = st.st_size
        offset = min(offset, size)
        count = size - offset
        channel.send([encode_entry(Entry(Kind.FILE, name, stat.S_IMODE(st.st_mode),
                                         st.st_uid, st.st_gid, st.st_mtime_ns, size,
                                         offset))])
        if on_file is not None:
            on_file(show(name), count)
        ok, events = channel.hand_over("read", fd, offset, count)
        digest = None
        if checksum:  # while the listener sends: the same bytes, read here
            digest = sha256()
            _hash_fd(fd, size, digest)
        end, status = wait_done(channel, events, take, on_bytes, stop)
        if end is None:
            return status, []
        sent = int(end["bytes"])  # type: ignore[call-overload]
        if end["error"] and sent == 0 and count and not ok:
            raise TunnelError(f"the command listener refused the file: {end['error']}")
        if sent == count and not end["error"]:
            channel.send([encode_file_end(digest.digest() if digest else b""),
                          end_note(Counts(files=1, bytes=count))])
            return None, []
        # Short (the file shrank) or a read error: pad to what the entry announced, and drop
        # the file at the other end with a W.
        while sent < count:
            n = min(count - sent, READ_SIZE)
            channel.send([bytes(n)])
            sent += n
        why = str(end["error"] or f"{show(path)} shrank while it was being copied")
        doc = {"path": show(name), "kind": "io", "message": why}
        channel.send([encode_note(Kind.WARNING, doc), end_note(Counts())])
        return None, [doc]
    finally:
        os.close(fd)
