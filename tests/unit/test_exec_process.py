"""The executor's process handling: spawn, environment, pty, and killing a whole tree."""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
import uuid
from collections.abc import Awaitable
from typing import TypeVar

import psutil
import pytest

from vmbusify.protocol.exec import ExecSpec
from vmbusify.workers.exec.process import (
    PIPE_SIZE,
    TAG_VAR,
    CannotStart,
    FdIO,
    build_env,
    kill_tree,
    spawn,
    tree,
)

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def read_all(fd: int) -> bytes:
    io, out = FdIO(fd), b""
    while chunk := await io.read():
        out += chunk
    return out


def test_spawn_pipes_env_and_exit() -> None:
    async def scenario() -> None:
        child = await spawn(ExecSpec(argv=["sh", "-c", 'echo "$A|$PWD|$HOME"; echo e >&2; exit 4'],
                                     env={"A": "x"}, cwd="/"))
        assert child.stdout is not None and child.stderr is not None
        out, err = await asyncio.gather(read_all(child.stdout), read_all(child.stderr))
        assert await child.proc.wait() == 4
        assert out.decode().split("|")[:2] == ["x", "/"]
        assert err == b"e\n"
        child.close()

    run(scenario())


def test_spawn_failures() -> None:
    async def scenario() -> None:
        with pytest.raises(CannotStart) as exc:
            await spawn(ExecSpec(argv=["no-such-program-xyz"]))
        assert exc.value.exit_code == 127
        with pytest.raises(CannotStart) as exc:
            await spawn(ExecSpec(argv=["/etc/passwd"]))
        assert exc.value.exit_code == 126
        with pytest.raises(CannotStart) as exc:
            await spawn(ExecSpec(argv=["true"], cwd="/no/such/dir"))
        assert exc.value.exit_code == 126
        with pytest.raises(CannotStart) as exc:
            await spawn(ExecSpec(argv=["true"], user="no-such-user-xyz"))
        assert exc.value.exit_code == 126

    run(scenario())


def test_a_uid_without_a_passwd_entry_runs_as_docker_runs_it() -> None:
    """`-u 54321` where no passwd entry has that uid: that uid, its own gid, home `/`."""
    import pwd

    uid = next(u for u in range(54321, 64000) if u not in {p.pw_uid for p in pwd.getpwall()})
    if os.getuid() != 0:
        pytest.skip("switching users needs root (the executor runs as root)")

    async def scenario() -> None:
        child = await spawn(ExecSpec(argv=["sh", "-c", 'echo "$(id -u) $(id -g) $HOME $USER"'],
                                     user=str(uid)))
        assert child.stdout is not None
        out = await read_all(child.stdout)
        assert await child.proc.wait() == 0
        assert out == f"{uid} {uid} / {uid}\n".encode()
        child.close()
        with pytest.raises(CannotStart) as exc:  # past the largest uid: no such user
            await spawn(ExecSpec(argv=["true"], user=str(2**32 - 1)))
        assert exc.value.exit_code == 126

    run(scenario())


def test_environment_is_clean() -> None:
    import pwd
    account = pwd.getpwuid(os.getuid())
    env = build_env(ExecSpec(argv=["x"], tty=True, term="screen", env={"PATH": "/opt"}),
                    account)
    assert env["PATH"] == "/opt" and env["TERM"] == "screen" and env["USER"] == account.pw_name
    assert not any(k.startswith(("VMBUSIFY", "SUPERVISOR")) for k in env)


def test_tty_is_the_controlling_terminal() -> None:
    async def scenario() -> None:
        child = await spawn(ExecSpec(argv=["sh", "-c", "tty; stty size"], tty=True,
                                     rows=33, cols=77))
        assert child.master is not None
        out = await read_all(child.master)
        assert await child.proc.wait() == 0
        lines = out.decode().split()
        assert lines[0].startswith("/dev/pts/") and lines[1:] == ["33", "77"]
        child.close()

    run(scenario())


def test_kill_tree_finds_escapees() -> None:
    tag = f"{uuid.uuid4().int % 10**6 + 1000}.5"

    async def scenario() -> None:
        child = await spawn(ExecSpec(argv=["sh", "-c",
                                           f"sleep {tag} & (setsid sleep {tag} &); sleep {tag}"]))
        def names() -> list[str]:
            out = []
            for p in tree(child.pid, child.tag):
                try:
                    out.append(p.name())
                except psutil.NoSuchProcess:
                    pass
            return sorted(out)

        # wait for the settled tree: the short-lived subshell that ran setsid must be gone
        deadline = time.monotonic() + 5
        while names() != ["sh", "sleep", "sleep", "sleep"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        members = tree(child.pid, child.tag)
        assert len(members) == 4  # sh, two sleeps in its session, one that left it
        assert all(p.environ().get(TAG_VAR) == child.tag for p in members)
        assert kill_tree(child) == 4
        assert await child.proc.wait() < 0
        for p in members:
            try:
                p.wait(5)
            except psutil.NoSuchProcess:
                pass
        assert not tree(child.pid, child.tag, leader_alive=False)
        child.close()

    run(scenario())


def test_stdin_pipe_streams_and_closes() -> None:
    async def scenario() -> None:
        child = await spawn(ExecSpec(argv=["sort"], stdin=True))
        assert child.stdin is not None and child.stdout is not None
        await FdIO(child.stdin).write(b"b\na\n")
        os.close(child.stdin)  # EOF: sort prints and exits
        child.stdin = None
        assert await read_all(child.stdout) == b"a\nb\n"
        assert await child.proc.wait() == 0
        child.close()

    run(scenario())


def test_every_pipe_of_a_program_holds_one_chunk() -> None:
    """stdin, stdout and stderr get PIPE_SIZE (1 MiB, /proc/sys/fs/pipe-max-size's default):
    a DATA package goes into stdin in one write, and stdout is read a package at a time."""
    async def scenario() -> None:
        child = await spawn(ExecSpec(argv=["cat"], stdin=True))
        assert child.stdin is not None and child.stdout is not None
        assert child.stderr is not None
        for fd in (child.stdin, child.stdout, child.stderr):
            assert fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) == PIPE_SIZE
        os.close(child.stdin)
        child.stdin = None
        assert await child.proc.wait() == 0
        child.close()

    run(scenario())


def test_writing_to_a_program_that_closed_its_stdin_raises_broken_pipe() -> None:
    async def scenario() -> None:
        child = await spawn(ExecSpec(argv=["sh", "-c", "exec 0<&-; sleep 0.2"], stdin=True))
        assert child.stdin is not None
        await asyncio.sleep(0.1)
        with pytest.raises(BrokenPipeError):
            await FdIO(child.stdin).write(b"x" * 100)
        assert await child.proc.wait() == 0
        child.close()

    run(scenario())


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "no-pidfd"])
def test_exit_is_seen_by_every_waiter(pidfd: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The exit arrives through a pidfd, or (kernels without one) through a waiting thread."""
    if not pidfd:
        def no_pidfd(pid: int) -> int:
            raise OSError(38, "Function not implemented")
        monkeypatch.setattr(os, "pidfd_open", no_pidfd)

    async def scenario() -> None:
        child = await spawn(ExecSpec(argv=["sh", "-c", "sleep 0.1; exit 3"]))
        assert child.proc.returncode is None
        first, second = await asyncio.gather(child.proc.wait(), child.proc.wait())
        assert first == second == 3 == child.proc.returncode
        assert await child.proc.wait() == 3  # and again, after the fact
        killed = await spawn(ExecSpec(argv=["sleep", "30"]))
        kill_tree(killed)
        assert await killed.proc.wait() == -9
        child.close()
        killed.close()

    run(scenario())


def test_programs_do_not_inherit_ignored_signals() -> None:
    """An executor started by nohup or a background job ignores SIGHUP/SIGINT/SIGQUIT; after
    default_signal_actions its programs start with no signal ignored (as sshd's would)."""
    import signal

    from vmbusify.workers.exec.process import default_signal_actions

    saved = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)}

    async def ignored_and_blocked() -> tuple[int, int]:
        child = await spawn(ExecSpec(argv=["grep", "-E", "SigIgn|SigBlk", "/proc/self/status"]))
        assert child.stdout is not None
        fields = dict(line.split() for line in (await read_all(child.stdout)).decode().splitlines())
        assert await child.proc.wait() == 0
        child.close()
        return int(fields["SigIgn:"], 16), int(fields["SigBlk:"], 16)

    bit = 1 << (signal.SIGINT - 1)
    try:
        for s in saved:
            signal.signal(s, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
        ignored, blocked = run(ignored_and_blocked())
        assert ignored & bit and blocked  # the traps this guards against
        default_signal_actions()
        assert run(ignored_and_blocked()) == (0, 0)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])
        for s, handler in saved.items():
            signal.signal(s, handler)
