"""A hostile guest answers a pull (issue 12's threat model applied to `cp`; root, the lab).

Root in a guest can run anything in place of the copy's helper, so each test here replaces
the helper's command line (``vmbusify.files.remote.agent_argv``) with a program run in vm1
that writes a crafted stream (built with the codec's encoders, as the format allows any
bytes in its fields) on its stdout. The stream crosses the real exec path (guest executor,
both muxes, the tunnel, the command listener) and meets the host's real receiver, in this
process. Each checks what the host is left with: nothing outside DST, no symlink followed,
no setuid/setgid bit, owners only for root with -p, nothing at a name that is not whole,
a one-line error; and that vm2 still execs afterwards.

The crafted streams of the ordinary format run with the fast path off (``VMBUSIFY_CP_FAST=0``:
the client then asks for no raw mode, as for a tree); the fast path's own (raw mode, the
listener writing into the part file by descriptor) has its tests at the end.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmbusify.config import Config, load_config
from vmbusify.errors import FileCopyError
from vmbusify.files import pull, remote
from vmbusify.files.wire import (
    MAX_DEPTH,
    UNKNOWN_SIZE,
    Entry,
    Kind,
    encode_chunk_header,
    encode_entry,
    encode_file_end,
    encode_note,
    record_header,
)
from vmbusify.lab.access import command
from vmbusify.lab.layout import LabLayout
from vmbusify.lab.testing import BIN, LabHandle, write_big_file

END = encode_note(Kind.END, {"files": 1})
#: Writes argv[1] (hex) on stdout: the hostile "helper".
EMIT = "import os, sys; os.write(1, bytes.fromhex(sys.argv[1]))"


def file_records(name: bytes, data: bytes, mode: int = 0o644, uid: int = 0) -> bytes:
    return (encode_entry(Entry(Kind.FILE, name, mode, uid, uid, size=len(data)))
            + encode_chunk_header(len(data)) + data
            + encode_file_end(hashlib.sha256(data).digest()))


@pytest.fixture
def config(lab: LabHandle) -> Config:
    return load_config(str(LabLayout().host.config_path))


@pytest.fixture
def places(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (outside / "victim").write_text("untouched")
    yield dest, outside
    assert (outside / "victim").read_text() == "untouched"
    assert sorted(os.listdir(outside)) == ["victim"]
    vm2 = subprocess.run([str(BIN / "vmbusifyexec"), "vm2", "--", "echo", "still-here"],
                         capture_output=True, env=command("host", ["true"])[1], timeout=30,
                         check=False)
    assert vm2.stdout == b"still-here\n"


def hostile_pull(monkeypatch: pytest.MonkeyPatch, config: Config, stream: bytes, dest: Path,
                 **kw: Any) -> None:
    monkeypatch.setattr(remote, "agent_argv",
                        lambda _request: ["python3", "-c", EMIT, stream.hex()])
    monkeypatch.setenv("VMBUSIFY_CP_FAST", "0")
    pull("vm1", ["/anything"], str(dest), config=config, **kw)


def test_absolute_names_and_dotdot_are_refused(monkeypatch: pytest.MonkeyPatch,
                                               config: Config,
                                               places: tuple[Path, Path]) -> None:
    dest, outside = places
    for name in (os.fsencode(outside / "victim"), b"x/../../outside/victim", b".."):
        with pytest.raises(FileCopyError) as err:
            hostile_pull(monkeypatch, config, file_records(name, b"pwned") + END, dest)
        assert err.value.kind == "unsafe"
        assert "unsafe name" in str(err.value)
    assert os.listdir(dest) == []


def test_a_guest_symlink_is_never_followed(monkeypatch: pytest.MonkeyPatch, config: Config,
                                           places: tuple[Path, Path]) -> None:
    dest, outside = places
    stream = (encode_entry(Entry(Kind.LINK, b"a", 0o777, link=os.fsencode(outside)))
              + file_records(b"a/victim", b"pwned") + END)
    with pytest.raises(FileCopyError) as err:
        hostile_pull(monkeypatch, config, stream, dest)
    assert err.value.kind == "unsafe"
    # The link itself is data, made in DST; nothing went through it.
    assert os.readlink(dest / "a") == str(outside)


def test_setuid_dropped_and_owners_only_for_root_with_p(monkeypatch: pytest.MonkeyPatch,
                                                        config: Config,
                                                        places: tuple[Path, Path]) -> None:
    dest, _ = places
    stream = file_records(b"tool", b"#!/bin/sh\n", mode=0o6755, uid=4242) + END
    hostile_pull(monkeypatch, config, stream, dest)
    st = (dest / "tool").stat()
    assert stat.S_IMODE(st.st_mode) & 0o6000 == 0
    assert st.st_uid == os.geteuid()  # no -p: the copier's
    hostile_pull(monkeypatch, config, stream, dest, preserve=True)
    st = (dest / "tool").stat()
    assert stat.S_IMODE(st.st_mode) == 0o755  # -p: still no setuid/setgid
    assert st.st_uid == 4242  # root asked for -p: the owner as sent


@pytest.mark.parametrize(("stream", "reason"), [
    (b"B\0\0\0\x10" + b"\0" * 16, "unknown record kind"),  # a "device node"
    (record_header(Kind.CHUNK, 0xFFFFFFFF), "too large"),  # 4 GiB claimed: refused at once
    (encode_entry(Entry(Kind.FILE, b"f", 0o644, size=10)) + encode_entry(
        Entry(Kind.FILE, b"g", 0o644)), "an entry inside a file"),
    (b"\0" * 64, "unknown record kind"),
    (encode_entry(Entry(Kind.FILE, b"f", 0o644, size=10)) + encode_chunk_header(11)
     + b"x" * 11 + encode_file_end() + END, "f: the sender sent more than the 10 bytes"),
    (encode_entry(Entry(Kind.FILE, b"f", 0o644, size=10)) + encode_chunk_header(3) + b"abc"
     + encode_file_end() + END, "f: the file ended after 3 of the 10 bytes"),
    (encode_entry(Entry(Kind.FILE, b"f", 0o644, size=UNKNOWN_SIZE)) + encode_chunk_header(3)
     + b"abc" + encode_file_end() + END, "announced no size"),
    (record_header(Kind.WARNING, 50000) + b"[" * 50000, "not JSON"),  # RecursionError
])
def test_malformed_streams_fail_cleanly(monkeypatch: pytest.MonkeyPatch, config: Config,
                                        places: tuple[Path, Path], stream: bytes,
                                        reason: str) -> None:
    dest, _ = places
    with pytest.raises(FileCopyError) as err:
        hostile_pull(monkeypatch, config, stream, dest)
    assert err.value.kind == "protocol" and reason in str(err.value)
    assert os.listdir(dest) == []


def test_a_stream_cut_inside_a_file_leaves_nothing_at_its_name(
        monkeypatch: pytest.MonkeyPatch, config: Config, places: tuple[Path, Path]) -> None:
    dest, _ = places
    stream = encode_entry(Entry(Kind.FILE, b"f", 0o644, size=100)) + encode_chunk_header(
        3) + b"abc"
    with pytest.raises(FileCopyError):
        hostile_pull(monkeypatch, config, stream, dest)
    assert os.listdir(dest) == []


def test_control_characters_in_guest_text_reach_no_terminal(lab: LabHandle,
                                                            places: tuple[Path, Path]) -> None:
    """The real CLI, with a helper whose failure message and name carry escape sequences."""
    dest, _ = places
    stream = encode_note(Kind.FAILURE, {"kind": "io", "message": "\x1b]0;owned\x07\x1b[2J"})
    script = (f"import vmbusify.files.remote as r; from vmbusify.cli.ctl import main; "
              f"r.agent_argv = lambda _r: ['python3', '-c', {EMIT!r}, {stream.hex()!r}]; "
              f"main(['cp', 'vm1:/x', {str(dest)!r}])")
    proc = subprocess.run([str(BIN / "python"), "-c", script], capture_output=True,
                          env=command("host", ["true"])[1], timeout=60, check=False)
    assert proc.returncode == 1
    assert b"\x1b" not in proc.stderr and b"\x07" not in proc.stderr
    assert b"\\x1b]0;owned" in proc.stderr


#: Writes argv[1] (hex) on stdout, then argv[2] (hex) again and again, until killed.
EMIT_FOREVER = ("import os, sys  # cp-endless-helper\n"
                "os.write(1, bytes.fromhex(sys.argv[1]))\n"
                "chunk = bytes.fromhex(sys.argv[2])\n"
                "while True: os.write(1, chunk)")


def test_an_endless_file_stops_at_its_announced_size(monkeypatch: pytest.MonkeyPatch,
                                                     config: Config,
                                                     places: tuple[Path, Path]) -> None:
    """The guest announces 10 bytes and sends data until stopped: the host refuses the
    first chunk past 10 bytes, removes the part, and the helper is ended."""
    dest, _ = places
    head = encode_entry(Entry(Kind.FILE, b"endless", 0o644, size=10))
    chunk = encode_chunk_header(16 << 10) + b"x" * (16 << 10)
    monkeypatch.setattr(remote, "agent_argv", lambda _request: [
        "python3", "-c", EMIT_FOREVER, head.hex(), chunk.hex()])
    monkeypatch.setenv("VMBUSIFY_CP_FAST", "0")  # the ordinary stream's C records
    with pytest.raises(FileCopyError) as err:
        pull("vm1", ["/anything"], str(dest), config=config)
    assert err.value.kind == "protocol"
    assert str(err.value) == "endless: the sender sent more than the 10 bytes it announced"
    assert os.listdir(dest) == []
    deadline = time.monotonic() + 20
    while _endless_helpers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _endless_helpers(), "the guest's helper still runs after the copy failed"


def _endless_helpers() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "cp-endless-helper"], capture_output=True,
                           check=False).stdout
    return [int(p) for p in found.split()]


def test_a_size_beyond_the_free_space_writes_nothing(monkeypatch: pytest.MonkeyPatch,
                                                     config: Config,
                                                     places: tuple[Path, Path]) -> None:
    dest, _ = places
    stream = encode_entry(Entry(Kind.FILE, b"huge", 0o644, size=1 << 62)) + \
        encode_chunk_header(3) + b"abc"
    with pytest.raises(FileCopyError) as err:
        hostile_pull(monkeypatch, config, stream, dest)
    assert err.value.kind == "no-space"
    assert "cannot write huge: no space left on the target's file system" in str(err.value)
    assert os.listdir(dest) == []


@pytest.mark.parametrize(("stream", "reason"), [
    (encode_entry(Entry(Kind.LINK, b"l", 0o777, link=b"/etc\0/passwd")) + END,
     "a NUL byte in its target"),
    (file_records(b"/".join([b"d"] * (MAX_DEPTH + 1)), b"x") + END,
     f"deeper than {MAX_DEPTH} directories"),
])
def test_bad_names_and_link_targets_are_refused(monkeypatch: pytest.MonkeyPatch,
                                                config: Config, places: tuple[Path, Path],
                                                stream: bytes, reason: str) -> None:
    dest, _ = places
    with pytest.raises(FileCopyError) as err:
        hostile_pull(monkeypatch, config, stream, dest)
    assert err.value.kind == "unsafe" and reason in str(err.value)
    assert os.listdir(dest) == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs on the host, as a pull's DST."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    yield small
    subprocess.run(["umount", str(small)], check=False)


def test_a_full_host_disk_is_a_clear_error_and_leaves_no_part(config: Config,
                                                              small_disk: Path,
                                                              tmp_path: Path) -> None:
    """Real bytes the operator asked for, more than DST holds: a file larger than the free
    space (refused before writing), and a tree whose third file no longer fits (new: nothing
    left; into an existing directory: the whole files that fitted)."""
    tmp_path.chmod(0o755)
    write_big_file(tmp_path / "4m", 4 << 20)
    with pytest.raises(FileCopyError) as err:
        pull("vm1", [str(tmp_path / "4m")], str(small_disk), config=config)
    assert err.value.kind == "no-space"
    assert "cannot write 4m: no space left on the target's file system" in str(err.value)
    assert os.listdir(small_disk) == []
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("a", "b", "c"):
        (tree / name).write_bytes(os.urandom(900 << 10))
    with pytest.raises(FileCopyError) as err:
        pull("vm1", [str(tree)], str(small_disk), config=config, recursive=True)
    assert err.value.kind == "no-space"
    assert "cannot write tree/c: no space left" in str(err.value)
    # A new tree appears whole or not at all: its staging directory is gone with a and b.
    assert os.listdir(small_disk) == []
    (small_disk / "tree").mkdir()  # into a directory that is there: each whole file stays
    with pytest.raises(FileCopyError) as err:
        pull("vm1", [str(tree)], str(small_disk), config=config, recursive=True)
    assert err.value.kind == "no-space"
    assert sorted(os.listdir(small_disk / "tree")) == ["a", "b"]  # whole, no part file
    assert (small_disk / "tree" / "b").read_bytes() == (tree / "b").read_bytes()


def test_stdout_gets_no_more_than_announced(monkeypatch: pytest.MonkeyPatch, config: Config,
                                            places: tuple[Path, Path]) -> None:
    """`cp VM:FILE -`: the same size contract when the data goes to stdout."""
    dest, _ = places
    head = encode_entry(Entry(Kind.FILE, b"endless", 0o644, size=10))
    chunk = encode_chunk_header(16 << 10) + b"x" * (16 << 10)
    monkeypatch.setattr(remote, "agent_argv", lambda _request: [
        "python3", "-c", EMIT_FOREVER, head.hex(), chunk.hex()])
    with (dest / "out").open("wb") as out, pytest.raises(FileCopyError) as err:
        pull("vm1", ["/anything"], "-", config=config, stdout=out)
    assert err.value.kind == "protocol" and "more than the 10 bytes" in str(err.value)
    assert (dest / "out").stat().st_size == 0


# --- the fast path: raw mode, the data written by the listener into the part file ----------

#: A raw-mode "helper": argv[1] (hex), then waits for the host's go, then argv[2] MiB of b"x"
#: (unasked: written at once, with argv[4] "early"), then argv[3] (hex).
EMIT_RAW = """\
import os, sys
os.write(1, bytes.fromhex(sys.argv[1]))
if sys.argv[4] != "early":
    os.read(0, 1)
for _ in range(int(sys.argv[2])):
    os.write(1, b"x" * (1 << 20))
os.write(1, bytes.fromhex(sys.argv[3]))
"""


def raw_pull(monkeypatch: pytest.MonkeyPatch, config: Config, entry: Entry, mib: int,
             tail: bytes, dest: Path, early: bool = False) -> None:
    argv = ["python3", "-c", EMIT_RAW, encode_entry(entry).hex(), str(mib), tail.hex(),
            "early" if early else "after-go"]
    monkeypatch.setattr(remote, "agent_argv", lambda _request: argv)
    pull("vm1", ["/anything"], str(dest), config=config)


def test_fast_path_a_well_behaved_raw_stream_lands(monkeypatch: pytest.MonkeyPatch,
                                                   config: Config,
                                                   places: tuple[Path, Path]) -> None:
    """The fake helper's raw stream is right: the file lands (the harness works)."""
    dest, _ = places
    entry = Entry(Kind.FILE, b"f", 0o644, size=8 << 20)
    raw_pull(monkeypatch, config, entry, 8, encode_file_end(b"") + END, dest)
    assert (dest / "f").read_bytes() == b"x" * (8 << 20)


def test_fast_path_never_more_than_announced(monkeypatch: pytest.MonkeyPatch, config: Config,
                                             places: tuple[Path, Path]) -> None:
    """The guest announces 8 MiB and sends 16: the part file never holds more than 8, the
    rest is read as records (not a Z) and the copy fails; nothing is left."""
    dest, _ = places
    entry = Entry(Kind.FILE, b"f", 0o644, size=8 << 20)
    with pytest.raises(FileCopyError) as err:
        raw_pull(monkeypatch, config, entry, 16, encode_file_end(b"") + END, dest)
    assert err.value.kind == "protocol"
    assert os.listdir(dest) == []


def test_fast_path_data_before_the_go_stays_bounded(monkeypatch: pytest.MonkeyPatch,
                                                    config: Config,
                                                    places: tuple[Path, Path]) -> None:
    """Data sent before the host's go: what reached the client is refused ("file data came
    before it was asked for", or "outside the file's descriptor"); what was still on its way
    when the listener took the file goes into the part file, as the announced data would
    have (a race the guest may win): either way never more than announced, and nothing but
    a whole file at the name."""
    dest, _ = places
    entry = Entry(Kind.FILE, b"f", 0o644, size=8 << 20)
    for _ in range(3):
        failure: FileCopyError | None = None
        try:
            raw_pull(monkeypatch, config, entry, 8, encode_file_end(b"") + END, dest,
                     early=True)
        except FileCopyError as exc:
            failure = exc
        if failure is not None:
            assert failure.kind == "protocol" and "file data came" in str(failure)
            assert os.listdir(dest) == []
        else:
            assert (dest / "f").read_bytes() == b"x" * (8 << 20)
            assert os.listdir(dest) == ["f"]
            (dest / "f").unlink()


def test_fast_path_a_short_raw_file_leaves_nothing(monkeypatch: pytest.MonkeyPatch,
                                                   config: Config,
                                                   places: tuple[Path, Path]) -> None:
    """64 MiB announced, 5 sent, then the helper exits: an error, no file, no part."""
    dest, _ = places
    entry = Entry(Kind.FILE, b"f", 0o644, size=64 << 20)
    with pytest.raises(FileCopyError):
        raw_pull(monkeypatch, config, entry, 5, b"", dest)
    assert os.listdir(dest) == []


def test_fast_path_an_unsafe_name_is_refused_before_any_data(
        monkeypatch: pytest.MonkeyPatch, config: Config, places: tuple[Path, Path]) -> None:
    dest, outside = places
    entry = Entry(Kind.FILE, os.fsencode(outside / "victim"), 0o644, size=8 << 20)
    with pytest.raises(FileCopyError) as err:
        raw_pull(monkeypatch, config, entry, 8, encode_file_end(b"") + END, dest)
    assert err.value.kind == "unsafe"
    assert os.listdir(dest) == []
