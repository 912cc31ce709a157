"""The guest package (packaging/build-guest.py) installs into a minimal Debian root filesystem
with no network, on Debian's own python3 and libraries, and its guest serves a host.

The root filesystem is Debian's minbase plus the package's dependencies (python3,
python3-zmq, python3-msgpack, python3-psutil, python3-click, supervisor), made by mmdebstrap
from the mirror this machine's apt is configured for (the only network use), cached as a
tarball under /var/cache/vmbusify-lab (VMBUSIFY_CACHE_DIR elsewhere): the first run takes
about a minute, later ones seconds. Everything in the root filesystem then runs through
``unshare --net --mount --pid`` + chroot: a network namespace with nothing but lo, a mount
namespace for its /proc, and a PID namespace whose end kills whatever was left.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEPENDS = ["python3", "python3-zmq", "python3-msgpack", "python3-psutil", "python3-click",
           "supervisor"]
CACHE = Path(os.environ.get("VMBUSIFY_CACHE_DIR", "/var/cache/vmbusify-lab"))
#: pyproject dependency -> its Debian package (as packaging/build-guest.py maps them).
DEBIAN_OF = {"psutil": "python3-psutil", "pyzmq": "python3-zmq",
             "msgpack": "python3-msgpack", "supervisor": "supervisor", "click": "python3-click"}
#: The programs whose imports must all resolve on the guest (what supervisord starts there).
GUEST_MODULES = ["vmbusify.cli.main", "vmbusify.cli.ctl", "vmbusify.cli.exec",
                 "vmbusify.mux.main", "vmbusify.workers.exec.main",
                 "vmbusify.workers.proxy.main", "vmbusify.workers.subnet.main"]

pytestmark = [pytest.mark.root, pytest.mark.timeout(1200)]


def _suite() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.partition("=")[2].strip('"')
    pytest.skip("no VERSION_CODENAME in /etc/os-release: not a Debian machine")


def _apt_sources() -> list[Path]:
    """This machine's apt sources: the mirror mmdebstrap takes the packages from."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file() and any(ln.strip() and not ln.lstrip().startswith("#")
                                for ln in legacy.read_text().splitlines()):
        sources.append(legacy)
    return sources


@pytest.fixture(scope="module")
def base_tar() -> Path:
    """Debian's minbase with the guest package's dependencies: a tarball, made once."""
    suite, sources = _suite(), _apt_sources()
    if not sources:
        pytest.skip("apt has no sources configured: no Debian mirror to build from")
    key = hashlib.sha256(json.dumps(
        [suite, "minbase", sorted(DEPENDS), [s.read_text() for s in sources]]).encode())
    tar = CACHE / f"guest-deps-{suite}-{key.hexdigest()[:16]}.tar"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{tar.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be making the same tarball
        if tar.is_file():
            return tar
        if shutil.which("mmdebstrap") is None:
            subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                            "mmdebstrap"], check=True, timeout=600,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        part = tar.with_suffix(".tar.part")
        done = subprocess.run(
            ["mmdebstrap", "--variant=minbase", "--format=tar",
             f"--include={','.join(DEPENDS)}", suite, str(part), *map(str, sources)],
            capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            part.unlink(missing_ok=True)
            pytest.fail(f"mmdebstrap failed:\n{done.stderr[-3000:]}")
        os.replace(part, tar)
    return tar


def _extract(tar: Path, where: Path) -> Path:
    root = where / "root"
    root.mkdir()
    subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-xpf", str(tar)],
                   check=True, timeout=300)
    return root


def _offline(root: Path, script: str) -> list[str]:
    """The command that runs ``script`` (sh) in ``root`` with no network: lo is all there is."""
    return ["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child=SIGTERM", "sh", "-c",
            ('ip link set lo up && mount -t proc proc "$1/proc" && exec chroot "$1" '
             '/usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 /bin/sh -c "$2"'),
            "-", str(root), script]


def run_offline(root: Path, script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_offline(root, script), capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    done = subprocess.run([sys.executable, str(ROOT / "packaging/build-guest.py"), "--out",
                           str(out)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def installed(base_tar: Path, deb: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[Path, subprocess.CompletedProcess[str]]]:
    """A fresh root filesystem with the package installed offline; and dpkg's run."""
    where = tmp_path_factory.mktemp("debian")
    root = _extract(base_tar, where)
    shutil.copy(deb, root / "tmp" / "vmbusify-guest.deb")
    done = run_offline(root, "python3 -c 'import socket; print(socket.if_nameindex())' && "
                       "dpkg -i /tmp/vmbusify-guest.deb")
    yield root, done
    shutil.rmtree(where, ignore_errors=True)


def test_installs_with_no_network_from_debian_packages(
        installed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, done = installed
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == "[(1, 'lo')]"  # nothing but loopback
    assert "Setting up vmbusify-guest" in done.stdout
    status = run_offline(root, "dpkg-query -W -f='${Status}' vmbusify-guest")
    assert status.stdout == "install ok installed"
    # the first install enables the unit (no systemd runs here) and made the state directory
    wants = root / "etc/systemd/system/multi-user.target.wants/vmbusify-guest.service"
    assert os.readlink(wants) == "/usr/lib/systemd/system/vmbusify-guest.service"
    assert (root / "var/lib/vmbusify").stat().st_mode & 0o777 == 0o700
    assert (root / "etc/vmbusify").stat().st_mode & 0o777 == 0o700
    assert (root / "etc/vmbusify/vmbusify.toml").stat().st_mode & 0o777 == 0o600
    # byte-compiled by postinst: vmbusifyexec does not compile its modules at each start
    assert list((root / "usr/lib/python3/dist-packages/vmbusify/cli/__pycache__").glob("*.pyc"))


def test_programs_run_on_debians_python_and_libraries(
        installed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, _ = installed
    done = run_offline(root, "vmbusify --version && vmbusify mux --help && "
                       "vmbusify worker --help && vmbusifyctl --help && vmbusifyexec --help")
    assert done.returncode == 0, done.stderr
    assert "vmbusify, version " in done.stdout
    assert "Run the tunnel-mux" in done.stdout
    assert "Usage: vmbusifyexec" in done.stdout
    probe = r"""
import importlib, json, pkgutil, sys
import vmbusify
failed = {}
for m in pkgutil.walk_packages(vmbusify.__path__, "vmbusify."):
    try:
        importlib.import_module(m.name)
    except ModuleNotFoundError as exc:
        failed[m.name] = exc.name
    except Exception as exc:
        failed[m.name] = repr(exc)
import click, msgpack, psutil, supervisor, zmq
print(json.dumps({"failed": failed, "python": sys.executable, "vmbusify": vmbusify.__file__,
  "files": {m.__name__: m.__file__ for m in (click, msgpack, psutil, supervisor, zmq)},
  "zmq": zmq.__version__, "msgpack": ".".join(map(str, msgpack.version)),
  "psutil": psutil.__version__, "click": click.__version__}))
"""
    done = run_offline(root, f"python3 -c '{probe}'")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["python"] == "/usr/bin/python3"
    assert info["vmbusify"].startswith("/usr/lib/python3/dist-packages/vmbusify/")
    for name, path in info["files"].items():
        assert path.startswith("/usr/lib/python3/dist-packages/"), (name, path)
    # Every module imports but the command listener's (aiohttp is a host extra, and Debian
    # 12's is older than it needs); what supervisord starts on a guest imports completely.
    assert set(info["failed"].values()) <= {"aiohttp", "uvloop"}, info["failed"]
    assert not set(info["failed"]) & set(GUEST_MODULES), info["failed"]
    # ... on exactly the versions Debian ships
    debian = run_offline(root, "dpkg-query -W -f='${Package} ${Version}\\n' " + " ".join(DEPENDS))
    versions = dict(line.split(" ", 1) for line in debian.stdout.splitlines())
    for name in ("zmq", "msgpack", "psutil", "click"):
        assert versions[f"python3-{name}"].startswith(info[name] + "-"), (name, versions)


def _numbers(version: str) -> tuple[int, ...]:
    release = version.split("-", maxsplit=1)[0].split("+", maxsplit=1)[0]
    return tuple(int(n) for n in re.findall(r"\d+", release)[:3])


def test_pyproject_floors_are_met_by_debian(
        installed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """Each floor of pyproject's dependencies is at most what the guest's Debian ships."""
    root, _ = installed
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors: dict[str, str] = {}
    for dep in deps:
        m = re.fullmatch(r"([\w-]+)>=([\d.]+)", dep)
        assert m, f"pyproject dependency {dep!r}: expected NAME>=VERSION"
        floors[m.group(1)] = m.group(2)
    assert set(floors) == set(DEBIAN_OF)
    debian = run_offline(root, "dpkg-query -W -f='${Package} ${Version}\\n' "
                         + " ".join(DEBIAN_OF.values()))
    versions = dict(line.split(" ", 1) for line in debian.stdout.splitlines())
    for name, floor in floors.items():
        assert _numbers(versions[DEBIAN_OF[name]]) >= _numbers(floor), (name, versions)


def _unit_environment(root: Path) -> tuple[dict[str, str], list[str]]:
    """The installed unit's Environment= and ExecStart= (what systemd would run)."""
    env: dict[str, str] = {}
    start: list[str] = []
    for line in (root / "usr/lib/systemd/system/vmbusify-guest.service").read_text().splitlines():
        if line.startswith("Environment="):
            k, _, v = line.removeprefix("Environment=").partition("=")
            env[k] = v
        elif line.startswith("ExecStart="):
            start = line.removeprefix("ExecStart=").split()
    return env, start


def test_guest_serves_a_host_and_logs_every_program_to_syslog(
        installed: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    """The guest runs as its unit says (supervisord -n, Debian's), listening on a Unix socket;
    a host mux and command listener from this checkout connect, ping and exec in it. Every
    program's output reaches syslog (/dev/log: journald's on a systemd machine, here a socket
    of this test's)."""
    root, _ = installed
    env, start = _unit_environment(root)
    assert start[0] == "/usr/bin/supervisord" and (root / start[0].lstrip("/")).exists()
    assert env["VMBUSIFY_BIN"] == "/usr/bin"
    env["VMBUSIFY_CONFIG"] = "/etc/vmbusify/test.toml"
    (root / "etc/vmbusify/test.toml").write_text(
        'role = "guest"\nname = "debian12"\nrun_dir = "/run/vmbusify"\n'
        'state_dir = "/var/lib/vmbusify"\n'
        '[tunnel]\nlisten = "unix:/run/vmbusify-tunnel/vm1.sock"\n'
        'ping_interval = 1.0\ndead_after = 5.0\n[subnet]\nenabled = false\n')
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    (root / "dev/log").unlink(missing_ok=True)
    syslog.bind(str(root / "dev/log"))
    syslog.settimeout(0.2)
    assignments = " ".join(f"{k}={v}" for k, v in sorted(env.items()))
    guest = subprocess.Popen(
        _offline(root, "install -d -m 0700 /run/vmbusify /run/vmbusify-tunnel && "
                 f"exec env {assignments} {' '.join(start)}"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    host_toml = tmp_path / "host.toml"
    host_toml.write_text(
        f'role = "host"\nname = "host"\nrun_dir = "{tmp_path}/host-run"\n'
        f'state_dir = "{tmp_path}/host-state"\n'
        '[tunnel]\nping_interval = 1.0\ndead_after = 5.0\nbackoff_initial = 0.2\n'
        'backoff_max = 1.0\n[host]\nkeep_connected = true\n'
        f'[[vms]]\nvmid = "vm1"\naddress = "unix:{root}/run/vmbusify-tunnel/vm1.sock"\n'
        f'[control]\nlisten = "unix:{tmp_path}/host-control/control.sock"\n')
    host_env = {**os.environ, "VMBUSIFY_CONFIG": str(host_toml)}
    hosts = []
    for program in ("mux", "control"):
        with open(tmp_path / f"{program}.log", "wb") as log:  # the child keeps its own fd
            hosts.append(subprocess.Popen([str(BIN / "vmbusify"), program], env=host_env,
                                          stdout=log, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 90
        ping = None
        while time.monotonic() < deadline:
            ping = subprocess.run([str(BIN / "vmbusifyctl"), "ping", "vm1"], env=host_env,
                                  capture_output=True, text=True, timeout=30, check=False)
            if ping.returncode == 0:
                break
            time.sleep(0.5)
        assert ping is not None and ping.returncode == 0, (
            ping and ping.stderr, (tmp_path / "mux.log").read_text()[-2000:])

        def vmexec(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(BIN / "vmbusifyexec"), "vm1", "--", *argv],
                                  env=host_env, capture_output=True, text=True, timeout=60,
                                  check=False)

        done = vmexec("cat", "/etc/debian_version")
        assert done.returncode == 0, done.stderr
        assert done.stdout == (root / "etc/debian_version").read_text()
        done = vmexec("python3", "-c", "import sys, zmq; print(sys.executable, zmq.__version__)")
        assert done.stdout.split()[0] == "/usr/bin/python3", done.stderr
        assert vmexec("sh", "-c", "exit 3").returncode == 3

        # Every program's output reaches syslog, as supervisord's "PROGRAM line".
        lines: list[str] = []
        want = {"mux", "exec", "proxy", "subnet", "control"}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not want <= {
                ln.split(": ", 1)[-1].split(" ", 1)[0] for ln in lines}:
            try:
                lines.append(syslog.recv(65536).decode(errors="replace"))
            except TimeoutError:
                pass
        seen = {ln.split(": ", 1)[-1].split(" ", 1)[0] for ln in lines}
        assert want <= seen, lines[-20:]
        # A guest without aiohttp says once why it has no command listener, and keeps on.
        text = "\n".join(lines)
        assert "the command listener is off: aiohttp is not installed" in text, text[-3000:]
        assert "uvloop (0.18 or later) is not installed" in text
        assert (root / "run/vmbusify/mux.log").stat().st_size > 0  # the file log stays
    finally:
        # Closed first: a full /dev/log queue nobody reads blocks supervisord's syslog() (as
        # a stuck journald would), and then its SIGTERM too.
        syslog.close()
        for proc in hosts:
            proc.terminate()
        # As systemd stops the unit: SIGTERM to supervisord (the namespace's first process;
        # unshare itself ignores SIGTERM while it waits).
        for child in psutil.Process(guest.pid).children():
            child.send_signal(signal.SIGTERM)
        try:
            guest.wait(30)
        except subprocess.TimeoutExpired:
            guest.kill()
            guest.wait(10)
        for proc in hosts:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    out = guest.stdout.read() if guest.stdout else ""
    assert "spawned: 'mux'" in out
    for program in ("mux", "control", "exec", "proxy", "subnet"):
        assert f"stopped: {program} (exit status 0)" in out, out[-3000:]


def test_purge_leaves_nothing(base_tar: Path, deb: Path, tmp_path: Path) -> None:
    root = _extract(base_tar, tmp_path)
    try:
        shutil.copy(deb, root / "tmp" / "vmbusify-guest.deb")
        before = run_offline(root, "find / -xdev -path /proc -prune -o -path /tmp -prune -o "
                             "-print | sort").stdout.splitlines()
        done = run_offline(root, "dpkg -i /tmp/vmbusify-guest.deb && "
                           "dpkg --purge vmbusify-guest")
        assert done.returncode == 0, done.stdout + done.stderr
        after = run_offline(root, "find / -xdev -path /proc -prune -o -path /tmp -prune -o "
                            "-print | sort").stdout.splitlines()
        left = [p for p in set(after) - set(before)
                if not p.startswith(("/var/lib/dpkg/", "/var/log/", "/var/cache/"))]
        assert left == [], left
    finally:
        shutil.rmtree(root, ignore_errors=True)
