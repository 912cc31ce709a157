"""One VMBusify stack (a supervisord running ``conf/supervisord.conf``) per simulated machine.

A stack is the host's (root namespace) or a VM's (inside ``vmbl-vmK``). Its supervisord gets
``VMBUSIFY_CONFIG``, ``VMBUSIFY_RUN_DIR`` and ``VMBUSIFY_BIN`` in its environment, daemonizes
itself and keeps its socket, pid file and logs in the run directory. Its programs inherit that
environment, which is how leftovers are found: a process whose ``VMBUSIFY_RUN_DIR`` is a
stack's run directory belongs to that stack.

A VM may run an older release's guest stack (lab/release.py): its supervisord then runs that
release's ``conf/supervisord.conf`` with ``VMBUSIFY_BIN`` pointing at the release's programs.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from vmbusify.errors import LabError
from vmbusify.lab import netns as ip
from vmbusify.lab.layout import LabLayout, supervisord_conf, venv_bin
from vmbusify.lab.release import ReleaseTree, release_of, tree_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stack:
    """Where one supervisord lives: its name, namespace, config and run directory."""

    #: "host" or a VM id ("vm1").
    name: str
    #: The network namespace it runs in (None: the root namespace).
    netns: str | None
    config: Path
    run_dir: Path
    #: The older release this stack runs (None: this checkout).
    release: ReleaseTree | None = None

    @property
    def conf(self) -> Path:
        """The supervisord.conf it runs: this checkout's, or its release's."""
        if self.release is None:
            return supervisord_conf()
        if not self.release.conf.is_file():
            raise LabError(f"{self.name}: release {self.release.ref} is not exported "
                           f"({self.release.conf} is missing): run `vmbusify lab up`")
        return self.release.conf

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "supervisord.pid"

    @property
    def socket(self) -> Path:
        return self.run_dir / "supervisor.sock"

    @property
    def logfile(self) -> Path:
        return self.run_dir / "supervisord.log"

    def env(self) -> dict[str, str]:
        """The environment for this stack's supervisord, supervisorctl and VMBusify commands
        (on ``PATH``: its release's scripts, if any, then this venv's)."""
        bindir = venv_bin()
        env = dict(os.environ)
        env.update(
            VMBUSIFY_CONFIG=str(self.config),
            VMBUSIFY_RUN_DIR=str(self.run_dir),
            VMBUSIFY_BIN=str(self.release.bin_dir if self.release else bindir),
            PATH=os.pathsep.join([*([str(self.release.bin_dir)] if self.release else []),
                                  str(bindir), env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")]),
        )
        return env


def stack_for(target: str, layout: LabLayout | None = None) -> Stack:
    """The stack of ``"host"`` or of VM ``"vmK"``."""
    layout = layout or LabLayout()
    if target == "host":
        h = layout.host
        return Stack("host", None, h.config_path, h.run_dir)
    vm = layout.vm(target)
    ref = release_of(vm)
    return Stack(vm.vmid, vm.netns, vm.config_path, vm.run_dir,
                 tree_for(ref, layout) if ref else None)


def as_stack(target: Stack | str) -> Stack:
    """``target`` itself, or the stack named "host" / "vmK" in the default lab."""
    return target if isinstance(target, Stack) else stack_for(target)


def supervisorctl_command(target: Stack | str, *args: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment for ``supervisorctl ARGS`` of ``target`` (run it with both).

    ``target`` is a Stack or "host" / "vmK". Example::

        argv, env = supervisorctl_command("vm1", "status")
        subprocess.run(argv, env=env)


    supervisorctl reaches supervisord over the Unix socket in the run directory, which every
    namespace sees, so it runs in the root namespace whatever the stack.
    """
    stack = as_stack(target)
    argv = [str(venv_bin() / "supervisorctl"), "-c", str(stack.conf), *args]
    return argv, stack.env()


def supervisorctl(target: Stack | str, *args: str, check: bool = True) -> str:
    """Run ``supervisorctl ARGS`` for ``target`` and return its output."""
    argv, env = supervisorctl_command(target, *args)
    return ip.run(argv, env=env, check=check, timeout=60).stdout


def program_pid(target: Stack | str, program: str) -> int | None:
    """The pid of ``program`` (e.g. "mux") under ``target``'s supervisord; None if not running."""
    argv, env = supervisorctl_command(target, "pid", program)
    out = ip.run(argv, env=env, check=False).stdout.strip()
    return int(out) if out.isdigit() and int(out) > 0 else None


def stack_processes(stack: Stack) -> list[psutil.Process]:
    """Every live process of ``stack``: its supervisord and all it started (by environment)."""
    mine = str(stack.run_dir)
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get("VMBUSIFY_RUN_DIR") == mine:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def supervisord_process(stack: Stack) -> psutil.Process | None:
    """The live supervisord of ``stack`` according to its pid file, if any."""
    try:
        pid = int(stack.pidfile.read_text().strip())
        proc = psutil.Process(pid)
        env = proc.environ()
        cmdline = " ".join(proc.cmdline())
    except (OSError, ValueError, psutil.Error):
        return None
    if "supervisord" not in cmdline or env.get("VMBUSIFY_RUN_DIR") != str(stack.run_dir):
        return None
    return proc


def is_current(stack: Stack, proc: psutil.Process) -> bool:
    """Whether ``proc`` runs the stack's programs (this checkout's or its release's) with this
    stack's config."""
    try:
        env = proc.environ()
    except psutil.Error:
        return False
    want = stack.env()
    return all(env.get(k) == want[k] for k in ("VMBUSIFY_CONFIG", "VMBUSIFY_BIN")) and str(
        stack.conf) in proc.cmdline()


def start(stack: Stack, timeout: float = 20.0) -> int:
    """Start ``stack``'s supervisord (it daemonizes) and wait until it answers; its pid.

    Already running from this checkout: nothing to do. Running from another checkout or with
    another config: stopped and started again.
    """
    running = supervisord_process(stack)
    if running is not None:
        if is_current(stack, running):
            return running.pid
        log.info("%s: supervisord %d runs another checkout's programs; restarting", stack.name,
                 running.pid)
        stop(stack)
    stop_leftovers(stack)
    stack.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # -d and -j repeat the run directory on the command line, so `ps` shows whose it is.
    argv = [str(venv_bin() / "supervisord"), "-c", str(stack.conf),
            "-d", str(stack.run_dir), "-j", str(stack.pidfile)]
    log.info("%s: starting supervisord%s%s", stack.name,
             f" in {stack.netns}" if stack.netns else "",
             f" (release {stack.release.ref})" if stack.release else "")
    ip.run(ip.ns_argv(stack.netns, argv), env=stack.env())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = supervisord_process(stack)
        if proc is not None and stack.socket.exists():
            argv_ctl, env = supervisorctl_command(stack, "pid")
            if ip.run(argv_ctl, env=env, check=False).stdout.strip() == str(proc.pid):
                return proc.pid
        time.sleep(0.1)
    raise LabError(f"{stack.name}: supervisord did not come up in {timeout:g} s; "
                   f"see {stack.logfile}")


def stop(*targets: Stack, timeout: float = 30.0) -> None:
    """Stop stacks: ``supervisorctl shutdown`` to all at once, then kill whatever is left."""
    running = [(stack, supervisord_process(stack)) for stack in targets]
    for stack, proc in running:
        if proc is not None:
            log.info("%s: shutting supervisord %d down", stack.name, proc.pid)
            try:
                supervisorctl(stack, "shutdown", check=False)
            except LabError as exc:  # e.g. its release's tree is gone: killed below
                log.warning("%s", exc)
    for stack, proc in running:
        if proc is None:
            continue
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            log.warning("%s: supervisord %d ignored shutdown; killing it", stack.name, proc.pid)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # it daemonized: its own process group
            except (ProcessLookupError, PermissionError):
                pass
    for stack in targets:
        stop_leftovers(stack)
        for path in (stack.pidfile, stack.socket):
            path.unlink(missing_ok=True)


def stop_leftovers(stack: Stack) -> None:
    """Kill every process of ``stack`` still alive (programs orphaned by a killed supervisord)."""
    left = stack_processes(stack)
    if left:
        log.info("%s: killing leftover processes %s", stack.name, [p.pid for p in left])
        ip.kill_pids([p.pid for p in left])
