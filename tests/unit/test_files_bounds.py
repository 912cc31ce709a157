"""What a hostile sender cannot make the receiver do beyond what it announced: more bytes than
a file's size, a file that ends early, a size beyond the free space, trees deeper than
MAX_DEPTH, NUL in a link target, notes that would grow memory; the sender's own side of the
size contract (a file that grows or shrinks while read); and ``fsync``'s order.

Streams are built with the codec's encoders and fed through the real Decoder and Receiver.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_files_receiver import END, file_records, listing, receive
from vmbusify.files import tree
from vmbusify.files.tree import (
    MAX_WARNINGS,
    CopyFailed,
    Receiver,
    Sender,
    StdoutReceiver,
    open_target,
    part_name,
)
from vmbusify.files.wire import (
    MAX_DEPTH,
    MAX_NAME,
    MAX_NOTE,
    UNKNOWN_SIZE,
    Decoder,
    Entry,
    Kind,
    Note,
    StreamError,
    encode_chunk_header,
    encode_entry,
    encode_file_end,
    encode_note,
    record_header,
)


def chunks(*parts: bytes) -> bytes:
    return b"".join(encode_chunk_header(len(p)) + p for p in parts)


def header(name: bytes, size: int, offset: int = 0) -> bytes:
    return encode_entry(Entry(Kind.FILE, name, 0o644, size=size, offset=offset))


def feed(receiver: Receiver | StdoutReceiver, stream: bytes) -> None:
    decoder = Decoder()
    decoder.feed(stream)
    try:
        while (event := decoder.next_event()) is not None:
            receiver.handle(event)
        receiver.finish()
    except BaseException:
        receiver.abort()
        raise


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "dest"
    d.mkdir()
    return d


# -- the announced size binds ---------------------------------------------------------------

def test_a_chunk_beyond_the_announced_size_is_refused_and_the_part_removed(dest: Path) -> None:
    stream = header(b"log", 10) + chunks(b"12345678", b"12345678") + encode_file_end() + END
    with pytest.raises(CopyFailed) as err:
        receive(dest, stream)
    assert err.value.kind == "protocol"
    assert str(err.value) == "log: the sender sent more than the 10 bytes it announced"
    assert listing(dest) == []  # no part file, nothing at the name


def test_an_endless_file_stops_at_its_size(dest: Path) -> None:
    """A sender that announces 10 bytes and then sends forever: the receiver stops at the
    first chunk past 10 bytes, having written at most 10."""
    receiver = Receiver(open_target(os.fsencode(dest), 1))
    decoder = Decoder()
    decoder.feed(header(b"f", 10))
    sent = 0

    def send_forever() -> None:
        nonlocal sent
        for _ in range(1000):
            decoder.feed(chunks(b"x" * 4))
            sent += 1
            while (event := decoder.next_event()) is not None:
                receiver.handle(event)

    with pytest.raises(CopyFailed, match="more than the 10 bytes"):
        send_forever()
    assert sent == 3
    assert (dest / part_name(b"f").decode()).stat().st_size == 8  # before the abort
    receiver.abort()
    assert listing(dest) == []


def test_a_file_end_before_the_announced_size_is_refused(dest: Path) -> None:
    with pytest.raises(CopyFailed) as err:
        receive(dest, header(b"f", 10) + chunks(b"abc") + encode_file_end() + END)
    assert err.value.kind == "protocol"
    assert "ended after 3 of the 10 bytes" in str(err.value)
    assert listing(dest) == []


def test_an_empty_file_and_an_exact_file_are_whole(dest: Path) -> None:
    receive(dest, header(b"empty", 0) + encode_file_end()
            + file_records(b"ten", b"0123456789") + END)
    assert (dest / "empty").read_bytes() == b""
    assert (dest / "ten").read_bytes() == b"0123456789"


@pytest.mark.parametrize(("rest", "ok"), [(b"456789", True), (b"4567890", False),
                                          (b"45678", False)])
def test_a_resumed_file_counts_from_its_offset(dest: Path, rest: bytes, ok: bool) -> None:
    (dest / part_name(b"f").decode()).write_bytes(b"0123")
    stream = header(b"f", 10, offset=4) + chunks(rest) + encode_file_end() + END
    if ok:
        receive(dest, stream, resume=True)
        assert (dest / "f").read_bytes() == b"0123456789"
        return
    with pytest.raises(CopyFailed) as err:
        receive(dest, stream, resume=True)
    assert err.value.kind == "protocol"
    assert not (dest / "f").exists()


def test_the_decoder_refuses_an_offset_beyond_the_size() -> None:
    decoder = Decoder()
    decoder.feed(header(b"f", 4, offset=5))
    with pytest.raises(StreamError, match="beyond its size"):
        decoder.next_event()


def test_a_size_beyond_the_free_space_fails_before_anything_is_written(dest: Path) -> None:
    st = os.statvfs(dest)
    huge = st.f_blocks * st.f_frsize + 1  # more than the whole file system
    with pytest.raises(CopyFailed) as err:
        receive(dest, header(b"big", huge) + chunks(b"x") + END)
    assert err.value.kind == "no-space"
    assert f"cannot write big: no space left on the target's file system ({huge} bytes" in str(
        err.value)
    assert listing(dest) == []


def test_the_free_space_is_read_once_per_directory_until_the_files_pass_it(
        dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files that fit take their size (in whole blocks) off the free space read for their
    directory; the first that would pass what is left reads it again, and fails before it
    is written when it passes that too: the same no-space error as a check per file."""
    reads: list[int] = []

    def free(fd: int, root: bool | None = None) -> int:  # a file system of 13 blocks
        reads.append(fd)
        used = sum(-(-p.stat().st_size // tree.BLOCK) for p in dest.rglob("*") if p.is_file())
        return (13 - used) * tree.BLOCK

    monkeypatch.setattr(tree, "free_space", free)
    (dest / "d").mkdir()
    fits = b"".join(header(name, 100) + chunks(b"x" * 100) + encode_file_end()
                    for name in (b"a", b"d/b", b"d/c"))
    receive(dest, fits + END)
    assert len(reads) == 2  # one for DST, one for d: not one per file
    reads.clear()
    many = b"".join(header(b"f%d" % i, tree.BLOCK) + chunks(b"y" * tree.BLOCK)
                    + encode_file_end() for i in range(11))
    with pytest.raises(CopyFailed) as err:
        receive(dest, many + END)
    assert len(reads) == 2  # the first file, then the eleventh
    assert err.value.kind == "no-space"
    assert str(err.value) == ("cannot write f10: no space left on the target's file system "
                              f"({tree.BLOCK} bytes to write, 0 free)")
    assert not (dest / "f10").exists() and not (dest / part_name(b"f10").decode()).exists()
    assert (dest / "f9").stat().st_size == tree.BLOCK


def test_an_unknown_size_only_where_asked_for(dest: Path) -> None:
    stream = header(b"f", UNKNOWN_SIZE) + chunks(b"any", b"length") + encode_file_end() + END
    with pytest.raises(CopyFailed, match="announced no size"):
        receive(dest, stream)
    assert listing(dest) == []
    receive(dest, stream, unknown_size=True)  # stdin pushed to a file
    assert (dest / "f").read_bytes() == b"anylength"


def test_stdout_gets_exactly_the_announced_size(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for stream, reason in [
            (header(b"f", 3) + chunks(b"abcd"), "more than the 3 bytes"),
            (header(b"f", 5) + chunks(b"abc") + encode_file_end(), "ended after 3 of the 5"),
            (header(b"f", UNKNOWN_SIZE), "announced no size"),
            (header(b"f", 9, offset=3), "resumed")]:
        with out.open("wb") as fh, pytest.raises(CopyFailed, match=reason):
            feed(StdoutReceiver(fh.fileno()), stream)
        assert out.stat().st_size <= 3
    with out.open("wb") as fh:
        feed(StdoutReceiver(fh.fileno()), header(b"f", 3) + chunks(b"abc") + encode_file_end()
             + END)
    assert out.read_bytes() == b"abc"


# -- names, links, notes ------------------------------------------------------------------------

def test_a_name_deeper_than_max_depth_is_refused(dest: Path) -> None:
    deep = b"/".join([b"d"] * (MAX_DEPTH + 1))
    with pytest.raises(CopyFailed) as err:
        receive(dest, file_records(deep, b"x") + END)
    assert err.value.kind == "unsafe"
    assert f"deeper than {MAX_DEPTH} directories" in str(err.value)
    assert len(str(err.value)) < 500  # the name is cut in the message
    assert listing(dest) == []


def test_the_deepest_allowed_name_is_written_with_bounded_fds(dest: Path) -> None:
    deep = b"/".join([b"d"] * MAX_DEPTH)
    stream = b"".join(encode_entry(Entry(Kind.DIR, b"/".join([b"d"] * n), 0o755))
                      for n in range(1, MAX_DEPTH)) + file_records(deep, b"x") + END
    fds = len(os.listdir("/proc/self/fd"))
    receive(dest, stream)
    assert len(os.listdir("/proc/self/fd")) == fds
    assert (dest / os.fsdecode(deep)).read_bytes() == b"x"


def test_the_sender_skips_what_is_too_deep_with_a_warning(tmp_path: Path) -> None:
    src = tmp_path / "t"
    deep = src.joinpath(*["d"] * (MAX_DEPTH + 2))
    deep.mkdir(parents=True)
    (deep / "f").write_text("x")
    sender = Sender([os.fsencode(src)], recursive=True)
    stream = b"".join(bytes(p) for p in sender.pieces())
    r = receive(tmp_path / "out", stream)
    assert r.counts.dirs == MAX_DEPTH
    assert [w["kind"] for w in r.counts.warnings] == ["unsupported"]
    assert f"more than {MAX_DEPTH} directories" in r.counts.warnings[0]["message"]


def test_a_nul_in_a_link_target_is_refused(dest: Path) -> None:
    stream = encode_entry(Entry(Kind.LINK, b"l", 0o777, link=b"/etc\0passwd")) + END
    with pytest.raises(CopyFailed) as err:
        receive(dest, stream)
    assert err.value.kind == "unsafe"
    assert listing(dest) == []


def test_a_link_target_longer_than_max_name_is_a_stream_error() -> None:
    body = encode_entry(Entry(Kind.LINK, b"l", 0o777, link=b"t"))
    long_target = body[5:] + b"t" * MAX_NAME  # the encoder itself refuses to make one
    decoder = Decoder()
    decoder.feed(record_header(Kind.LINK, len(long_target)) + long_target)
    with pytest.raises(StreamError, match=f"target of {MAX_NAME + 1} bytes is too long"):
        decoder.next_event()


def test_warnings_are_capped_and_their_fields_bounded(dest: Path) -> None:
    note = encode_note(Kind.WARNING, {"path": "p" * 5000, "kind": "io", "message": "m",
                                      "k" * 60000: 1})
    r = receive(dest, note * (MAX_WARNINGS + 50) + END)
    assert len(r.counts.warnings) == MAX_WARNINGS
    assert all(sorted(w) == ["kind", "message", "path"] for w in r.counts.warnings)
    assert len(r.counts.warnings[0]["path"]) == 1000


def test_a_deeply_nested_note_is_a_stream_error() -> None:
    decoder = Decoder()
    decoder.feed(record_header(Kind.WARNING, 60000) + b"[" * 60000)
    with pytest.raises(StreamError, match="not JSON"):
        decoder.next_event()


def test_a_note_too_long_is_cut_but_stays_json() -> None:
    body = encode_note(Kind.WARNING, {"path": "\udcff" * 20000, "kind": "io",
                                      "message": "x" * 70000})
    decoder = Decoder()
    decoder.feed(body)
    event = decoder.next_event()
    assert isinstance(event, Note) and event.doc["kind"] == "io"
    assert len(body) <= MAX_NOTE + 5


# -- the sender keeps to the size it announced --------------------------------------------------

def _stream_with(path: Path, change: str, size: int) -> Iterator[bytes]:
    """The sender's pieces for ``path``, changing the file just after its header."""
    for piece in Sender([os.fsencode(path)]).pieces():
        yield bytes(piece)
        if piece[:1] == b"F":
            if change == "grow":
                with path.open("ab") as fh:
                    fh.write(b"y" * size)
            else:
                os.truncate(path, size)


def test_a_file_that_grows_while_read_is_sent_up_to_its_size(tmp_path: Path) -> None:
    src = tmp_path / "log"
    src.write_bytes(b"x" * (3 << 20))
    stream = b"".join(_stream_with(src, "grow", 1 << 20))
    r = receive(tmp_path / "out", stream)
    assert (tmp_path / "out").read_bytes() == b"x" * (3 << 20)
    assert r.counts.warnings == []


def test_a_file_that_shrinks_while_read_is_not_copied(tmp_path: Path) -> None:
    src = tmp_path / "log"
    src.write_bytes(b"x" * (3 << 20))
    stream = b"".join(_stream_with(src, "shrink", 1 << 20))
    out = tmp_path / "out"
    out.mkdir()
    r = receive(out, stream)
    assert listing(out) == []
    [warning] = r.counts.warnings
    assert warning["kind"] == "io"
    assert f"not copied: {src} shrank while being read" in warning["message"]


# -- fsync --------------------------------------------------------------------------------------

def test_fsync_flushes_each_file_before_its_rename_and_the_directories_after(
        dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        what = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        log.append((f"fsync-{what}", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src: bytes, dst: bytes, **kw: int) -> None:
        log.append(("rename", os.fsdecode(dst)))
        real_rename(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    def tree(top: bytes) -> bytes:
        return (encode_entry(Entry(Kind.DIR, top, 0o755)) + file_records(top + b"/a", b"1")
                + file_records(top + b"/b", b"2") + END)

    (dest / "t").mkdir()  # a directory that is there: each file is renamed over its name
    receive(dest, tree(b"t"), fsync=True)
    t = str(dest / "t")
    assert log == [("fsync-file", t + "/" + part_name(b"a").decode()), ("rename", "a"),
                   ("fsync-file", t + "/" + part_name(b"b").decode()), ("rename", "b"),
                   ("fsync-dir", t)]
    log.clear()
    # A new top directory is staged: its files written at their names, the whole renamed
    # once it is synced, then the target directory synced.
    receive(dest, tree(b"u"), fsync=True)
    u = str(dest / part_name(b"u").decode())
    assert log == [("fsync-file", u + "/a"), ("fsync-file", u + "/b"), ("fsync-dir", u),
                   ("rename", "u"), ("fsync-dir", str(dest))]
    log.clear()
    receive(dest, file_records(b"c", b"3") + END)  # without fsync: none
    assert log == [("rename", "c")]


# -- a real full disk ---------------------------------------------------------------------------

@pytest.mark.root
@pytest.mark.parametrize("checked", [True, False])
def test_a_full_disk_fails_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   checked: bool) -> None:
    """Files that each fit an empty 2 MiB tmpfs but not all together. ``checked``: the third
    fails the free-space check before it is opened; else (the check fooled, as by another
    writer filling the disk meanwhile) with ENOSPC half-way. Either way the error says so,
    no part file is left, and the files before are whole."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    if not checked:
        monkeypatch.setattr(tree, "free_space", lambda _fd, _root=None: 1 << 60)
    try:
        data = os.urandom(900 << 10)
        stream = b"".join(file_records(n, data) for n in (b"a", b"b", b"c")) + END
        with pytest.raises(CopyFailed) as err:
            receive(small, stream)
        assert err.value.kind == "no-space"
        assert str(err.value).startswith(
            "cannot write c: no space left on the target's file system")
        assert listing(small) == ["a", "b"]
        assert hashlib.sha256((small / "b").read_bytes()).digest() == hashlib.sha256(
            data).digest()
    finally:
        subprocess.run(["umount", str(small)], check=False)
