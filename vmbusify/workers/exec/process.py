"""Starting a program for an exec, and ending its whole process tree.

Every exec runs in a session of its own (``setsid``): its pid is the session id and the
process group id, so a signal can reach the whole foreground group. Its environment carries
``VMBUSIFY_EXEC_ID``, a tag each descendant inherits, so ``kill_tree`` finds every process it
started: descendants, session members, and those that left the session and were reparented
to init (``setsid sleep &``). With a TTY the program gets a fresh pty as its controlling
terminal (stdin, stdout and stderr).

Programs are started with ``subprocess.Popen`` (vfork and exec: the executor's memory is
never copied) rather than the event loop's subprocess support: uvloop forks the whole
executor and rebuilds its loop in the child before the exec, which cost 5 ms a start here,
and far more with the CPU busy. The exit is watched through a pidfd.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import pty
import pwd
import signal
import struct
import subprocess
import termios
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from vmbusify.protocol.exec import ExecSpec
from vmbusify.protocol.exec_api import EXIT_CANNOT_RUN, EXIT_NOT_FOUND
from vmbusify.protocol.window import MAX_CHUNK

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The environment variable that tags every process of one exec.
TAG_VAR = "VMBUSIFY_EXEC_ID"


class CannotStart(Exception):
    """The program could not be started; ``exit_code`` is 126 or 127."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


#: Pipe capacity asked for the program's stdin, stdout and stderr: a 64 KiB pipe caps every
#: read (and so every DATA package) at 64 KiB; 1 MiB lets reads reach MAX_CHUNK. On stdin, a
#: 1 MiB DATA package went into a 64 KiB pipe in 16 writes, each followed by a wait for room
#: (a wake-up and two epoll_ctl), and the reader (``vmbusifyctl cp``'s helper) took it in 16
#: splices: a 1 GiB push made 21,730 writes and 25,236 epoll_ctl in the executor; with
#: 1 MiB, 2,277 and 1,286 (docs/performance.md, "`vmbusifyctl cp`, one large file").
PIPE_SIZE = 1 << 20


class Program:
    """A started program: its pid and, awaitable, its exit status (``Popen.returncode``)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):  # no pidfd (Linux < 5.3): a thread waits instead,
            self._pidfd = -1  # a daemon one, so that a detached program never delays our exit
            threading.Thread(target=self._wait_in_thread, args=(loop,), daemon=True,
                             name=f"wait-{popen.pid}").start()
        else:
            loop.add_reader(self._pidfd, self._on_pidfd)

    @property
    def returncode(self) -> int | None:
        """The exit status as Popen gives it (-N: killed by signal N); None while running."""
        return self.popen.returncode

    async def wait(self) -> int:
        """Wait for the program to end; its ``returncode``."""
        return await asyncio.shield(self._exited)

    def _on_pidfd(self) -> None:
        if self.popen.poll() is None:
            return  # not reapable yet (a spurious wake-up): wait for the next one
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        self._reaped()

    def _wait_in_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        self.popen.wait()
        try:
            loop.call_soon_threadsafe(self._reaped)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _reaped(self) -> None:
        if not self._exited.done() and self.popen.returncode is not None:
            self._exited.set_result(self.popen.returncode)


@dataclass
class Child:
    """A started program, and the fds we talk to it through.

    ``master`` is the pty master with a TTY (output and input); otherwise ``stdout`` and
    ``stderr`` are the read ends of its output pipes and ``stdin`` the write end of its
    input pipe (with ``-i``).
    """

    proc: Program
    tag: str = ""
    master: int | None = None
    stdout: int | None = None
    stderr: int | None = None
    stdin: int | None = None

    def close(self) -> None:
        """Close every fd we hold (idempotent)."""
        for name in ("master", "stdout", "stderr", "stdin"):
            _close(getattr(self, name))
            setattr(self, name, None)

    @property
    def pid(self) -> int:
        return self.proc.pid


def default_signal_actions() -> None:
    """Unblock every signal, and give back their default action to those this process ignores.

    An ignored signal stays ignored across exec, and a blocked one blocked; Popen resets
    only SIGPIPE and SIGXFSZ (which Python ignores on purpose) in the child and hands it this
    thread's mask. An executor started by ``nohup`` or from a background shell job would
    otherwise start every program deaf to SIGHUP, SIGINT or SIGQUIT, and a forwarded Ctrl-C
    would do nothing. Call once at start-up, in the main thread.
    """
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    keep = {signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE, signal.SIGXFSZ}
    for sig in signal.valid_signals():
        if sig in keep:
            continue
        try:
            if signal.getsignal(sig) == signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):  # not settable from Python (e.g. real-time ones in use)
            continue


#: uids run from 0 to 2**32 - 2 (-1, all ones, means "no change" to setuid).
MAX_UID = 2**32 - 1


def _account(user: str) -> pwd.struct_passwd:
    """The account ``-u USER`` names: a user name, or a uid. A uid with no passwd entry (as
    containers and images often run) is taken as docker takes it: its own group, home ``/``."""
    try:
        if user.isdigit():
            uid = int(user)
            if uid >= MAX_UID:
                raise KeyError(user)
            try:
                return pwd.getpwuid(uid)
            except KeyError:
                return pwd.struct_passwd((user, "x", uid, uid, "", "/", "/bin/sh"))
        return pwd.getpwnam(user or pwd.getpwuid(os.getuid()).pw_name)
    except KeyError:
        raise CannotStart(EXIT_CANNOT_RUN, f"no such user: {user}") from None


def build_env(spec: ExecSpec, account: pwd.struct_passwd) -> dict[str, str]:
    """A login-like environment (as sshd gives), then the client's ``-e`` on top.

    Nothing of the executor's own environment leaks in (supervisord's, VMBusify's).
    """
    env = {
        "PATH": DEFAULT_PATH, "HOME": account.pw_dir, "USER": account.pw_name,
        "LOGNAME": account.pw_name, "SHELL": account.pw_shell or "/bin/sh",
    }
    for key in ("LANG", "LC_ALL", "TZ"):
        if key in os.environ:
            env[key] = os.environ[key]
    if spec.tty:
        env["TERM"] = spec.term or "xterm"
    env.update(spec.env)
    return env


def set_winsize(fd: int, rows: int, cols: int) -> None:
    """Set a pty's window size (the kernel sends SIGWINCH to its foreground group)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _child_setup(tty_path: str, account: pwd.struct_passwd | None) -> Callable[[], None]:
    """preexec_fn: a new session (whose controlling terminal is the pty at ``tty_path``, if
    any), then the user's groups and ids (``account``, if switching).

    Done here rather than with Popen's start_new_session and user/group arguments because
    the order matters: the terminal is opened after setsid (so it becomes the controlling
    one) and before dropping privileges (the pty belongs to root). A preexec_fn makes Popen
    fork rather than vfork: only TTY and user-switching execs pay for that.
    """
    groups = os.getgrouplist(account.pw_name, account.pw_gid) if account else []

    def child() -> None:
        os.setsid()
        if tty_path:
            os.close(os.open(tty_path, os.O_RDWR))  # a session leader's first tty is its own
        if account is not None:
            os.setgroups(groups)
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
    return child


async def spawn(spec: ExecSpec) -> Child:
    """Start ``spec.argv``; raises CannotStart (exit code 127 or 126) with a one-line reason."""
    account = _account(spec.user)
    cwd = spec.cwd or account.pw_dir
    if not spec.cwd and not os.path.isdir(cwd):
        cwd = "/"
    if not os.path.isdir(cwd):
        raise CannotStart(EXIT_CANNOT_RUN, f"no such directory: {cwd}")
    tag = uuid.uuid4().hex
    env = build_env(spec, account)
    env[TAG_VAR] = tag
    kwargs: dict = {"env": env, "cwd": cwd, "start_new_session": True}
    switch = account if spec.user and account.pw_uid != os.getuid() else None
    if switch is not None:
        if os.getuid() != 0:
            raise CannotStart(EXIT_CANNOT_RUN, f"cannot run as {spec.user}: the command "
                              "executor is not root")
        kwargs.update(start_new_session=False, preexec_fn=_child_setup("", switch))
    master = slave = None
    ours: list[int] = []  # our ends: output read ends, then the stdin write end
    theirs: list[int] = []  # the child's ends, closed here after the spawn
    if spec.tty:
        master, slave = pty.openpty()
        if spec.rows and spec.cols:
            set_winsize(master, spec.rows, spec.cols)
        os.set_blocking(master, False)
        theirs.append(slave)
        kwargs.update(stdin=slave, stdout=slave, stderr=slave, start_new_session=False,
                      preexec_fn=_child_setup(os.ttyname(slave), switch))
    elif spec.detach:
        kwargs.update(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    else:
        for _ in ("stdout", "stderr"):
            r, w = _pipe()
            ours.append(r)
            theirs.append(w)
        stdin: int = subprocess.DEVNULL
        if spec.stdin:
            r, w = os.pipe()
            _grow(w)
            os.set_blocking(w, False)
            ours.append(w)
            theirs.append(r)
            stdin = r
        kwargs.update(stdin=stdin, stdout=theirs[0], stderr=theirs[1])
    program = spec.argv[0]
    try:
        # Blocking only until the exec (vfork): shorter than a trip through the loop's own.
        popen = subprocess.Popen(spec.argv, **kwargs)  # noqa: ASYNC220
    except BaseException as exc:
        for fd in [master, *ours]:
            _close(fd)
        if isinstance(exc, FileNotFoundError):
            raise CannotStart(EXIT_NOT_FOUND, f"{program}: command not found") from None
        if isinstance(exc, PermissionError):
            raise CannotStart(EXIT_CANNOT_RUN, f"{program}: permission denied") from None
        if isinstance(exc, OSError):
            raise CannotStart(EXIT_CANNOT_RUN, f"{program}: {exc.strerror or exc}") from None
        raise
    finally:
        for fd in theirs:
            _close(fd)
    proc = Program(popen)
    if master is not None:
        return Child(proc, tag, master)
    if ours:
        return Child(proc, tag, stdout=ours[0], stderr=ours[1],
                     stdin=ours[2] if len(ours) > 2 else None)
    return Child(proc, tag)


def _grow(fd: int) -> None:
    """Ask PIPE_SIZE for the pipe of ``fd`` (kept at its size if the kernel refuses)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size: keep the default


def _pipe() -> tuple[int, int]:
    """An output pipe (read end non-blocking, both close-on-exec) of PIPE_SIZE."""
    r, w = os.pipe()
    _grow(w)
    os.set_blocking(r, False)
    return r, w


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def tree(pid: int, tag: str = "", leader_alive: bool = True) -> set[psutil.Process]:
    """Every live process an exec started: ``pid``'s descendants, its session's members, and
    every process whose environment carries the exec's ``tag``.

    The session and the tag catch processes whose parent died (reparented to init); the
    kernel never hands a session id out as a new pid while the session exists, and the tag is
    a random 128-bit value, so nothing foreign matches.
    """
    found: set[psutil.Process] = set()
    if leader_alive:
        try:
            root = psutil.Process(pid)
            found.add(root)
            found.update(root.children(recursive=True))
        except psutil.Error:
            pass
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == pid or (tag and proc.environ().get(TAG_VAR) == tag):
                found.add(proc)
        except (OSError, psutil.Error):
            continue
    return found


def kill_tree(child: Child, sig: int = signal.SIGKILL) -> int:
    """Send ``sig`` to every process of ``child``'s exec (see ``tree``); how many got it."""
    hit: set[int] = set()
    for _ in range(3):  # a process forking while we kill: look again
        leader_alive = child.proc.returncode is None
        procs = {p for p in tree(child.pid, child.tag, leader_alive)
                 if p.pid != os.getpid() and p.pid not in hit}
        if not procs:
            break
        # the leader first: a shell whose child dies before it does would exit on its own
        # (status 128+sig) and report the exec as finished rather than killed
        for p in sorted(procs, key=lambda p: (p.pid != child.pid, p.pid)):
            try:
                p.send_signal(sig)
                hit.add(p.pid)
            except psutil.Error:
                pass
        if sig != signal.SIGKILL:
            break
    return len(hit)


def signal_group(child: Child, sig: int) -> None:
    """Deliver a forwarded signal as a terminal would: to the foreground process group."""
    pgid = child.pid
    if child.master is not None:
        try:
            pgid = os.tcgetpgrp(child.master)
        except OSError:
            pass
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        log.warning("pid=%d: cannot signal group %d: %s", child.pid, pgid, exc)


#: While output streams (reads back to back), gather up to this long for a fuller chunk: a
#: program writing 8 KiB at a time would otherwise cost one package per 8 KiB on every hop.
BATCH_LINGER = 0.002
#: Reads closer together than this count as streaming.
STREAMING_GAP = 0.005


class FdIO:
    """Non-blocking reads and writes on a pipe or pty master, driven by the event loop."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._loop = asyncio.get_running_loop()
        self._last_read = -1.0

    async def read_batch(self, n: int = MAX_CHUNK) -> bytes:
        """Like ``read``, but while output streams, gather for up to BATCH_LINGER seconds
        to fill ``n`` bytes. Interactive output (reads far apart) is never held back."""
        data = await self.read(n)
        now = self._loop.time()
        streaming = now - self._last_read < STREAMING_GAP
        self._last_read = now
        if not data or len(data) >= n or not streaming:
            return data
        # One timed pause instead of one wake-up per small write of the program's.
        await asyncio.sleep(BATCH_LINGER)
        try:
            more = os.read(self.fd, n - len(data))
        except OSError:
            more = b""  # nothing yet, EOF or EIO: the next read() tells
        self._last_read = self._loop.time()
        return data + more if more else data

    async def read(self, n: int = MAX_CHUNK) -> bytes:
        """Up to ``n`` bytes; b"" at EOF (for a pty master: the slave closed everywhere, EIO)."""
        while True:
            try:
                return os.read(self.fd, n)
            except BlockingIOError:
                await self._wait(self._loop.add_reader, self._loop.remove_reader)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return b""
                raise

    async def write(self, data: bytes | memoryview,
                    on_full: Callable[[], None] | None = None) -> None:
        """Write all of ``data``; ``on_full`` is called each time the fd is full (the
        program reads no more for now) before waiting for room."""
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
                view = view[n:]
            except BlockingIOError:
                if on_full is not None:
                    on_full()
                await self._wait(self._loop.add_writer, self._loop.remove_writer)

    async def _wait(self, add, remove, timeout: float | None = None  # type: ignore[no-untyped-def]
                    ) -> None:
        fut = self._loop.create_future()
        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        add(self.fd, ready)
        timer = self._loop.call_later(timeout, ready) if timeout is not None else None
        try:
            await fut
        finally:
            remove(self.fd)
            if timer is not None:
                timer.cancel()
