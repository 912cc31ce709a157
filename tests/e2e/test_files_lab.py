"""`vmbusifyctl cp` in the lab (root): the real CLI on the host, the helper in vm1.

The lab's VMs share the host's file system, so a copy that never crossed the tunnel would
still leave the right bytes at the target: every test that copies data also checks that the
tunnel's byte counters (``vmbusifyctl status --json``) grew by at least the bytes copied.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmbusify.lab.access import command
from vmbusify.lab.testing import BIN, LabHandle, sha256_of, write_big_file

CTL = str(BIN / "vmbusifyctl")
GIB = 1 << 30
NOBODY = 65534


def env() -> dict[str, str]:
    """The lab host's environment (its VMBUSIFY_CONFIG)."""
    return command("host", ["true"])[1]


def cp(*args: str, input: bytes | None = None, timeout: float = 300
       ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([CTL, "cp", *args], input=input, capture_output=True, env=env(),
                          timeout=timeout, check=False,
                          stdin=None if input is not None else subprocess.DEVNULL)


def counters(vm: str = "vm1") -> tuple[int, int]:
    """The host's (bytes_in, bytes_out) for ``vm``'s tunnel."""
    out = subprocess.run([CTL, "status", "--json"], capture_output=True, env=env(),
                         check=True, timeout=30).stdout
    rec = next(v for v in json.loads(out)["vms"] if v["vmid"] == vm)
    return rec["bytes_in"], rec["bytes_out"]


@contextlib.contextmanager
def crossed(inbound: int = 0, outbound: int = 0) -> Iterator[None]:
    """The block moved at least these many bytes through vm1's tunnel (host's view)."""
    in0, out0 = counters()
    yield
    in1, out1 = counters()
    assert in1 - in0 >= inbound, f"only {in1 - in0} bytes came in from vm1"
    assert out1 - out0 >= outbound, f"only {out1 - out0} bytes went out to vm1"


@pytest.fixture
def work(tmp_path: Path) -> Path:
    tmp_path.chmod(0o755)
    return tmp_path


def test_a_1gib_file_in_and_out(lab: LabHandle, work: Path) -> None:
    src = work / "big.bin"
    write_big_file(src, GIB)
    (work / "in").mkdir()
    with crossed(outbound=GIB):
        proc = cp("--json", str(src), f"vm1:{work}/in/")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["ok"] and summary["bytes"] == GIB and summary["files"] == 1
    with crossed(inbound=GIB):
        proc = cp("--checksum", f"vm1:{work}/in/big.bin", str(work / "back.bin"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"" and proc.stderr == b""  # not a terminal: no progress line
    assert sha256_of(work / "in" / "big.bin") == sha256_of(src) == sha256_of(work / "back.bin")
    assert sorted(os.listdir(work / "in")) == ["big.bin"]  # no part file left


NAMES = [b"with space", b"new\nline", b"\xff\xfe-not-utf8", b"tab\tand 'quote'"]


def _handed_over(lab: LabHandle) -> dict[str, int]:
    """How many files the command listener took by descriptor, by op (its log)."""
    log = (lab.layout.host.run_dir / "control.log").read_text(errors="replace")
    return {op: log.count(f": file by descriptor: {op} ") for op in ("read", "write")}


def test_the_fast_path_carries_one_large_file_both_ways(lab: LabHandle, work: Path) -> None:
    """One large file goes by descriptor (docs/files.md, "The fast path"), through the
    tunnel, with --checksum and -p; VMBUSIFY_CP_FAST=0 takes the ordinary stream."""
    src = work / "mid.bin"
    write_big_file(src, 256 << 20)
    os.chmod(src, 0o640)
    os.utime(src, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    before = _handed_over(lab)
    with crossed(outbound=256 << 20):
        proc = cp("--json", "--checksum", "-p", str(src), f"vm1:{work}/in.bin")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["bytes"] == 256 << 20
    with crossed(inbound=256 << 20):
        proc = cp("--json", "--checksum", "-p", f"vm1:{work}/in.bin", str(work / "out.bin"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["bytes"] == 256 << 20
    after = _handed_over(lab)
    assert (after["read"], after["write"]) == (before["read"] + 1, before["write"] + 1)
    for copy in (work / "in.bin", work / "out.bin"):
        assert sha256_of(copy) == sha256_of(src)
        st = copy.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o640, 1_600_000_000_123_456_789)
    assert sorted(os.listdir(work)) == ["in.bin", "mid.bin", "out.bin"]  # no part left
    # the ordinary stream, asked for: nothing by descriptor
    slow = subprocess.run([CTL, "cp", str(src), f"vm1:{work}/slow.bin"], capture_output=True,
                          env={**env(), "VMBUSIFY_CP_FAST": "0"}, timeout=300, check=False)
    assert slow.returncode == 0, slow.stderr
    assert _handed_over(lab) == after
    assert sha256_of(work / "slow.bin") == sha256_of(src)


def test_the_fast_path_push_as_another_user(lab: LabHandle, work: Path) -> None:
    """-u: the guest's helper writes as that user (its file, its permissions), while the
    host's listener reads the client's file (pytest's tmp is root's alone: /tmp instead)."""
    src = work / "u.bin"
    write_big_file(src, 16 << 20)
    open_dir = Path(tempfile.mkdtemp(prefix="vmbcp-"))
    try:
        open_dir.chmod(0o777)
        proc = cp("-u", "nobody", "--checksum", str(src), f"vm1:{open_dir}/")
        assert proc.returncode == 0, proc.stderr
        assert (open_dir / "u.bin").stat().st_uid == NOBODY
        assert sha256_of(open_dir / "u.bin") == sha256_of(src)
        closed = open_dir / "closed"
        closed.mkdir(mode=0o755)
        proc = cp("-u", "nobody", str(src), f"vm1:{closed}/")
        assert proc.returncode == 1 and b"Permission denied" in proc.stderr, proc.stderr
        assert os.listdir(closed) == []
    finally:
        shutil.rmtree(open_dir)


def make_tree(root: Path) -> int:
    """A tree with modes, owners, symlinks, empty directories and awkward names; its bytes."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "sub" / "empty2").mkdir()
    total = 0
    for i, name in enumerate(NAMES):
        p = Path(os.fsdecode(os.fsencode(root / "sub") + b"/" + name))
        data = os.urandom(1000 * (i + 1))
        p.write_bytes(data)
        total += len(data)
    (root / "sub" / "deeper" / "exe").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "sub" / "deeper" / "exe").chmod(0o750)
    (root / "private").write_bytes(b"secret")
    (root / "private").chmod(0o600)
    os.chown(root / "private", NOBODY, NOBODY)
    os.chown(root / "sub" / "deeper", 1234, 1234)
    (root / "sub" / "deeper").chmod(0o2775)
    (root / "link").symlink_to("sub/deeper/exe")
    (root / "dangling").symlink_to("/nonexistent/target")
    os.utime(root / "private", ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    return total + len(b"#!/bin/sh\necho hi\n") + 6


def stats(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """path -> (mode, uid, gid, mtime_ns) of everything below root (links: not followed);
    directories' mtimes left out (the copy itself sets them last, but the tree is walked)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            mtime = 0 if os.path.isdir(p) and not os.path.islink(p) else st.st_mtime_ns
            out[os.fsdecode(os.path.relpath(p, os.fsencode(root)))] = (
                st.st_mode, st.st_uid, st.st_gid, mtime)
    return out


def test_a_tree_with_modes_owners_links_and_awkward_names(lab: LabHandle, work: Path) -> None:
    src = work / "tree"
    total = make_tree(src)
    with crossed(outbound=total):
        proc = cp("-r", "-p", str(src), f"vm1:{work}/pushed")
    assert proc.returncode == 0, proc.stderr
    with crossed(inbound=total):
        proc = cp("-r", "-p", f"vm1:{work}/pushed", str(work / "pulled"))
    assert proc.returncode == 0, proc.stderr
    for copy in ("pushed", "pulled"):
        diff = subprocess.run(["diff", "-r", "--no-dereference", str(src), str(work / copy)],
                              capture_output=True, check=False)
        assert diff.returncode == 0, diff.stdout
        want = stats(src)
        if copy == "pulled":  # a pull drops setuid/setgid (the guest is not trusted)
            want = {k: (v[0] & ~0o6000, *v[1:]) for k, v in want.items()}
        assert stats(work / copy) == want
    # Without -p the modes are the sources' less the umask, the owners the copier's.
    proc = cp("-r", f"vm1:{work}/pushed", str(work / "plain"))
    assert proc.returncode == 0, proc.stderr
    st = os.lstat(work / "plain" / "private")
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)


def test_stdin_and_stdout(lab: LabHandle, work: Path) -> None:
    data = os.urandom(3 << 20)
    with crossed(outbound=len(data)):
        proc = cp("-", f"vm1:{work}/from-stdin", input=data)
    assert proc.returncode == 0, proc.stderr
    assert (work / "from-stdin").read_bytes() == data
    with crossed(inbound=len(data)):
        proc = cp(f"vm1:{work}/from-stdin", "-")
    assert proc.returncode == 0 and proc.stdout == data


@pytest.mark.parametrize(("args", "message"), [
    (["{work}/f", "vm9:/tmp/"], "no such VM: vm9"),
    (["{work}/missing", "vm1:{work}/"], "cannot read {work}/missing: No such file"),
    (["vm1:{work}/missing", "{work}/out"], "cannot read {work}/missing: No such file"),
    (["{work}/d", "vm1:{work}/x"], "is a directory (copy it with -r)"),
    (["{work}/f", "{work}/f", "vm1:{work}/f"], "is not a directory"),
    (["-r", "{work}/d", "vm1:{work}/f"], "the directory f: a file or symlink"),
    (["{work}/f", "vm1:{work}/nodir/sub/"], "no such directory"),
])
def test_clear_errors(lab: LabHandle, work: Path, args: list[str], message: str) -> None:
    (work / "f").write_text("x")
    (work / "d").mkdir()
    before = sorted(os.listdir(work))
    proc = cp(*[a.format(work=work) for a in args])
    assert proc.returncode == 1
    assert proc.stderr.decode().startswith("vmbusifyctl: ")
    assert message.format(work=work) in proc.stderr.decode()
    assert sorted(os.listdir(work)) == before  # nothing partial


def test_what_is_not_copied_is_listed_once_each(lab: LabHandle, work: Path) -> None:
    (work / "d").mkdir()
    (work / "d" / "f").write_text("x")
    os.mkfifo(work / "d" / "pipe")
    proc = cp("-r", f"{work}/d", f"vm1:{work}/out")
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err == f"vmbusifyctl: not copied: {work}/d/pipe is a FIFO\n"
    assert (work / "out" / "f").read_text() == "x"
    assert not (work / "out" / "pipe").exists()


@pytest.mark.parametrize("raw", ["1", "0"])
def test_a_fifo_named_for_a_pull_is_not_copied_and_does_not_hang(
        lab: LabHandle, work: Path, raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    os.mkfifo(work / "pipe")
    monkeypatch.setenv("VMBUSIFY_CP_FAST", raw)
    proc = cp(f"vm1:{work}/pipe", f"{work}/out", timeout=30)
    assert proc.returncode == 1
    assert f"not copied: {work}/pipe is a FIFO" in proc.stderr.decode()
    assert not (work / "out").exists()


def test_permission_denied_as_another_user(lab: LabHandle, work: Path) -> None:
    (work / "f").write_text("x")
    root_only = work / "root-only"
    root_only.mkdir(mode=0o700)
    (root_only / "secret").write_text("s")
    proc = cp("-u", "nobody", str(work / "f"), f"vm1:{root_only}/")
    assert proc.returncode == 1 and b"Permission denied" in proc.stderr, proc.stderr
    proc = cp("-u", "nobody", f"vm1:{root_only}/secret", str(work / "got"))
    assert proc.returncode == 1 and b"Permission denied" in proc.stderr, proc.stderr
    assert sorted(os.listdir(root_only)) == ["secret"] and not (work / "got").exists()
    # As that user, new files are that user's (pytest's tmp is root's alone: /tmp instead).
    open_dir = Path(tempfile.mkdtemp(prefix="vmbcp-"))
    try:
        open_dir.chmod(0o777)
        src = open_dir / "src"
        src.write_text("x")
        src.chmod(0o644)
        proc = cp("-u", "nobody", str(src), f"vm1:{open_dir}/copied")
        assert proc.returncode == 0, proc.stderr
        assert (open_dir / "copied").stat().st_uid == NOBODY
    finally:
        shutil.rmtree(open_dir)


def test_disk_full_in_the_guest(lab: LabHandle, work: Path) -> None:
    # The guest's programs have a mount namespace of their own (ip netns exec): the small
    # tmpfs is mounted there, where the helper writes.
    pid = lab.program_pid("vm1", "exec")
    assert pid
    in_guest = ["nsenter", "-t", str(pid), "-m"]
    small = work / "small"
    small.mkdir()
    subprocess.run([*in_guest, "mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)],
                   check=True)
    try:
        write_big_file(work / "32m", 32 << 20)
        proc = cp(str(work / "32m"), f"vm1:{small}/")
        assert proc.returncode == 1
        assert b"no space left" in proc.stderr, proc.stderr
        left = subprocess.run([*in_guest, "ls", "-A", str(small)], capture_output=True,
                              check=True).stdout
        assert left == b""  # the part file is gone too
    finally:
        subprocess.run([*in_guest, "umount", str(small)], check=False)


def _part(directory: Path, name: str) -> Path:
    return directory / f".{name}.vmbcp-part"


def _kill_when_part_grows(args: list[str], part: Path, at: int) -> None:
    proc = subprocess.Popen([CTL, "cp", *args], env=env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(FileNotFoundError):
            if part.stat().st_size >= at:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the copy ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def _big_copy(work: Path, direction: str) -> tuple[Path, Path, list[str]]:
    """A GiB file ``big.bin``, an empty directory ``out``, and cp's arguments that copy the
    file into it through vm1 (in for a push, out for a pull)."""
    src = work / "big.bin"
    write_big_file(src, GIB)
    out = work / "out"
    out.mkdir()
    args = [str(src), f"vm1:{out}/"] if direction == "push" else [f"vm1:{src}", str(out)]
    return src, out, args


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_resume_after_kill_9_of_the_client(lab: LabHandle, work: Path, direction: str) -> None:
    src, out, args = _big_copy(work, direction)
    _kill_when_part_grows(args, _part(out, "big.bin"), 200 << 20)
    time.sleep(1)  # the helper is killed with the exec
    assert not (out / "big.bin").exists()  # nothing half-written at the name
    done = _part(out, "big.bin").stat().st_size
    assert done >= 200 << 20
    with crossed(**{"outbound" if direction == "push" else "inbound": GIB - done}):
        proc = cp("--resume", "--json", "--checksum", *args)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["resumed_from"] >= 200 << 20
    assert summary["bytes"] == GIB - summary["resumed_from"]
    assert sha256_of(out / "big.bin") == sha256_of(src)
    assert sorted(os.listdir(out)) == ["big.bin"]


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_resume_after_a_tunnel_drop(lab: LabHandle, work: Path, direction: str) -> None:
    src, out, args = _big_copy(work, direction)
    proc = subprocess.Popen([CTL, "cp", *args], env=env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    part = _part(out, "big.bin")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (part.exists() and part.stat().st_size > 100 << 20):
        time.sleep(0.02)
    lab.ctl("disconnect", "vm1")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err.startswith(b"vmbusifyctl: "), err
    time.sleep(1)  # a push's helper is killed with the tunnel
    assert not (out / "big.bin").exists() and part.exists()
    lab.ctl("connect", "vm1")
    proc2 = cp("--resume", "--json", *args)
    assert proc2.returncode == 0, proc2.stderr
    assert json.loads(proc2.stdout)["resumed_from"] > 0
    assert sha256_of(out / "big.bin") == sha256_of(src)


def test_a_resume_whose_part_differs_starts_over(lab: LabHandle, work: Path) -> None:
    src = work / "f.bin"
    src.write_bytes(os.urandom(5 << 20))
    out = work / "out"
    out.mkdir()
    _part(out, "f.bin").write_bytes(b"not the same prefix" * 1000)
    proc = cp("--resume", "--json", str(src), f"vm1:{out}/")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["resumed_from"] == 0
    assert (out / "f.bin").read_bytes() == src.read_bytes()
    shutil.rmtree(out)


def test_a_progress_line_on_a_terminal_only(lab: LabHandle, work: Path) -> None:
    src = work / "p.bin"
    write_big_file(src, 256 << 20)
    cmd = f"{CTL} cp {src} vm1:{work}/on-tty.bin"
    proc = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True,
                          env=env(), timeout=120, check=False, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout
    assert b"\rp.bin  " in proc.stdout and b"MiB/s" in proc.stdout and b"ETA" in proc.stdout
    quiet = subprocess.run(["script", "-qec", cmd + " --quiet", "/dev/null"],
                           capture_output=True, env=env(), timeout=120, check=False,
                           stdin=subprocess.DEVNULL)
    assert quiet.returncode == 0 and b"MiB/s" not in quiet.stdout


def _sync_order(log: Path, name: str) -> tuple[int, int, int]:
    """Where ``log`` (strace -y of one copy) shows the part of ``name`` fsynced, renamed to
    ``name``, and its directory fsynced (-1: not seen)."""
    calls = [c for c in log.read_text().splitlines()
             if c.startswith(("fsync(", "rename")) and "= 0" in c]
    part = f".{name}.vmbcp-part"
    directory = str(log.parent / "out")  # DST of both copies

    def first(test: Callable[[str], bool]) -> int:
        return next((i for i, c in enumerate(calls) if test(c)), -1)

    return (first(lambda c: c.startswith("fsync(") and part in c),
            first(lambda c: c.startswith("rename") and f'"{name}"' in c),
            first(lambda c: c.startswith("fsync(") and c.partition("<")[2].startswith(
                directory + ">")))


def _synced(log: Path, name: str) -> None:
    """The part of ``name`` was fsynced, then renamed, then its directory fsynced (strace
    writes its log as it goes: give it a few seconds on a loaded machine)."""
    deadline = time.monotonic() + 10
    while True:
        at_file, at_rename, at_dir = _sync_order(log, name)
        if 0 <= at_file < at_rename < at_dir or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert 0 <= at_file < at_rename < at_dir, log.read_text()[-3000:]


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_fsync_at_both_ends(lab: LabHandle, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--fsync: the guest's helper (a push) and the host's CLI (a pull) fsync each file
    before its rename and the directory after (seen with strace on the real processes)."""
    from vmbusify.config import load_config
    from vmbusify.files import push, remote
    from vmbusify.lab.layout import LabLayout

    (work / "f").write_bytes(os.urandom(3 << 20))
    (work / "out").mkdir()
    trace = ["strace", "-y", "-qq", "-e", "trace=fsync,rename,renameat,renameat2"]
    real_argv = remote.agent_argv
    monkeypatch.setattr(remote, "agent_argv", lambda request: [
        *trace, "-o", str(work / "push.log"), *real_argv(request)])
    config = load_config(str(LabLayout().host.config_path))
    with crossed(outbound=3 << 20):
        push("vm1", [str(work / "f")], f"{work}/out/", config=config, fsync=True)
    _synced(work / "push.log", "f")
    assert (work / "out" / "f").read_bytes() == (work / "f").read_bytes()
    (work / "out" / "f").rename(work / "g")
    with crossed(inbound=3 << 20):
        proc = subprocess.run([*trace, "-o", str(work / "pull.log"), CTL, "cp", "--fsync",
                               f"vm1:{work}/g", f"{work}/out/"], capture_output=True,
                              env=env(), timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    _synced(work / "pull.log", "g")
    assert (work / "out" / "g").read_bytes() == (work / "f").read_bytes()
