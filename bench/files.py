#!/usr/bin/env python3
"""`vmbusifyctl cp` benchmark, side by side with scp to a local sshd, in one run.

    .venv/bin/python bench/files.py [--mib 1024] [--files 10000]

Needs the lab up (root; bench/run brings it up) and uses its vm1; the anchors use a throwaway
local sshd (bench/exec.py's LocalSshd: its own keys and config on a free loopback port) and
``scp -O`` (the classic scp protocol: that sshd has no sftp subsystem). The lab's VMs share the
host's file system, so both tools copy between two directories of the same machine.

1. One file of MIB MiB (random bytes) in (push) and out (pull): seconds and MB/s of each tool,
   ratio scp time / vmbusify time (goal >= 1.5), sha256 of every copy checked; vmbusify both
   by its fast path (the default for one large file: docs/files.md) and by the ordinary stream
   (``VMBUSIFY_CP_FAST=0``), each with the CPU seconds every process spent on it (host and
   guest side: the client, the command listener, each mux, the guest's executor and the copy's
   helper; sampled every 0.1 s, so a helper's last tenth of a second may be missing). With
   ``--runs N`` each copy is made N times, interleaved, and the median time is shown.
2. A tree of FILES small files (1-4 KiB, 100 directories) in and out: ratio scp -r time /
   vmbusify time (goal >= 5), every copy checked with ``diff -r``; each copy
   ``--tree-runs`` times (3), interleaved with each tool first in turn, the median shown. Each
   direction copies on a fresh ext4 file system made for it (a loop device, mounted in the
   lab VMs' mount namespaces too: ``fresh_ext4``), so the figure is the tools', not the
   churn that the benchmark's earlier removals leave in the root file system; ``--tree-on
   work`` copies in the work directory instead, synced and left a second after each
   removal (``settle``). ``--base
   CHECKOUT`` adds the client (and so the guest's helper, which it sends) of another
   checkout to the rotation (``PYTHONPATH``:
   e.g. ``git archive main vmbusify | tar -x -C /tmp/base``), for an A/B in one run.
3. Fairness: a push of MIB/2 MiB beside an exec streaming /dev/zero out of vm1 (started
   first, in a session of its own), each one's MB/s beside its MB/s alone.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

from bench.exec import LocalSshd
from vmbusify.lab.access import command
from vmbusify.lab.testing import sha256_of, write_big_file

BIN = Path(sys.executable).parent
CTL = str(BIN / "vmbusifyctl")
EXEC = str(BIN / "vmbusifyexec")


def env() -> dict[str, str]:
    return command("host", ["true"])[1]


def timed(argv: list[str], base: str = "") -> float:
    """Seconds ``argv`` ran; ``base``: with vmbusify imported from that checkout."""
    extra = {"PYTHONPATH": base} if base else {}
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env={**env(), **extra}, stdin=subprocess.DEVNULL,
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

    def profiled(self, src: str, dst: str) -> tuple[float, dict[str, float]]:
        """One copy, with the CPU seconds of scp, ssh, sshd and the remote scp."""
        assert self.sshd.proc is not None
        return profiled([*self.base, src, dst], roots=(self.sshd.proc.pid,))

    def pull(self, src: Path, dst: Path, recursive: bool = False) -> float:
        return timed([*self.base, *(["-r"] if recursive else []), self.remote(src), str(dst)])


def ours_push(src: Path, dst: Path, recursive: bool = False, base: str = "") -> float:
    return timed([CTL, "cp", "-q", *(["-r"] if recursive else []), str(src), f"vm1:{dst}"],
                 base)


def ours_pull(src: Path, dst: Path, recursive: bool = False, base: str = "") -> float:
    return timed([CTL, "cp", "-q", *(["-r"] if recursive else []), f"vm1:{src}", str(dst)],
                 base)


def _netns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return ""


def _role(proc: psutil.Process, host_ns: str) -> str:
    """What a process of the lab is, for the CPU table: host/guest and its program."""
    argv = proc.cmdline()
    side = "host" if _netns(proc.pid) == host_ns else "guest"
    if "cp" in argv and any(a.endswith("vmbusifyctl") for a in argv):
        return "client (vmbusifyctl cp)"
    if "-c" in argv and "-I" in argv:
        return f"{side} copy helper (python3)"
    if argv and not any("vmbusify" in a for a in argv[:2]):  # scp's: scp, ssh, sshd
        prog = os.path.basename(argv[0]).split(":")[0]
        return f"{prog}{' (remote end)' if '-t' in argv or '-f' in argv else ''}"
    words = [a for a in argv if not a.startswith("-")]
    for name in ("mux", "control", "exec"):
        if name in words:
            return f"{side} {'command listener' if name == 'control' else name}"
    return f"{side} {words[-1] if words else '?'}"


def _lab_daemons() -> list[int]:
    """This checkout's VMBusify processes (the lab's daemons: supervisord and its programs)."""
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any(str(a).startswith(str(BIN / "vmbusify")) for a in (p.info["cmdline"] or [])[:2])]


def _parents() -> dict[int, int]:
    """Every process's parent, from one pass over /proc."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        out[int(entry.name)] = int(stat[stat.rindex(b")") + 2:].split()[1])
    return out


def _descendants(roots: list[int]) -> set[int]:
    """``roots`` and every process below them."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def _cpu_seconds(pid: int) -> float:
    """User + system seconds of ``pid`` (its own threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def profiled(argv: list[str], extra_env: dict[str, str] | None = None,
             roots: tuple[int, ...] = ()) -> tuple[float, dict[str, float]]:
    """Run ``argv``; its seconds and the CPU seconds of each process of the lab (and of
    ``argv``'s children and ``roots``' children: scp's ssh and sshd) meanwhile.

    Sampled every 0.1 s at the cost of one pass over /proc/*/stat (about 2 ms here): the
    lab's daemons are found once, and a process's command line is read once, when it is
    first seen. The sampling once looked up every process's command line and walked the
    children of each daemon apart, 30 ms a sample: a third of a core of two, which slowed
    the copy it measured from 1.8 s to 4.7 s (docs/performance.md, "`vmbusifyctl cp`, one
    large file")."""
    host_ns = _netns(os.getpid())
    daemons = _lab_daemons()
    before: dict[int, float] = {}
    seen: dict[int, tuple[str, float]] = {}
    for pid in _descendants(daemons):
        try:
            before[pid] = _cpu_seconds(pid)
        except OSError:
            pass
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env={**env(), **(extra_env or {})},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    while proc.poll() is None:
        for pid in _descendants([*daemons, proc.pid, *roots]) - {*roots}:
            try:
                total = _cpu_seconds(pid)
                role = seen[pid][0] if pid in seen else _role(psutil.Process(pid), host_ns)
                seen[pid] = (role, total)
            except (OSError, psutil.Error):
                pass
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{argv}: exit {proc.returncode}")
    cpu: dict[str, float] = {}
    for pid, (role, total) in seen.items():
        spent = total - before.get(pid, 0.0)
        if spent >= 0.02:
            cpu[role] = cpu.get(role, 0.0) + spent
    return seconds, cpu


def _cpu_line(cpu: dict[str, float]) -> str:
    parts = sorted(cpu.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{role} {sec:.2f}" for role, sec in parts) + \
        f"; total {sum(cpu.values()):.2f} CPU-s"


def check_same(a: Path, b: Path) -> None:
    if a.is_dir():
        subprocess.run(["diff", "-r", "-q", str(a), str(b)], check=True)
    elif sha256_of(a) != sha256_of(b):
        raise SystemExit(f"{b}: sha256 differs from {a}")


def one_file(work: Path, scp: Scp, mib: int, runs: int = 1) -> None:
    src = work / "big.bin"
    write_big_file(src, mib << 20)
    mb = mib * (1 << 20) / 1e6
    for way in ("push", "pull"):
        times: dict[str, list[float]] = {}
        cpus: dict[str, dict[str, float]] = {}
        for _ in range(runs):
            for tool in ("vmbusify", "vmbusify-stream", "scp"):
                dst = work / f"{way}-{tool}.bin"
                if tool == "scp":
                    t, cpus[tool] = scp.profiled(
                        *((str(src), scp.remote(dst)) if way == "push"
                          else (scp.remote(src), str(dst))))
                else:
                    argv = [CTL, "cp", "-q", *((str(src), f"vm1:{dst}") if way == "push"
                                                else (f"vm1:{src}", str(dst)))]
                    fast = {"VMBUSIFY_CP_FAST": "0" if tool == "vmbusify-stream" else "1"}
                    t, cpus[tool] = profiled(argv, fast)
                times.setdefault(tool, []).append(t)
                check_same(src, dst)
                dst.unlink()
        med = {tool: statistics.median(ts) for tool, ts in times.items()}
        print(f"  {mib} MiB {way}: vmbusify {med['vmbusify']:.2f} s "
              f"({mb / med['vmbusify']:.0f} MB/s), scp {med['scp']:.2f} s "
              f"({mb / med['scp']:.0f} MB/s), ratio {med['scp'] / med['vmbusify']:.2f} "
              f"(goal >= 1.5), sha256 equal{f'; median of {runs}' if runs > 1 else ''}",
              flush=True)
        print(f"    vmbusify by the ordinary stream (VMBUSIFY_CP_FAST=0): "
              f"{med['vmbusify-stream']:.2f} s ({mb / med['vmbusify-stream']:.0f} MB/s), "
              f"ratio to scp {med['scp'] / med['vmbusify-stream']:.2f}", flush=True)
        for tool in ("vmbusify", "vmbusify-stream", "scp"):
            print(f"    CPU seconds ({tool}, last run): {_cpu_line(cpus[tool])}", flush=True)
    src.unlink()


def settle() -> None:
    """Let the file system finish what earlier deletions started before the next copy is
    timed (``--tree-on work``: this machine's root is ext4 mounted with ``discard``, whose
    journal commit after a large removal made whichever copy came next 2-3x slower)."""
    os.sync()
    time.sleep(1.0)


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def _lab_mount_namespaces() -> list[int]:
    """One lab daemon per mount namespace other than ours: ``ip netns exec`` gives each VM's
    programs a mount namespace of their own, which sees no mount made in ours after it was
    made (unless ours is shared)."""
    own = os.readlink("/proc/self/ns/mnt")
    found: dict[str, int] = {}
    for pid in _lab_daemons():
        try:
            ns = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            continue
        if ns != own:
            found.setdefault(ns, pid)
    return list(found.values())


@contextlib.contextmanager
def fresh_ext4(where: Path, mib: int = 4096, also_in: list[int] | None = None
               ) -> Iterator[Path]:
    """A new ext4 file system (a sparse image on a loop device, an inode per 4 KiB: room for
    many copies of a tree of small files; default mount options),
    mounted at ``where`` here and, at the same path, in every lab VM's mount namespace, so
    the guest's side of a copy writes to it too; removed again afterwards.

    Why: a tree of 10,000 small files costs what the file system's creates cost, and on a
    root file system that has just lost hundreds of thousands of files (the benchmark's
    own copies) every create costs several times more, for both tools, so the ratio
    measured the churn, not the tools (docs/performance.md: 2.5-8.6x scp -r on this
    machine's root for the same code). A fresh file system per figure is what a VM's disk
    that is not being churned looks like. ``also_in``: the processes whose mount namespaces
    get it too (default: the lab's daemons')."""
    image = where.with_suffix(".img")
    with open(image, "wb") as f:
        f.truncate(mib << 20)
    device = ""
    mounted: list[int] = []
    try:
        device = _run(["losetup", "--find", "--show", str(image)])
        _run(["mkfs.ext4", "-q", "-F", "-i", "4096", device])
        where.mkdir()
        _run(["mount", device, str(where)])
        for pid in _lab_mount_namespaces() if also_in is None else also_in:
            enter = ["nsenter", f"--mount=/proc/{pid}/ns/mnt", "--"]
            there = subprocess.run([*enter, "mountpoint", "-q", str(where)], check=False)
            if there.returncode != 0:
                _run([*enter, "mount", device, str(where)])
                mounted.append(pid)
        yield where
    finally:
        for pid in mounted:
            subprocess.run(["nsenter", f"--mount=/proc/{pid}/ns/mnt", "--", "umount", "-l",
                            str(where)], check=False)
        if device:
            subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)
            subprocess.run(["losetup", "-d", device], check=False)
        image.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            where.rmdir()


def small_files(work: Path, scp: Scp, files: int, runs: int = 1, base: str = "",
                fresh: bool = True) -> None:
    tools = ("vmbusify", *(("base",) if base else ()), "scp")
    for way in ("push", "pull"):
        times: dict[str, list[float]] = {}
        with (fresh_ext4(work / f"fs-{way}") if fresh else contextlib.nullcontext(work)) as at:
            src = at / "tree"
            make_tree(src, files)
            copies = []
            settle()
            for run in range(runs):
                # Each tool goes first in turn: the first copy of a round meets the cache
                # and the disk as the previous copy left them.
                for tool in tools[run % len(tools):] + tools[:run % len(tools)]:
                    dst = at / f"tree-{way}-{tool}-{run}"
                    if tool == "scp":
                        t = (scp.push if way == "push" else scp.pull)(src, dst, True)
                    else:
                        t = (ours_push if way == "push" else ours_pull)(
                            src, dst, True, base if tool == "base" else "")
                    times.setdefault(tool, []).append(t)
                    check_same(src, dst)
                    copies.append(dst)
            # Removed after the figure, not between copies: on ext4, 10,000 files made just
            # after 10,000 were removed cost the kernel up to 10x more each
            # (docs/performance.md).
            for dst in (*copies, src):
                shutil.rmtree(dst)
            if not fresh:
                settle()
        med = {tool: statistics.median(ts) for tool, ts in times.items()}
        print(f"  {files} files {way}: vmbusify {med['vmbusify']:.2f} s, scp -r "
              f"{med['scp']:.2f} s, ratio {med['scp'] / med['vmbusify']:.2f} "
              f"(goal >= 5), diff -r equal{f'; median of {runs}' if runs > 1 else ''}; "
              f"{'on a fresh ext4' if fresh else 'in the work directory'}", flush=True)
        if base:
            paired = statistics.median(a / b for a, b in zip(times["vmbusify"], times["base"],
                                                               strict=True))
            print(f"    {base}'s client: {med['base']:.2f} s, ratio to scp -r "
                  f"{med['scp'] / med['base']:.2f}; this one's time / its "
                  f"{med['vmbusify'] / med['base']:.2f} (medians), {paired:.2f} (median of "
                  f"each round's), {min(times['vmbusify']) / min(times['base']):.2f} "
                  "(fastest runs)", flush=True)
        if runs > 1:
            for tool in tools:
                print(f"    {tool} runs: {' '.join(f'{t:.2f}' for t in times[tool])}",
                      flush=True)


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
    ap.add_argument("--files", type=int, default=10000, help="0: no tree figures")
    ap.add_argument("--runs", type=int, default=1,
                    help="copies of the one file per tool (the median is shown)")
    ap.add_argument("--tree-runs", type=int, default=3,
                    help="copies of the tree per tool (the median is shown)")
    ap.add_argument("--no-fairness", action="store_true", help="skip the fairness figure")
    ap.add_argument("--only", choices=("file", "tree", "fairness"),
                    help="only this figure")
    ap.add_argument("--base", default="",
                    help="a checkout whose client (and guest helper) the tree figures also "
                    "time, interleaved (A/B in one run)")
    ap.add_argument("--tree-on", choices=("fresh", "work"), default="fresh",
                    help="where the tree figures copy: a fresh ext4 made for each direction "
                    "(default), or the work directory (--dir) as it is")
    ap.add_argument("--dir", default=None,
                    help="where the files are made and copied (default: $TMPDIR or /tmp)")
    args = ap.parse_args()
    want = {figure: args.only in (None, figure) for figure in ("file", "tree", "fairness")}
    # As an install does (with PYTHONDONTWRITEBYTECODE set, an edited checkout, and one made
    # with git archive for --base, would compile its modules again at every cp's start).
    for tree in (Path(__file__).resolve().parents[1], *([Path(args.base)] if args.base else [])):
        compileall.compile_dir(str(tree / "vmbusify"), quiet=1)
    print(f"files benchmark on {os.cpu_count()} cores, vm1 = the lab, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vmbusify-bench-files-", dir=args.dir) as tmp:
        work = Path(tmp)
        sshd = LocalSshd(work / "sshd")
        (work / "sshd").mkdir()
        sshd.start()
        try:
            scp = Scp(sshd)
            if args.mib and want["file"]:
                one_file(work, scp, args.mib, args.runs)
            if args.files and want["tree"]:
                small_files(work, scp, args.files, args.tree_runs, args.base,
                            fresh=args.tree_on == "fresh")
            if not args.no_fairness and want["fairness"]:
                fairness(work, max(64, args.mib // 2))
        finally:
            sshd.stop()


if __name__ == "__main__":
    main()
