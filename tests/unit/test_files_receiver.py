"""The receiver of a copy against hostile streams (a pull's stream is the guest's): nothing
outside DST, no symlink followed, no setuid, nothing partial; and the codec's strictness.

Each stream is built record by record with the codec's encoders (what a hostile guest can
send: the format allows any bytes in these fields), fed through the real Decoder and Receiver.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from vmbusify.files.tree import CopyFailed, Receiver, Sender, open_target, part_name
from vmbusify.files.wire import (
    MAX_CHUNK,
    Decoder,
    Entry,
    Kind,
    StreamError,
    encode_chunk_header,
    encode_entry,
    encode_file_end,
    encode_note,
    record_header,
)

END = encode_note(Kind.END, {"files": 0})


def file_records(name: bytes, data: bytes, mode: int = 0o644, sha: bytes | None = None,
                 uid: int = 0, gid: int = 0, size: int | None = None, offset: int = 0
                 ) -> bytes:
    out = encode_entry(Entry(Kind.FILE, name, mode, uid, gid, size=len(data) if size is None
                             else size, offset=offset))
    if data:
        out += encode_chunk_header(len(data)) + data
    return out + encode_file_end(hashlib.sha256(data).digest() if sha is None else sha)


def receive(dest: Path, stream: bytes, n_sources: int = 1, *, preserve: bool = False,
            checksum: bool = False, **kw: Any) -> Receiver:
    receiver = Receiver(open_target(os.fsencode(dest), n_sources), preserve=preserve,
                        checksum=checksum, **kw)
    decoder = Decoder()
    try:
        decoder.feed(stream)
        while (event := decoder.next_event()) is not None:
            receiver.handle(event)
        receiver.finish()
    except BaseException:
        receiver.abort()
        raise
    return receiver


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (outside / "victim").write_text("untouched")
    return dest, outside


@pytest.mark.parametrize("name", [b"/etc/passwd", b"a/../../x", b"..", b".", b"a//b",
                                  b"a/./b", b"a\0b", b"x/" + b"y" * 256])
def test_unsafe_names_are_refused(dirs: tuple[Path, Path], name: bytes) -> None:
    dest, _ = dirs
    with pytest.raises(CopyFailed) as err:
        receive(dest, file_records(name, b"evil") + END)
    assert err.value.kind == "unsafe"
    assert listing(dest) == []


def test_a_symlink_from_the_stream_is_never_followed(dirs: tuple[Path, Path]) -> None:
    dest, outside = dirs
    stream = (encode_entry(Entry(Kind.LINK, b"a", 0o777, link=os.fsencode(outside)))
              + file_records(b"a/victim", b"overwritten") + END)
    with pytest.raises(CopyFailed) as err:
        receive(dest, stream)
    assert err.value.kind == "unsafe"
    assert (outside / "victim").read_text() == "untouched"
    assert listing(outside) == ["victim"]


def test_a_directory_over_a_symlink_is_refused(dirs: tuple[Path, Path]) -> None:
    dest, outside = dirs
    stream = (encode_entry(Entry(Kind.LINK, b"a", 0o777, link=os.fsencode(outside)))
              + encode_entry(Entry(Kind.DIR, b"a", 0o755))
              + file_records(b"a/new", b"x") + END)
    with pytest.raises(CopyFailed):
        receive(dest, stream)
    assert listing(outside) == ["victim"]


def test_a_file_replaces_a_symlink_at_its_name_without_following_it(
        dirs: tuple[Path, Path]) -> None:
    dest, outside = dirs
    (dest / "f").symlink_to(outside / "victim")
    receive(dest, file_records(b"f", b"new") + END)
    assert (outside / "victim").read_text() == "untouched"
    assert not (dest / "f").is_symlink()
    assert (dest / "f").read_text() == "new"


def test_a_planted_part_file_symlink_is_not_followed(dirs: tuple[Path, Path]) -> None:
    dest, outside = dirs
    (dest / part_name(b"f").decode()).symlink_to(outside / "victim")
    receive(dest, file_records(b"f", b"new") + END)
    assert (outside / "victim").read_text() == "untouched"
    assert listing(dest) == ["f"]


def test_setuid_and_setgid_are_dropped_and_owners_kept_off(dirs: tuple[Path, Path]) -> None:
    dest, _ = dirs
    stream = (file_records(b"suid", b"#!/bin/sh\n", mode=0o6755, uid=4242, gid=4242)
              + encode_entry(Entry(Kind.DIR, b"d", 0o3777)) + END)
    receive(dest, stream, preserve=True)
    st = (dest / "suid").stat()
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
    assert stat.S_IMODE((dest / "d").stat().st_mode) == 0o1777


@pytest.mark.parametrize(("mode", "preserve", "part", "final"), [
    (0o644, False, 0o644, 0o644),   # no one else may write it: made with its mode
    (0o755, True, 0o755, 0o755),
    (0o600, False, 0o600, 0o600),
    (0o666, False, 0o644, 0o644),   # the umask (022) takes the others' write bit off first
    (0o666, True, 0o600, 0o666),    # others may write it: 0600 until complete
    (0o444, True, 0o600, 0o444),    # the owner could not reopen a kept part to resume
    (0o1755, True, 0o600, 0o1755),  # a special bit: only by chmod
])
def test_a_part_file_lets_no_one_else_write_it(dirs: tuple[Path, Path], mode: int,
                                               preserve: bool, part: int, final: int) -> None:
    """A part file is made with its file's final mode when that lets no one else write it
    (no chmod once complete), else 0600; what is at the name at the end is the same."""
    dest, _ = dirs
    seen: list[int] = []

    def on_file(name: str, size: int) -> None:
        seen.append(stat.S_IMODE((dest / part_name(b"f").decode()).lstat().st_mode))

    old = os.umask(0o022)
    try:
        receive(dest, file_records(b"f", b"data", mode=mode) + END, preserve=preserve,
                on_file=on_file)
    finally:
        os.umask(old)
    assert seen == [part]
    assert stat.S_IMODE((dest / "f").stat().st_mode) == final


def test_checksum_mismatch_leaves_nothing(dirs: tuple[Path, Path]) -> None:
    dest, _ = dirs
    with pytest.raises(CopyFailed) as err:
        receive(dest, file_records(b"f", b"data", sha=b"\0" * 32) + END, checksum=True)
    assert err.value.kind == "checksum"
    assert listing(dest) == []


def test_a_file_the_sender_could_not_finish_is_dropped(dirs: tuple[Path, Path]) -> None:
    dest, _ = dirs
    stream = (encode_entry(Entry(Kind.FILE, b"f", 0o644, size=10))
              + encode_chunk_header(3) + b"abc"
              + encode_note(Kind.WARNING, {"path": "f", "kind": "io", "message": "EIO"})
              + file_records(b"g", b"ok") + END)
    r = receive(dest, stream)
    assert listing(dest) == ["g"]
    assert r.counts.warnings[0]["path"] == "f"


def test_a_stream_cut_inside_a_file_leaves_no_file_at_its_name(
        dirs: tuple[Path, Path]) -> None:
    dest, _ = dirs
    receiver = Receiver(open_target(os.fsencode(dest), 1))
    decoder = Decoder()
    decoder.feed(encode_entry(Entry(Kind.FILE, b"big", 0o644, size=100))
                 + encode_chunk_header(3) + b"abc")
    while (event := decoder.next_event()) is not None:
        receiver.handle(event)
    with pytest.raises(CopyFailed):
        receiver.finish()
    receiver.abort()
    assert listing(dest) == []


def test_resume_offset_without_resume_is_refused(dirs: tuple[Path, Path]) -> None:
    dest, _ = dirs
    with pytest.raises(CopyFailed) as err:
        receive(dest, file_records(b"f", b"data", size=10, offset=4) + END)
    assert err.value.kind == "protocol"


def test_names_with_spaces_newlines_and_non_utf8_bytes(dirs: tuple[Path, Path]) -> None:
    dest, _ = dirs
    names = [b"a b", b"new\nline", b"\xff\xfe-latin", b"tab\there"]
    receive(dest, b"".join(file_records(n, n) for n in names) + END)
    for n in names:
        assert (Path(os.fsdecode(dest)) / os.fsdecode(n)).read_bytes() == n


def test_a_tree_round_trips_with_modes_times_and_links(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d" / "empty").mkdir(parents=True)
    (src / "d" / "x").write_bytes(os.urandom(3 << 20))
    (src / "ro").write_text("r")
    (src / "ro").chmod(0o444)
    (src / "d").chmod(0o750)
    (src / "link").symlink_to("d/x")
    os.utime(src / "ro", ns=(10**18, 10**18))
    sender = Sender([os.fsencode(src)], recursive=True, checksum=True)
    stream = b"".join(bytes(p) for p in sender.pieces())
    out = tmp_path / "out"
    r = receive(out, stream, preserve=True, checksum=True)  # DST missing: the new name
    assert (r.counts.files, r.counts.dirs, r.counts.links) == (2, 3, 1)
    assert listing(out) == listing(src)
    assert (out / "d" / "x").read_bytes() == (src / "d" / "x").read_bytes()
    assert os.readlink(out / "link") == "d/x"
    assert stat.S_IMODE((out / "d").stat().st_mode) == 0o750
    assert stat.S_IMODE((out / "ro").stat().st_mode) == 0o444
    assert (out / "ro").stat().st_mtime_ns == 10**18


def test_target_rules(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(CopyFailed) as err:
        open_target(os.fsencode(tmp_path / "file"), 2)
    assert err.value.kind == "not-dir"
    with pytest.raises(CopyFailed) as err:
        open_target(os.fsencode(tmp_path / "missing" / "x"), 1)
    assert err.value.kind == "not-found"
    (tmp_path / "d").mkdir()
    with pytest.raises(CopyFailed) as err:
        receive(tmp_path / "d", file_records(b"d2", b"x") + encode_entry(
            Entry(Kind.DIR, b"d2", 0o755)) + END)
    assert err.value.kind == "not-dir"


@pytest.mark.parametrize(("stream", "reason"), [
    (b"Q\0\0\0\0", "unknown record kind"),
    (record_header(Kind.CHUNK, MAX_CHUNK + 1), "too large"),
    (encode_chunk_header(1) + b"x", "outside a file"),
    (encode_file_end(), "outside a file"),
    (END + END, "after the end"),
    (record_header(Kind.END, 2) + b"[]", "not a JSON object"),
    (record_header(Kind.FILE, 3) + b"abc", "too short"),
])
def test_the_decoder_is_strict(stream: bytes, reason: str) -> None:
    def decode_all() -> None:
        decoder = Decoder()
        decoder.feed(stream)
        while decoder.next_event() is not None:
            pass
    with pytest.raises(StreamError, match=reason):
        decode_all()


def test_the_decoder_holds_at_most_one_record() -> None:
    decoder = Decoder()
    decoder.feed(encode_entry(Entry(Kind.FILE, b"f", 0o644)) + encode_chunk_header(MAX_CHUNK))
    decoder.feed(b"\0" * 1000)
    assert isinstance(decoder.next_event(), Entry)
    assert decoder.next_event() is None
    assert decoder.buffered <= MAX_CHUNK + 5


# -- a new top directory is staged ----------------------------------------------------------------

def feed(receiver: Receiver, stream: bytes) -> None:
    decoder = Decoder()
    decoder.feed(stream)
    while (event := decoder.next_event()) is not None:
        receiver.handle(event)


def test_a_new_tree_appears_at_its_name_only_when_complete(dirs: tuple[Path, Path]) -> None:
    dest, _ = dirs
    receiver = Receiver(open_target(os.fsencode(dest), 1))
    feed(receiver, encode_entry(Entry(Kind.DIR, b"t", 0o755))
         + file_records(b"t/a", b"1", mode=0o640)
         + encode_entry(Entry(Kind.DIR, b"t/d", 0o750))
         + encode_entry(Entry(Kind.LINK, b"t/d/l", 0o777, link=b"../a")))
    stage = dest / part_name(b"t").decode()
    assert listing(dest) == sorted([stage.name, f"{stage.name}/a", f"{stage.name}/d",
                                    f"{stage.name}/d/l"])  # nothing at "t" yet
    assert stat.S_IMODE(stage.stat().st_mode) == 0o700  # no one else reaches inside
    feed(receiver, file_records(b"t/d/b", b"2") + END)
    receiver.finish()
    assert listing(dest) == ["t", "t/a", "t/d", "t/d/b", "t/d/l"]
    assert stat.S_IMODE((dest / "t").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "t" / "a").stat().st_mode) == 0o640
    assert os.readlink(dest / "t" / "d" / "l") == "../a"
    assert (dest / "t" / "d" / "b").read_bytes() == b"2"


def test_a_staged_tree_that_fails_leaves_nothing(dirs: tuple[Path, Path]) -> None:
    dest, outside = dirs
    stream = (encode_entry(Entry(Kind.DIR, b"t", 0o755)) + file_records(b"t/a", b"1")
              + encode_entry(Entry(Kind.DIR, b"t/d", 0o500))
              + encode_entry(Entry(Kind.LINK, b"t/d/out", 0o777, link=os.fsencode(outside)))
              + encode_entry(Entry(Kind.FILE, b"t/d/big", 0o644, size=100))
              + encode_chunk_header(3) + b"abc")
    with pytest.raises(CopyFailed):
        receive(dest, stream)  # the stream ends inside a file
    assert listing(dest) == []
    assert listing(outside) == ["victim"]  # the symlink in the tree was removed, not followed


def test_a_tree_over_an_existing_directory_renames_each_file(dirs: tuple[Path, Path]) -> None:
    dest, _ = dirs
    (dest / "t").mkdir()
    (dest / "t" / "keep").write_text("k")
    receive(dest, encode_entry(Entry(Kind.DIR, b"t", 0o755)) + file_records(b"t/a", b"1") + END)
    assert listing(dest) == ["t", "t/a", "t/keep"]


def test_a_staging_name_already_there_is_left_alone(dirs: tuple[Path, Path]) -> None:
    dest, outside = dirs
    (dest / part_name(b"t").decode()).symlink_to(outside)  # planted, or left by a crash
    receive(dest, encode_entry(Entry(Kind.DIR, b"t", 0o755)) + file_records(b"t/a", b"1") + END)
    assert listing(dest) == sorted(["t", "t/a", part_name(b"t").decode()])
    assert listing(outside) == ["victim"]


def test_a_hostile_stream_inside_a_staged_tree(dirs: tuple[Path, Path]) -> None:
    """Names sent twice, a file over a directory, a directory revisited after it took its
    name: the same outcomes as without staging."""
    dest, outside = dirs
    receive(dest, encode_entry(Entry(Kind.DIR, b"t", 0o755))
            + encode_entry(Entry(Kind.LINK, b"t/x", 0o777, link=os.fsencode(outside / "victim")))
            + file_records(b"t/x", b"first") + file_records(b"t/x", b"second")
            + file_records(b"u", b"top") + file_records(b"t/y", b"later") + END)
    assert (dest / "t" / "x").read_bytes() == b"second"
    assert (dest / "t" / "y").read_bytes() == b"later"
    assert listing(dest) == ["t", "t/x", "t/y", "u"]
    assert (outside / "victim").read_text() == "untouched"
    with pytest.raises(CopyFailed) as err:
        receive(dest, encode_entry(Entry(Kind.DIR, b"v", 0o755))
                + encode_entry(Entry(Kind.DIR, b"v/d", 0o755)) + file_records(b"v/d", b"x")
                + END)
    assert err.value.kind == "is-dir"
    assert "v" not in listing(dest) and part_name(b"v").decode() not in listing(dest)
