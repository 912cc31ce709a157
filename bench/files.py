#!/usr/bin/env python3
"""`vmbusifyctl cp` benchmark, side by side with scp to a local sshd, in one run.

    .venv/bin/python bench/files.py [--mib 1024] [--files 10000]

Needs the lab up (root; bench/run brings it up) and uses its vm1; the anchors use a throwaway
local sshd (bench/exec.py's LocalSshd: its own keys and config on a free loopback port) and
``scp -O`` (the classic scp protocol: that sshd has no sftp subsystem). The lab's VMs share the
host's file system, so both tools copy between two directories of the same machine.

1. One file of MIB MiB (random bytes) in (push) and out (pull): seconds and MB/s of each tool,
   ratio scp time / vmbusify time (goal >= 1.5), sha256 of every copy checked.
2. A tree of FILES small files (1-4 KiB, 100 directories) in and out: ratio scp -r time /
   vmbusify time (goal >= 5), every copy checked with ``diff -r``.
3. Fairness: a push of MIB/2 MiB beside an exec streaming /dev/zero out of vm1 (started
   first, in a session of its own), each one's MB/s beside its MB/s alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.exec import LocalSshd
from vmbusify.lab.access import command
from vmbusify.lab.testing import sha256_of, write_big_file

BIN = Path(sys.executable).parent
CTL = str(BIN / "vmbusifyctl")
EXEC = str(BIN / "vmbusifyexec")


def env() -> dict[str, str]:
    return command("host", ["true"])[1]


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env=env(), stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def make_tree(root: Path, files: int) -> None:
    for i in range(files):
        d = root / f"d{i % 100:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}").write_bytes(os.urandom(1024 + (i * 37) % 3072))


class Scp:
    """scp to and from the throwaway sshd."""

    def __init__(self, sshd: LocalSshd) -> None:
        self.sshd = sshd
        self.base = ["scp", "-O", "-q", "-F", "/dev/null", "-P", str(sshd.port), "-i",
                     str(sshd.key), "-o", "StrictHostKeyChecking=no", "-o",
                     "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o",
                     "LogLevel=ERROR"]

    def remote(self, path: Path) -> str:
        return f"{self.sshd.user}@127.0.0.1:{path}"

    def push(self, src: Path, dst: Path, recursive: bool = False) -> float:
        return timed([*self.base, *(["-r"] if recursive else []), str(src), self.remote(dst)])

    def pull(self, src: Path, dst: Path, recursive: bool = False) -> float:
        return timed([*self.base, *(["-r"] if recursive else []), self.remote(src), str(dst)])


def ours_push(src: Path, dst: Path, recursive: bool = False) -> float:
    return timed([CTL, "cp", "-q", *(["-r"] if recursive else []), str(src), f"vm1:{dst}"])


def ours_pull(src: Path, dst: Path, recursive: bool = False) -> float:
    return timed([CTL, "cp", "-q", *(["-r"] if recursive else []), f"vm1:{src}", str(dst)])


def check_same(a: Path, b: Path) -> None:
    if a.is_dir():
        subprocess.run(["diff", "-r", "-q", str(a), str(b)], check=True)
    elif sha256_of(a) != sha256_of(b):
        raise SystemExit(f"{b}: sha256 differs from {a}")


def one_file(work: Path, scp: Scp, mib: int) -> None:
    src = work / "big.bin"
    write_big_file(src, mib << 20)
    mb = mib * (1 << 20) / 1e6
    for way in ("push", "pull"):
        times = {}
        for tool in ("vmbusify", "scp"):
            dst = work / f"{way}-{tool}.bin"
            if tool == "vmbusify":
                times[tool] = (ours_push if way == "push" else ours_pull)(src, dst)
            else:
                times[tool] = (scp.push if way == "push" else scp.pull)(src, dst)
            check_same(src, dst)
            dst.unlink()
        print(f"  {mib} MiB {way}: vmbusify {times['vmbusify']:.2f} s "
              f"({mb / times['vmbusify']:.0f} MB/s), scp {times['scp']:.2f} s "
              f"({mb / times['scp']:.0f} MB/s), ratio {times['scp'] / times['vmbusify']:.2f} "
              "(goal >= 1.5), sha256 equal", flush=True)
    src.unlink()


def small_files(work: Path, scp: Scp, files: int) -> None:
    src = work / "tree"
    make_tree(src, files)
    for way in ("push", "pull"):
        times = {}
        for tool in ("vmbusify", "scp"):
            dst = work / f"tree-{way}-{tool}"
            if tool == "vmbusify":
                times[tool] = (ours_push if way == "push" else ours_pull)(src, dst, True)
            else:
                times[tool] = (scp.push if way == "push" else scp.pull)(src, dst, True)
            check_same(src, dst)
            shutil.rmtree(dst)
        print(f"  {files} files {way}: vmbusify {times['vmbusify']:.2f} s, scp -r "
              f"{times['scp']:.2f} s, ratio {times['scp'] / times['vmbusify']:.2f} "
              "(goal >= 5), diff -r equal", flush=True)
    shutil.rmtree(src)


def _stream(seconds: float, out: list[float], procs: list[subprocess.Popen[bytes]]) -> None:
    """An exec streaming /dev/zero out of vm1 for ``seconds``, in a session of its own; its
    MB/s goes to ``out``."""
    proc = subprocess.Popen([EXEC, "vm1", "--", "timeout", str(seconds), "cat", "/dev/zero"],
                            env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            start_new_session=True)
    procs.append(proc)
    assert proc.stdout is not None
    n, t0 = 0, time.perf_counter()
    fd = proc.stdout.fileno()
    while data := os.read(fd, 1 << 20):
        n += len(data)
    proc.wait()
    out.append(n / (time.perf_counter() - t0) / 1e6)


def fairness(work: Path, mib: int) -> None:
    src = work / "half.bin"
    write_big_file(src, mib << 20)
    mb = mib * (1 << 20) / 1e6
    alone = mb / ours_push(src, work / "alone.bin")
    stream_alone: list[float] = []
    procs: list[subprocess.Popen[bytes]] = []
    _stream(5, stream_alone, procs)
    beside: list[float] = []
    t = threading.Thread(target=_stream, args=(60, beside, procs))
    t.start()
    time.sleep(1.0)
    copy_beside = mb / ours_push(src, work / "beside.bin")
    procs[-1].terminate()  # vmbusifyexec forwards it: the remote stream stops
    t.join()
    check_same(src, work / "beside.bin")
    print(f"  fairness: a {mib} MiB push beside a streaming exec {copy_beside:.0f} MB/s "
          f"(alone {alone:.0f} MB/s, {copy_beside / alone:.2f}); the exec stream "
          f"{beside[0] if beside else 0:.0f} MB/s over its run (alone "
          f"{stream_alone[0]:.0f} MB/s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=10000)
    args = ap.parse_args()
    print(f"files benchmark on {os.cpu_count()} cores, vm1 = the lab, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vmbusify-bench-files-") as tmp:
        work = Path(tmp)
        sshd = LocalSshd(work / "sshd")
        (work / "sshd").mkdir()
        sshd.start()
        try:
            scp = Scp(sshd)
            one_file(work, scp, args.mib)
            small_files(work, scp, args.files)
            fairness(work, max(64, args.mib // 2))
        finally:
            sshd.stop()


if __name__ == "__main__":
    main()
