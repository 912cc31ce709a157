"""vmbusifyexec in the lab: the host's real stack runs programs inside simulated VMs (root).

Every command is the real `vmbusifyexec` on the host (root namespace, the lab host's
VMBUSIFY_CONFIG); programs run in the VM's namespace under its own supervisord. The TTY tests
drive a real terminal with tmux on a private socket.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from vmbusify.lab.access import command
from vmbusify.lab.testing import BIN, LabHandle

EXEC = str(BIN / "vmbusifyexec")


def exec_env() -> dict[str, str]:
    """The lab host's environment (its VMBUSIFY_CONFIG, the venv first on PATH)."""
    return command("host", ["true"])[1]


def run(*args: str, input: bytes | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([EXEC, *args], input=input, capture_output=True, env=exec_env(),
                          timeout=timeout, check=False,
                          stdin=None if input is not None else subprocess.DEVNULL)


def netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def marked(tag: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if tag in cmd and "vmbusifyexec" not in cmd and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def wait_gone(tag: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while marked(tag):
        assert time.monotonic() < deadline, [p.cmdline() for p in marked(tag)]
        time.sleep(0.1)


def unique() -> str:
    return f"{uuid.uuid4().int % 10**6 + 1000}.{uuid.uuid4().int % 90 + 10}"


def test_runs_inside_the_vm_with_separate_streams(lab: LabHandle) -> None:
    vm1 = lab.layout.vm("vm1")
    p = run("vm1", "--", "sh", "-c", "ip -o -4 addr show; echo to-stderr >&2; exit 5")
    assert p.returncode == 5
    assert vm1.sdn_ip in p.stdout.decode()
    assert p.stderr == b"to-stderr\n"
    p = run(vm1.sdn_ip, "--", "ip", "-o", "-4", "addr", "show")  # the VM by its address
    assert p.returncode == 0 and vm1.sdn_ip in p.stdout.decode()


def test_sort_reads_stdin_to_eof(lab: LabHandle) -> None:
    p = subprocess.run(["sh", "-c", f"printf 'b\\na\\n' | {EXEC} -i vm1 -- sort"],
                       capture_output=True, env=exec_env(), timeout=30, check=False)
    assert (p.returncode, p.stdout, p.stderr) == (0, b"a\nb\n", b"")


def test_exit_statuses(lab: LabHandle) -> None:
    assert run("vm1", "--", "sh", "-c", "kill -INT $$").returncode == 130
    p = run("vm2", "--", "no-such-program")
    assert p.returncode == 127 and p.stderr.count(b"\n") == 1
    p = run("vm2", "--", "/etc/passwd")  # not executable
    assert p.returncode == 126 and p.stderr.count(b"\n") == 1
    p = run("vm7", "--", "true")
    assert p.returncode == 255 and p.stderr == b"vmbusifyexec: unknown VM 'vm7'\n"


def test_timeout_kills_the_tree_in_the_vm(lab: LabHandle) -> None:
    tag = unique()
    p = run("--timeout", "1.5", "vm1", "--", "sh", "-c",
            f"sleep {tag} & (setsid sleep {tag} &); sleep {tag}")
    assert p.returncode == 124 and b"timed out" in p.stderr
    wait_gone(tag, 5)


def test_one_gigabyte_intact_and_memory_bounded(lab: LabHandle) -> None:
    """1 GiB of /dev/urandom, hashed in the VM and here; the reader stalls now and then."""
    script = ("{ head -c 1073741824 /dev/urandom | tee /dev/fd/3 | sha256sum >&2; } 3>&1")
    procs = {f"host {name}": lab.program_pid("host", name) for name in ("control", "mux")}
    procs |= {f"vm1 {name}": lab.program_pid("vm1", name) for name in ("mux", "exec")}
    assert all(procs.values()), procs
    before = {k: psutil.Process(pid).memory_info().rss for k, pid in procs.items() if pid}
    client = subprocess.Popen([EXEC, "vm1", "--", "sh", "-c", script], env=exec_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert client.stdout is not None and client.stderr is not None
    digest, got, peak = hashlib.sha256(), 0, dict(before)
    peak["client"] = 0
    while chunk := client.stdout.read(1 << 20):
        digest.update(chunk)
        got += len(chunk)
        if got % (128 << 20) < (1 << 20):
            time.sleep(1.0)  # a slow reader: everything upstream must wait, not buffer
            for k, pid in [*procs.items(), ("client", client.pid)]:
                assert pid
                peak[k] = max(peak[k], psutil.Process(pid).memory_info().rss)
    assert client.wait(60) == 0
    remote = client.stderr.read().split()[0].decode()
    assert got == 1 << 30
    assert digest.hexdigest() == remote
    assert peak["client"] < 64 << 20, peak
    for k, rss in before.items():
        assert peak[k] - rss < 64 << 20, (k, peak[k] - rss)


def test_many_execs_across_vms(lab: LabHandle) -> None:
    ips = {vm: lab.layout.vm(vm).sdn_ip for vm in ("vm1", "vm2")}

    def one(i: int) -> None:
        vm = ("vm1", "vm2")[i % 2]
        p = run(vm, "--", "sh", "-c", f"sleep 0.3; ip -o -4 addr show dev sdn0; exit {i}")
        assert p.returncode == i, p.stderr
        assert ips[vm] in p.stdout.decode()

    with ThreadPoolExecutor(20) as pool:
        list(pool.map(one, range(40)))


def test_signals_forwarded_into_the_vm(lab: LabHandle) -> None:
    proc = subprocess.Popen(
        [EXEC, "vm2", "--", "sh", "-c",
         'trap "echo got-hup; exit 9" HUP; echo ready; while :; do sleep 0.1; done'],
        env=exec_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(20) == 9
    assert proc.stdout.read() == b"got-hup\n"


@pytest.mark.parametrize("how", ["client killed", "tunnel dropped", "guest mux killed",
                                 "host listener killed"])
def test_no_orphans(lab: LabHandle, how: str) -> None:
    tag = unique()
    proc = subprocess.Popen([EXEC, "vm1", "--", "sh", "-c",
                             f"sleep {tag} & (setsid sleep {tag} &); echo ready; sleep {tag}"],
                            env=exec_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        vm_mux = lab.program_pid("vm1", "mux")
        assert vm_mux
        deadline = time.monotonic() + 5
        while len(marked(tag)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(marked(tag)) >= 4
        assert all(netns_of(p.pid) == netns_of(vm_mux) for p in marked(tag))  # in the VM
        if how == "client killed":
            proc.kill()
        elif how == "tunnel dropped":
            lab.ctl("disconnect", "vm1")
        elif how == "host listener killed":
            # supervisord restarts it; the host mux tells the guest its peer worker is gone
            listener = lab.program_pid("host", "control")
            assert listener
            os.kill(listener, signal.SIGKILL)
        else:
            os.kill(vm_mux, signal.SIGKILL)  # supervisord starts it again
        wait_gone(tag, 15)
        if how != "client killed":
            assert proc.wait(30) == 255
            assert proc.stderr is not None
            err = proc.stderr.read()
            assert err.startswith(b"vmbusifyexec: ") and err.count(b"\n") == 1, err
    finally:
        if proc.poll() is None:
            proc.kill()
        if how == "tunnel dropped":
            lab.ctl("connect", "vm1", "--timeout", "30")
        lab.wait_connected()
        deadline = time.monotonic() + 30
        while run("vm1", "--", "true").returncode != 0:  # the exec worker re-registered
            assert time.monotonic() < deadline
            time.sleep(0.5)


# --- a real terminal: tmux -------------------------------------------------------------------

class Tmux:
    """One tmux session on a private server socket, running a command in a fixed-size pane."""

    def __init__(self, sock: Path, name: str) -> None:
        self.sock, self.name = sock, name

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", str(self.sock), *args], capture_output=True,
                              text=True, check=True, timeout=10).stdout

    def start(self, shell_command: str, cols: int, rows: int) -> None:
        self.tmux("new-session", "-d", "-s", self.name, "-x", str(cols), "-y", str(rows),
                  shell_command)

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.name, *keys)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.name)

    def wait_for(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.screen())
            if m:
                return m
            assert time.monotonic() < deadline, f"{pattern!r} not on screen:\n{self.screen()}"
            time.sleep(0.1)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (bin/setup installs it)")
    t = Tmux(tmp_path / "tmux.sock", "vbexec")
    yield t
    subprocess.run(["tmux", "-S", str(t.sock), "kill-server"], capture_output=True, check=False)


def test_tty_shell_resize_and_ctrl_c(lab: LabHandle, tmux: Tmux, tmp_path: Path) -> None:
    script = tmp_path / "session.sh"
    script.write_text(
        f"export VMBUSIFY_CONFIG={exec_env()['VMBUSIFY_CONFIG']}\n"
        f"{EXEC} -it vm1 -- env PS1='vm1$ ' bash --norc --noprofile\n"
        "echo exit=$?\n"
        "stty -a | tr ' ;' '\\n\\n' | grep -x -- '-\\{0,1\\}icanon'\n"
        "sleep 60\n")
    tmux.start(f"sh {script}", 120, 40)
    tmux.wait_for(r"vm1\$")
    tmux.keys("ip -o -4 addr show dev sdn0; echo sum=$((6*7))", "Enter")
    tmux.wait_for(r"sum=42")
    assert lab.layout.vm("vm1").sdn_ip in tmux.screen()
    tmux.keys("clear; stty size", "Enter")
    tmux.wait_for(r"(?m)^40 120\s*$")
    tmux.tmux("resize-window", "-t", "vbexec", "-x", "100", "-y", "30")
    tmux.keys("clear; stty size", "Enter")
    tmux.wait_for(r"(?m)^30 100\s*$")
    tag = unique()
    tmux.keys(f"sleep {tag}", "Enter")
    deadline = time.monotonic() + 10
    while not marked(tag):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    tmux.keys("C-c")
    wait_gone(tag, 5)
    tmux.keys("echo still=$((1+1))", "Enter")
    tmux.wait_for(r"still=2")  # the shell survived its foreground program's SIGINT
    tmux.keys("exit 3", "Enter")
    tmux.wait_for(r"exit=3")
    tmux.wait_for(r"(?m)^icanon")  # the local terminal is out of raw mode again


def test_a_message_after_raw_mode_starts_a_line_of_its_own(lab: LabHandle, tmux: Tmux,
                                                           tmp_path: Path) -> None:
    """The remote program may leave the cursor after a prompt: vmbusifyexec's own message
    (here --timeout's) must not be glued to it."""
    script = tmp_path / "session.sh"
    script.write_text(
        f"export VMBUSIFY_CONFIG={exec_env()['VMBUSIFY_CONFIG']}\n"
        f"{EXEC} -it --timeout 1 vm1 -- sh -c 'printf \"prompt> \"; sleep 30'\n"
        "echo exit=$?\n"
        "sleep 60\n")
    tmux.start(f"sh {script}", 120, 20)
    tmux.wait_for(r"exit=124")
    screen = tmux.screen()
    assert re.search(r"(?m)^prompt> *$", screen), screen
    assert re.search(r"(?m)^vmbusifyexec: timed out after 1s", screen), screen


def test_tilde_dot_ends_a_session_whose_program_ignores_ctrl_c(lab: LabHandle, tmux: Tmux,
                                                             tmp_path: Path) -> None:
    """In raw mode Ctrl-C is only a key: ~. at the start of a line is the way out, as in ssh,
    and the remote tree is killed. A ~ anywhere else is typed as it is."""
    tag = unique()
    script = tmp_path / "session.sh"
    script.write_text(
        f"export VMBUSIFY_CONFIG={exec_env()['VMBUSIFY_CONFIG']}\n"
        f"{EXEC} -it vm1 -- sh -c 'trap \"\" INT; PS1=\"vm1$ \" sh; sleep {tag}'\n"
        "echo exit=$?\n"
        "sleep 60\n")
    tmux.start(f"sh {script}", 120, 30)
    tmux.wait_for(r"vm1\$")
    tmux.keys("echo a~b; exit", "Enter")  # a ~ inside a line is typed
    tmux.wait_for(r"(?m)^a~b")
    deadline = time.monotonic() + 10
    while not marked(tag):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    tmux.keys("C-c")  # ignored by the remote program: nothing ends
    time.sleep(0.5)
    assert marked(tag) and "exit=" not in tmux.screen()
    tmux.keys("Enter")
    tmux.keys("~.")
    tmux.wait_for(r"exit=255")
    assert re.search(r"(?m)^vmbusifyexec: disconnected \(~\.\)", tmux.screen()), tmux.screen()
    wait_gone(tag, 5)


def test_user_and_workdir(lab: LabHandle) -> None:
    p = run("-u", "nobody", "-w", "/tmp", "vm1", "--", "sh", "-c", 'id -un; pwd; echo "$USER"')
    assert (p.returncode, p.stdout) == (0, b"nobody\n/tmp\nnobody\n"), p.stderr
    p = run("-u", "nobody", "-t", "vm2", "--", "id", "-un")
    assert p.returncode == 0 and p.stdout.strip() == b"nobody"
    p = run("-u", "no-such-user", "vm1", "--", "true")
    assert p.returncode == 126 and p.stderr == b"vmbusifyexec: no such user: no-such-user\n"


def test_tty_with_piped_stdin_ends_at_eof(lab: LabHandle) -> None:
    """A pty cannot be half-closed: EOF on stdin is typed as the terminal's EOF character."""
    p = run("-it", "vm1", "--", "sort", input=b"b\na\n", timeout=20)
    assert p.returncode == 0
    assert p.stdout.replace(b"\r\n", b"\n").endswith(b"a\nb\n")
