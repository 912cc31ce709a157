"""The CLIs on the lab as a new user meets them (issue 17): found without any variable when
one lab is running, told exactly what to export when several are, and every hint a command
that works as typed: each test runs the hint it was given as its next step.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.harness import BIN, free_port
from vmbusify.lab.layout import LAB_ROOT
from vmbusify.lab.testing import LabHandle

CTL = str(BIN / "vmbusifyctl")
EXEC = str(BIN / "vmbusifyexec")
HOST_CONFIG = LAB_ROOT / "host" / "vmbusify.toml"


def _env(**extra: str) -> dict[str, str]:
    """This environment without the variables that name a config or a lab."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VMBUSIFY_CONFIG", "VMBUSIFY_LAB_INSTANCE")}
    return {**env, **extra}


def run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env or _env(VMBUSIFY_CONFIG=str(HOST_CONFIG)),
                          capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)


def _hint(stderr: str) -> list[str]:
    """The command a message points at (after its last "see ")."""
    m = re.search(r": see (.+)$", stderr.strip())
    assert m, stderr
    return shlex.split(m.group(1))


def _wait_status(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (p := run([CTL, "status"])).returncode != 0:
        assert time.monotonic() < deadline, p.stderr
        time.sleep(0.5)


def test_a_listener_that_is_down_comes_with_a_command_that_shows_it(lab: LabHandle) -> None:
    lab.supervisorctl("host", "stop", "control")
    try:
        for argv, code in (([CTL, "status"], 1), ([EXEC, "vm1", "true"], 255)):
            p = run(argv)
            assert p.returncode == code, p
            assert "command listener" in p.stderr and "is not running" in p.stderr
            assert p.stderr.count("\n") == 1
            # The next step, as typed: supervisorctl reaches the lab host's supervisord.
            shown = subprocess.run(_hint(p.stderr), capture_output=True, text=True,
                                   timeout=30, check=False)
            assert re.match(r"control\s+STOPPED", shown.stdout), shown
    finally:
        lab.supervisorctl("host", "start", "control")
    _wait_status()


def test_forward_says_in_words_that_the_proxy_is_down(lab: LabHandle) -> None:
    port = free_port()
    fwd = subprocess.Popen([CTL, "forward", "vm1", f"{port}:localhost:22"],
                           env=_env(VMBUSIFY_CONFIG=str(HOST_CONFIG)),
                           stderr=subprocess.PIPE, text=True)
    try:
        assert fwd.stderr is not None
        assert "forwarding" in fwd.stderr.readline()
        lab.supervisorctl("host", "stop", "proxy")
        # A connection to a running forward whose proxy went away: one line in words.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.settimeout(10)
            assert s.recv(100) == b""
        line = fwd.stderr.readline()
        assert "the proxy at 127.0.0.1:" in line and "is not running" in line, line
        assert "Errno" not in line
        # A new forward is refused before it listens, with the command that shows why.
        p = run([CTL, "forward", "vm1", f"{free_port()}:localhost:22"])
        assert p.returncode == 1 and "is not running (connection refused)" in p.stderr
        shown = subprocess.run(_hint(p.stderr), capture_output=True, text=True, timeout=30,
                               check=False)
        assert re.match(r"proxy\s+STOPPED", shown.stdout), shown
    finally:
        fwd.terminate()
        fwd.wait(15)
        lab.supervisorctl("host", "start", "proxy")


def test_the_lab_instance_variable_names_the_lab(lab: LabHandle) -> None:
    instance = os.environ.get("VMBUSIFY_LAB_INSTANCE", "")
    if not instance:
        pytest.skip("the default lab: VMBUSIFY_LAB_INSTANCE names no instance")
    p = run([CTL, "list", "-q"], env=_env(VMBUSIFY_LAB_INSTANCE=instance))
    assert (p.returncode, p.stdout) == (0, "vm1\nvm2\n"), p
    p = run([EXEC, "vm1", "ip", "-4", "-o", "addr", "show", "dev", "sdn0"],
            env=_env(VMBUSIFY_LAB_INSTANCE=instance))
    assert p.returncode == 0 and " 198.19.1.10/" in p.stdout, p
    p = run([CTL, "status"], env=_env(VMBUSIFY_LAB_INSTANCE="nosuch"))
    assert p.returncode == 1
    assert "VMBUSIFY_LAB_INSTANCE=nosuch, but that lab is not up" in p.stderr


def _in_a_run_of_its_own(tmp_path: Path, labs: list[str], script: str
                         ) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (sh) in a mount namespace whose /run holds only ``labs``: this lab's
    directory under each of those names (other labs on this machine are out of sight)."""
    if Path("/etc/vmbusify/vmbusify.toml").exists():
        pytest.skip("this machine has /etc/vmbusify/vmbusify.toml, which comes first")
    keep = tmp_path / "lab"
    keep.mkdir(exist_ok=True)
    binds = "".join(f"mkdir -p /run/{name} && mount --bind {keep} /run/{name} && "
                    for name in labs)
    wrapper = (f"mount --make-rprivate / && mount --bind {LAB_ROOT} {keep} && "
               f"mount -t tmpfs vbtest /run && {binds}exec sh -c {shlex.quote(script)}")
    return subprocess.run(["unshare", "--mount", "sh", "-c", wrapper], env=_env(),
                          capture_output=True, text=True, timeout=120, check=False)


def test_with_no_config_the_one_running_lab_is_used(lab: LabHandle, tmp_path: Path) -> None:
    """No /etc/vmbusify/vmbusify.toml, no variable, one lab: both CLIs just work."""
    p = _in_a_run_of_its_own(tmp_path, [LAB_ROOT.name],
                             f"{CTL} list -q && {EXEC} vm2 ip -4 -o addr show dev sdn0")
    assert p.returncode == 0 and p.stdout.startswith("vm1\nvm2\n"), p
    assert " 198.19.2.10/" in p.stdout, p


def test_with_several_labs_the_message_says_what_to_export(lab: LabHandle,
                                                           tmp_path: Path) -> None:
    names = sorted([LAB_ROOT.name, "vmbusify-lab-zz9"])
    p = _in_a_run_of_its_own(tmp_path, names, f"{CTL} status")
    assert p.returncode == 1
    assert p.stderr.startswith("vmbusifyctl: no /etc/vmbusify/vmbusify.toml and 2 labs are "
                               "running: pick one: export VMBUSIFY_CONFIG="), p.stderr
    exports = re.findall(r"export VMBUSIFY_CONFIG=\S+?(?=,|\n|$)", p.stderr)
    assert len(exports) == 2
    # The next step, as typed: the export the message gave for this lab, then the command.
    ours = next(e for e in exports if f"/{LAB_ROOT.name}/" in e)
    p = _in_a_run_of_its_own(tmp_path, names, f"{ours} && {CTL} list -q")
    assert (p.returncode, p.stdout) == (0, "vm1\nvm2\n"), p
