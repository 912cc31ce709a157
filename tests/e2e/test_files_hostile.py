"""A hostile guest answers a pull (issue 12's threat model applied to `cp`; root, the lab).

Root in a guest can run anything in place of the copy's helper, so each test here replaces
the helper's command line (``vmbusify.files.remote.agent_argv``) with a program run in vm1
that writes a crafted stream (built with the codec's encoders, as the format allows any
bytes in its fields) on its stdout. The stream crosses the real exec path (guest executor,
both muxes, the tunnel, the command listener) and meets the host's real receiver, in this
process. Each checks what the host is left with: nothing outside DST, no symlink followed,
no setuid/setgid bit, owners only for root with -p, nothing at a name that is not whole,
a one-line error; and that vm2 still execs afterwards.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmbusify.config import Config, load_config
from vmbusify.errors import FileCopyError
from vmbusify.files import pull, remote
from vmbusify.files.wire import (
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
from vmbusify.lab.testing import BIN, LabHandle

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
