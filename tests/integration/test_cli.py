"""The CLIs as an operator meets them (issue 17), as real processes against a real host and
guest stack (exec_harness: two muxes, the command listener, the exec worker; no root):
``--version``, ``--json`` on every command that reports, shell completion with VM ids,
``vmbusifyexec -i VMID`` opening the login shell, ``--tty=auto``, ``vmbusify check-config``,
the man pages, and ``vmbusifyctl forward``'s checks before it listens.

What needs root (other users, supervisord's hints, the lab) is in test_cli_access.py and
tests/e2e/test_cli_lab.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.exec_harness import ExecStack, start_stack
from tests.integration.harness import BIN, free_port
from vmbusify import __version__

CTL = str(BIN / "vmbusifyctl")
EXEC = str(BIN / "vmbusifyexec")
VMBUSIFY = str(BIN / "vmbusify")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExecStack]:
    s = start_stack(tmp_path_factory.mktemp("cli"))
    try:
        yield s
    finally:
        s.stop()


def run(argv: list[str], env: dict[str, str] | None = None, input: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, input=input, capture_output=True, text=True,
                          timeout=timeout, check=False,
                          stdin=None if input is not None else subprocess.DEVNULL)


def ctl(stack: ExecStack, *args: str) -> subprocess.CompletedProcess[str]:
    return run([CTL, *args], env=stack.env)


def test_version() -> None:
    for prog in (CTL, EXEC, VMBUSIFY):
        p = run([prog, "--version"], env={**os.environ, "VMBUSIFY_CONFIG": "/nonexistent"})
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip().endswith(__version__), p.stdout
    assert run([CTL, "-V"]).stdout == f"vmbusifyctl {__version__}\n"
    assert run([EXEC, "-V"]).stdout == f"vmbusifyexec {__version__}\n"


def test_json_on_every_command_that_reports(stack: ExecStack) -> None:
    """Parsed, with the keys docs/cli.md promises."""
    st = json.loads(ctl(stack, "status", "--json").stdout)
    assert st["role"] == "host" and st["vms"][0]["vmid"] == "vm1"
    vms = json.loads(ctl(stack, "list", "--json").stdout)
    assert [(vm["vmid"], vm["state"]) for vm in vms] == [("vm1", "connected")]
    assert isinstance(vms[0]["ips"], list)
    pong = json.loads(ctl(stack, "ping", "vm1", "--json").stdout)
    assert pong["vmid"] == "vm1" and pong["rtt_ms"] >= 0
    vm = json.loads(ctl(stack, "connect", "vm1", "--json").stdout)
    assert (vm["vmid"], vm["state"]) == ("vm1", "connected")
    if vms[0]["ips"]:
        ip = vms[0]["ips"][0]
        assert json.loads(ctl(stack, "vmid", ip, "--json").stdout) == {"ip": ip, "vmid": "vm1"}
    # The text forms are unchanged.
    assert ctl(stack, "list").stdout.startswith("vm1\tconnected\t")
    assert ctl(stack, "list", "-q").stdout == "vm1\n"
    assert re.fullmatch(r"vm1: rtt [0-9.]+ ms\n", ctl(stack, "ping", "vm1").stdout)
    # An error is one line on stderr and exit status 1, with --json as without.
    p = ctl(stack, "ping", "vm9", "--json")
    assert (p.returncode, p.stdout) == (1, "")
    assert p.stderr.startswith("vmbusifyctl: ") and p.stderr.count("\n") == 1


def test_disconnect_json(stack: ExecStack) -> None:
    vm = json.loads(ctl(stack, "disconnect", "vm1", "--json").stdout)
    assert (vm["vmid"], vm["state"]) == ("vm1", "disconnected")
    vm = json.loads(ctl(stack, "connect", "vm1", "--json").stdout)
    assert vm["state"] == "connected"


def _bash_complete(stack: ExecStack, words: list[str]) -> list[str]:
    """What bash offers for the last of ``words`` with `vmbusifyctl completion bash` loaded."""
    script = (f'source <("{CTL}" completion bash)\n'
              f"COMP_WORDS=({' '.join(json.dumps(w) for w in words)})\n"
              f"COMP_CWORD={len(words) - 1}\nCOMPREPLY=()\n"
              f'if [[ ${{COMP_WORDS[0]}} == *vmbusifyexec ]]; then _vmbusifyexec_completion\n'
              f'else _vmbusifyctl_completion vmbusifyctl; fi\n'
              'printf "%s\\n" "${COMPREPLY[@]}"\n')
    env = {**stack.env, "PATH": f"{BIN}:{os.environ['PATH']}"}
    p = run(["bash", "--norc", "-c", script], env=env)
    assert p.returncode == 0, p.stderr
    return [line for line in p.stdout.splitlines() if line]


def test_bash_completion_completes_commands_and_vm_ids(stack: ExecStack) -> None:
    assert {"status", "list", "ping", "forward", "completion"} <= set(
        _bash_complete(stack, ["vmbusifyctl", ""]))
    assert _bash_complete(stack, ["vmbusifyctl", "ping", ""]) == ["vm1"]
    assert _bash_complete(stack, ["vmbusifyctl", "ping", "x"]) == []
    # vmbusifyexec: the VM after its options, the command after the VM.
    assert _bash_complete(stack, [EXEC, ""]) == ["vm1"]
    assert _bash_complete(stack, [EXEC, "-i", "-e", "A=1", ""]) == ["vm1"]
    assert "--tty=auto" in _bash_complete(stack, [EXEC, "--tt"])
    assert "uname" in _bash_complete(stack, [EXEC, "vm1", "unam"])


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completion_completes_vm_ids(stack: ExecStack, tmp_path: Path) -> None:
    script = tmp_path / "c.fish"
    script.write_text(ctl(stack, "completion", "fish").stdout)
    env = {**stack.env, "PATH": f"{BIN}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    for line, want in (("vmbusifyctl ping ", "vm1"), ("vmbusifyexec ", "vm1"),
                       ("vmbusifyexec -i ", "vm1")):
        p = run(["fish", "--no-config", "-c", f"source {script}; complete -C'{line}'"],
                env=env)
        assert [w.split("\t")[0] for w in p.stdout.splitlines()] == [want], (line, p)


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_loads(stack: ExecStack, tmp_path: Path) -> None:
    script = tmp_path / "c.zsh"
    script.write_text(ctl(stack, "completion", "zsh").stdout)
    assert run(["zsh", "-n", str(script)]).returncode == 0
    load = (f"autoload -U compinit; compinit -u -d {tmp_path}/zc; "
            f"source {script}; whence -w _vmbusifyexec _vmbusifyctl_completion")
    p = run(["zsh", "-f", "-c", load],
            env={**stack.env, "HOME": str(tmp_path)})
    assert p.stdout.split() == ["_vmbusifyexec:", "function", "_vmbusifyctl_completion:",
                                "function"], p


def test_exec_completion_script_alone() -> None:
    p = run([EXEC, "--completion", "bash"])
    assert p.returncode == 0 and "complete -o default" in p.stdout
    assert "_vmbusifyctl" not in p.stdout
    p = run([EXEC, "--completion", "tcsh"])
    assert p.returncode == 255 and "--completion wants bash, zsh or fish" in p.stderr


def test_interactive_without_program_is_the_login_shell(stack: ExecStack) -> None:
    """As ssh does: the user's shell from the guest's account, started as a login shell;
    without a local terminal no pty (--tty=auto)."""
    p = run([EXEC, "-i", "vm1"], env=stack.env,
            input='ps -o args= -p $$; tty; echo "shell=$SHELL"; exit 7\n')
    assert p.returncode == 7, p.stderr
    args, tty, shell = p.stdout.splitlines()
    assert shell.startswith("shell=/") and args == f"{shell[len('shell='):]} -l"
    assert tty == "not a tty"


def test_it_opens_the_login_shell_on_a_terminal(stack: ExecStack) -> None:
    """-it from a terminal (script(1) gives this process one): a pty, a login shell."""
    if shutil.which("script") is None:
        pytest.skip("script(1) is not installed")
    typed = "ps -o args= -p $$; tty; exit 3\r"
    command = f"sleep 2; printf '{typed}'; sleep 5"
    p = subprocess.run(f"({command}) | script -qec '{EXEC} -it vm1' /dev/null",
                       shell=True, env=stack.env, capture_output=True, text=True, timeout=60,
                       check=False)
    out = p.stdout.replace("\r", "")
    assert re.search(r"^/\S+ -l$", out, re.MULTILINE), out
    assert re.search(r"^/dev/pts/\d+$", out, re.MULTILINE), out
    assert p.returncode == 3, (p.returncode, out)


def test_tty_auto_follows_the_local_terminal(stack: ExecStack) -> None:
    p = run([EXEC, "--tty=auto", "vm1", "tty"], env=stack.env)
    assert (p.returncode, p.stdout) == (1, "not a tty\n")  # no local terminal: no pty
    p = run([EXEC, "--tty=always", "-i", "vm1", "--", "sh", "-c", "tty; exit 0"],
            env=stack.env, input="")
    assert re.match(r"/dev/pts/\d+", p.stdout), p
    for args, message in (([EXEC, "--tty=maybe", "vm1", "true"], "--tty wants one of"),
                          ([EXEC, "vm1"], "missing PROGRAM (or -i, or -it, for a login shell)")
                          ):
        p = run(args, env=stack.env)
        assert p.returncode == 255 and message in p.stderr, p


BAD_CONFIG = """\
role = "host"
run_dir = "run"
[proxy]
allow = ["10.0.0.0/33", "10.0.0.0/8:99999"]
listen = "127.0.0.1:70000"
[subnet]
cidr = "100.77.0.0/40"
mtu = 100
[[vms]]
vmid = "vm1"
address = "vsock:x"
[tunnel]
dead_after = "soon"
"""


def test_check_config_lists_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_CONFIG)
    p = run([VMBUSIFY, "check-config", str(bad)])
    assert p.returncode == 1 and p.stdout == ""
    lines = p.stderr.splitlines()
    keys = [line.split(": ")[1] for line in lines]
    assert all(line.startswith(f"{bad}: ") for line in lines)
    assert sorted(keys) == sorted(["tunnel.dead_after", "run_dir", "vms[0].address",
                                   "proxy.listen", "proxy.allow[0]", "proxy.allow[1]",
                                   "subnet.cidr", "subnet.mtu"]), lines
    # A program started with it stops at once with the first, and says where the rest are.
    p = run([VMBUSIFY, "mux", "--config", str(bad)])
    assert p.returncode == 2
    assert p.stderr == (f"vmbusify mux: {lines[0]} (and {len(lines) - 1} more problems: "
                        "vmbusify check-config lists them)\n")
    # The fix, as the lines say, makes it pass; the shipped examples pass.
    good = tmp_path / "good.toml"
    good.write_text('role = "host"\n[proxy]\nallow = ["10.0.0.0/8:80,443"]\n'
                    '[subnet]\ncidr = "100.77.0.0/24"\n')
    p = run([VMBUSIFY, "check-config", str(good)])
    assert (p.returncode, p.stdout, p.stderr) == (0, f"{good}: ok\n", "")
    root = Path(__file__).resolve().parents[2]
    for name in ("host.toml", "guest.toml"):
        assert run([VMBUSIFY, "check-config", "-q", str(root / "packaging" / name)]
                   ).returncode == 0
    p = run([VMBUSIFY, "check-config", str(tmp_path / "missing.toml")])
    assert p.returncode == 1 and "does not exist" in p.stderr


def test_man_pages_come_from_the_help(tmp_path: Path) -> None:
    p = run([VMBUSIFY, "man", "--output", str(tmp_path)])
    assert p.returncode == 0, p.stderr
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["vmbusify.1", "vmbusifyctl.1", "vmbusifyexec.1"]
    if shutil.which("man") is None:
        return
    env = {k: v for k, v in os.environ.items() if k != "MAN_KEEP_FORMATTING"}
    env["MANWIDTH"] = "200"
    pages = {}
    for name in names:
        r = run(["man", "--warnings", "-l", str(tmp_path / name)], env=env)
        assert r.returncode == 0 and r.stderr == "", (name, r.stderr)
        pages[name] = r.stdout
    ctl_page = pages["vmbusifyctl.1"]
    for command in ("status", "list", "ping", "vmid", "connect", "disconnect", "forward",
                    "completion"):
        assert f"vmbusifyctl {command} " in ctl_page, command
    help_text = run([CTL, "ping", "--help"]).stdout
    assert "Round-trip time of one PING through the tunnel to VMID." in help_text
    assert "Round-trip time of one PING through the tunnel to VMID." in ctl_page
    exec_page = pages["vmbusifyexec.1"]
    for option in ("--interactive", "--tty=WHEN", "--timeout SECONDS", "--completion SHELL"):
        assert option in exec_page, option
    assert "EXIT STATUS" in exec_page
    assert "vmbusify check-config" in pages["vmbusify.1"]


def test_forward_checks_the_vm_and_the_proxy_first(stack: ExecStack) -> None:
    """An unknown VM and a proxy that is not there are refused before anything listens, in
    words (this stack runs no proxy worker)."""
    port = free_port()
    # The stack's config, with its proxy on a port where nothing listens (the default port may
    # be another stack's, such as the lab host's proxy).
    config = stack.pair.root / "host-no-proxy.toml"
    config.write_text(stack.pair.host.config_path.read_text()
                      + f'[proxy]\nlisten = "127.0.0.1:{free_port()}"\n')
    env = {**stack.env, "VMBUSIFY_CONFIG": str(config)}
    p = run([CTL, "forward", "nosuchvm", f"{port}:localhost:22"], env=env, timeout=20)
    assert p.returncode == 1
    assert p.stderr == "vmbusifyctl: forward: unknown VM 'nosuchvm' (this host knows vm1)\n"
    p = run([CTL, "forward", "vm1", f"{port}:localhost:22"], env=env, timeout=20)
    assert p.returncode == 1
    assert re.fullmatch(r"vmbusifyctl: forward: the proxy at 127\.0\.0\.1:\d+ is not running "
                        r"\(connection refused\): see \S*supervisorctl -s unix://\S+/"
                        r"supervisor\.sock status proxy\n", p.stderr), p.stderr
    assert "Errno" not in p.stderr


def test_reload_json(stack: ExecStack) -> None:
    doc = json.loads(ctl(stack, "reload", "--json").stdout)
    assert doc["kept"] == ["vm1"] and doc["added"] == [] and doc["dropped"] == []
