"""The host mux under the shipped supervisord holds more VMs than a service's default open-files
limit (1024) would let it: conf/supervisord.conf's minfds and the mux's own raise (issue 18).

Real processes: the shipped supervisord.conf with the shipped mux program, started as systemd
starts a service (soft RLIMIT_NOFILE 1024), and bench/fakeguest.py serving the fake guests,
each speaking HELLO and the shared-key AUTH as a guest mux does."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from vmbusify.mux.main import SPARE_FDS, check_fd_limit

REPO = Path(__file__).resolve().parents[2]
#: More tunnels than fit under 1024 descriptors.
VMS = 1100
#: Start a command with the soft open-files limit a systemd service starts with.
AS_A_SERVICE = ["sh", "-c", 'ulimit -Sn 1024 && exec "$0" "$@"']



def _minfds() -> int:
    for line in (REPO / "conf" / "supervisord.conf").read_text().splitlines():
        if line.startswith("minfds="):
            return int(line.split("=", 1)[1])
    return 1024


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if os.geteuid() != 0 and hard != resource.RLIM_INFINITY and hard < _minfds():
        pytest.skip(f"the hard open-files limit ({hard}) is below minfds; only root may "
                    "raise it")
    if hard != resource.RLIM_INFINITY and hard < 2 * VMS + 64:
        pytest.skip(f"the fake guests need {2 * VMS} descriptors; the hard limit is {hard}")
    key = tmp_path / "tunnel.key"
    key.write_bytes(os.urandom(32).hex().encode())
    key.chmod(0o600)
    (tmp_path / "g").mkdir()
    guests = subprocess.Popen([sys.executable, str(REPO / "bench" / "fakeguest.py"),
                               str(tmp_path / "g"), str(VMS), str(key)],
                              stdout=subprocess.PIPE, text=True)
    yield tmp_path, guests
    guests.terminate()
    guests.wait()


def test_the_shipped_supervisord_lets_the_mux_hold_more_than_1024_tunnels(
        stack: tuple[Path, subprocess.Popen[str]]) -> None:
    run, guests = stack
    assert guests.stdout is not None
    assert guests.stdout.readline().strip() == "listening"
    conf = run / "conf"
    (conf / "programs").mkdir(parents=True)
    shutil.copy(REPO / "conf" / "supervisord.conf", conf)
    shutil.copy(REPO / "conf" / "programs" / "mux.conf", conf / "programs")
    for d in ("run", "state", "control"):
        (run / d).mkdir(mode=0o700)
    (run / "vmbusify.toml").write_text(
        f'role = "host"\nrun_dir = "{run}/run"\nstate_dir = "{run}/state"\n'
        f'[control]\nlisten = "unix:{run}/control/control.sock"\n'
        + "".join(f'[[vms]]\nvmid = "vm{k}"\naddress = "unix:{run}/g/{k}.sock"\n'
                  f'key_file = "{run}/tunnel.key"\n' for k in range(VMS)))
    env = dict(os.environ, VMBUSIFY_CONFIG=str(run / "vmbusify.toml"),
               VMBUSIFY_RUN_DIR=str(run / "run"), VMBUSIFY_BIN=str(Path(sys.executable).parent))
    sup = subprocess.Popen([*AS_A_SERVICE, str(Path(sys.executable).parent / "supervisord"),
                            "-n", "-c", str(conf / "supervisord.conf")], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        count = 0
        while count < VMS and time.monotonic() < deadline:
            line = guests.stdout.readline()
            assert line, "the fake guests exited"
            if line.startswith("authenticated "):
                count = int(line.split()[1])
        log = (run / "run" / "mux.log").read_text(errors="replace")
        assert count == VMS, f"only {count} of {VMS} VMs connected; mux log:\n{log[-3000:]}"
        mux = next(c for c in psutil.Process(sup.pid).children() if "mux" in c.cmdline())
        soft, _ = mux.rlimit(psutil.RLIMIT_NOFILE)
        assert soft >= _minfds()
        assert mux.num_fds() > 1024
        assert "open-files limit" not in log
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(30)


def test_check_fd_limit_lifts_the_soft_limit_and_warns_when_too_low(
        caplog: pytest.LogCaptureFixture) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        limit = check_fd_limit(10)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == limit
        assert limit == hard or (hard == resource.RLIM_INFINITY and limit == 1 << 20)
        assert "open-files limit" not in caplog.text
        check_fd_limit(limit)  # one more VM than fits beside the spare descriptors
        assert f"open-files limit is {limit}, too low for {limit} VMs" in caplog.text
        assert str(SPARE_FDS) in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
