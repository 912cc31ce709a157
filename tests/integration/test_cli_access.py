"""A user who is not root is told once what access the CLIs need and how to get it (issue
17), and following that advice works: each test does what the message says as its next step.

Root only (setpriv, useradd). A group and a user are made for this module (``vbcgrp``,
``vbcuser``, removed afterwards) and the host's config grants the group (``[control]
group``), as the default group ``vmbusify`` would be, without making a group that other
stacks on this shared machine would start granting things to.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import BIN, Pair, make_pair

pytestmark = pytest.mark.root

GROUP, USER = "vbcgrp", "vbcuser"
CTL = str(BIN / "vmbusifyctl")
EXEC = str(BIN / "vmbusifyexec")


def run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          cwd="/", stdin=subprocess.DEVNULL)


def as_user(argv: list[str], groups: str = "--init-groups") -> subprocess.CompletedProcess[str]:
    """``argv`` as USER: ``--init-groups`` is a fresh login (the groups of the group
    database), ``--clear-groups`` a session started before the user joined a group."""
    return run(["setpriv", f"--reuid={USER}", "--regid=nogroup", groups, *argv])


@pytest.fixture(scope="module")
def host() -> Iterator[Pair]:
    made = []
    if run(["getent", "group", GROUP]).returncode != 0:
        assert run(["groupadd", "--system", GROUP]).returncode == 0
        made.append(["groupdel", GROUP])
    if run(["getent", "passwd", USER]).returncode != 0:
        p = run(["useradd", "--system", "--no-create-home", "--gid", "nogroup",
                 "--shell", "/usr/sbin/nologin", USER])
        assert p.returncode == 0, p.stderr
        made.insert(0, ["userdel", USER])
    # Not under pytest's tmp_path (0700 all the way up): other users must be able to walk in.
    base = Path(tempfile.mkdtemp(prefix="vb-cli-", dir="/tmp"))
    base.chmod(0o711)
    pair = make_pair(base, control_extra=f'group = "{GROUP}"\n')
    with open(base / "control.log", "ab") as log:
        control = subprocess.Popen([str(BIN / "vmbusify"), "control", "--config",
                                    str(pair.host.config_path)],
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while (p := run([CTL, "--config", str(pair.host.config_path), "list"])).returncode:
            assert time.monotonic() < deadline, p.stderr
            time.sleep(0.3)
        yield pair
    finally:
        control.terminate()
        control.wait(15)
        pair.stop()
        shutil.rmtree(base, ignore_errors=True)
        for argv in made:
            run(argv)


def _one_line(p: subprocess.CompletedProcess[str], prog: str) -> str:
    assert p.stderr.startswith(f"{prog}: ") and p.stderr.count("\n") == 1, p.stderr
    return p.stderr


def test_a_user_outside_the_group_is_told_once_and_the_advice_works(host: Pair) -> None:
    config = str(host.host.config_path)
    run(["gpasswd", "-d", USER, GROUP])  # not a member (again)
    token = Path(config).parent / "host-control" / "control.token"
    for argv, prog, code in (([CTL, "--config", config, "status"], "vmbusifyctl", 1),
                             ([EXEC, "--config", config, "vm1", "true"], "vmbusifyexec", 255)):
        p = as_user(argv)
        assert p.returncode == code
        line = _one_line(p, prog)
        assert line == (f"{prog}: permission denied on {token}: {prog} needs root or group "
                        f"{GROUP}: ask an administrator to run: sudo usermod -aG {GROUP} "
                        f"{USER} (then log in again), or run it as root (sudo {prog} ...)\n")
    # The advice, as an administrator runs it (root here: no sudo needed), then a new login.
    advice = re.search(r"run: sudo (usermod .+?) \(then", line)
    assert advice
    assert run(shlex.split(advice.group(1))).returncode == 0
    # The session from before the change does not have the group yet: said so.
    p = as_user([CTL, "--config", config, "status"], groups="--clear-groups")
    assert p.returncode == 1
    assert _one_line(p, "vmbusifyctl").endswith(
        f"you are in group {GROUP}, but this login session is not yet: log in again (or "
        f"start a shell with: newgrp {GROUP})\n")
    # Logged in again: it works.
    p = as_user([CTL, "--config", config, "list", "-q"])
    assert (p.returncode, p.stdout) == (0, "vm1\n"), p.stderr
    # vmbusifyexec gets through too: the listener answers (this stack runs no exec worker).
    p = as_user([EXEC, "--config", config, "vm1", "id", "-u"])
    assert "the command executor is not running on vm1" in p.stderr, p.stderr
    run(["gpasswd", "-d", USER, GROUP])


def test_an_unreadable_config_is_the_same_one_message(host: Pair, tmp_path: Path) -> None:
    config = Path(tempfile.mkdtemp(prefix="vb-cli-conf-", dir="/tmp")) / "vmbusify.toml"
    try:
        config.parent.chmod(0o755)
        config.write_text(host.host.config_path.read_text())
        config.chmod(0o600)
        p = as_user([CTL, "--config", str(config), "status"])
        assert p.returncode == 1
        assert _one_line(p, "vmbusifyctl").startswith(
            f"vmbusifyctl: permission denied on {config}: vmbusifyctl needs root or group "
            "vmbusify")
        p = as_user([EXEC, "--config", str(config), "vm1", "true"])
        assert p.returncode == 255
        assert f"permission denied on {config}" in _one_line(p, "vmbusifyexec")
        # Root, which the message offers too, reads it.
        assert run([CTL, "--config", str(config), "list", "-q"]).stdout == "vm1\n"
    finally:
        shutil.rmtree(config.parent, ignore_errors=True)
