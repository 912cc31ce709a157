"""packaging/build-guest.py: the guest .deb's control data, files, unit and program configs
(no root: dpkg-deb builds and reads it as any user). tests/integration/test_guest_package.py
installs it into a Debian root filesystem with no network."""

from __future__ import annotations

import gzip
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from vmbusify import __version__

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "packaging" / "build-guest.py"

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="no dpkg-deb")


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_guest", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path.parent == out and path.is_file()
    assert (out / "vmbusify-guest.deb").resolve() == path
    return path


def _field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()


def _extract(deb: Path, where: Path) -> Path:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(where)], check=True)
    return where


def test_depends_only_on_debian_packages_at_pyproject_floors(deb: Path) -> None:
    depends = _field(deb, "Depends")
    assert depends == ("python3 (>= 3.11), python3-psutil (>= 5.9), python3-zmq (>= 24), "
                       "python3-msgpack (>= 1.0), supervisor (>= 4.2), python3-click (>= 8.1)")
    # the host-only extras are suggested, never required
    assert _field(deb, "Suggests") == ("python3-aiohttp (>= 3.9), python3-uvloop (>= 0.19), "
                                       "python3-prometheus-client (>= 0.16)")
    assert _field(deb, "Architecture") == "all"
    assert _field(deb, "Version").startswith(f"{__version__}+src")


def test_files_unit_and_configs(deb: Path, tmp_path: Path) -> None:
    root = _extract(deb, tmp_path / "root")
    site = root / "usr/lib/python3/dist-packages"
    assert (site / "vmbusify/mux/main.py").is_file()
    assert not list(site.rglob("*.pyc"))  # postinst compiles them on the guest's python
    entry = (site / f"vmbusify-{__version__}.dist-info/entry_points.txt").read_text()
    assert "vmbusify = vmbusify.cli.main:main" in entry
    for name in ("vmbusify", "vmbusifyctl", "vmbusifyexec"):
        script = root / "usr/bin" / name
        assert script.stat().st_mode & 0o755 == 0o755
        assert script.read_text().startswith("#!/usr/bin/python3\n")
    # the commands' man pages, made from their own help (vmbusify man)
    for name in ("vmbusify", "vmbusifyctl", "vmbusifyexec"):
        page = gzip.decompress((root / f"usr/share/man/man1/{name}.1.gz").read_bytes())
        assert page.startswith(f".TH {name.upper()} 1 ".encode()), name
    unit = (root / "usr/lib/systemd/system/vmbusify-guest.service").read_text()
    assert "ExecStart=/usr/bin/supervisord -n -c /etc/vmbusify/supervisord.conf" in unit
    assert "Environment=VMBUSIFY_BIN=/usr/bin" in unit
    assert "/opt/vmbusify" not in unit
    # every program also goes to syslog (the journal under systemd), and keeps its file log
    programs = sorted(p.name for p in (ROOT / "conf/programs").glob("*.conf"))
    assert sorted(p.name for p in (root / "etc/vmbusify/programs").iterdir()) == programs
    for name in programs:
        text = (root / "etc/vmbusify/programs" / name).read_text()
        assert text.startswith((ROOT / "conf/programs" / name).read_text())
        assert text.rstrip().endswith("stdout_syslog=true")
    assert (root / "etc/vmbusify/vmbusify.toml").read_bytes() == (
        ROOT / "packaging/guest.toml").read_bytes()
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    assert "drwx------ root/root         0" in next(
        ln for ln in listing.splitlines() if ln.endswith(" ./etc/vmbusify/"))
    assert "-rw------- root/root" in next(
        ln for ln in listing.splitlines() if ln.endswith("/etc/vmbusify/vmbusify.toml"))
    conffiles = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True,
                               text=True, check=True).stdout.split()
    assert "/etc/vmbusify/vmbusify.toml" in conffiles
    assert "/etc/vmbusify/supervisord.conf" in conffiles


def test_supervisor_reads_the_packaged_config_with_syslog_on(deb: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    from supervisor.options import ServerOptions

    root = _extract(deb, tmp_path / "root")
    (tmp_path / "run").mkdir()
    monkeypatch.setenv("VMBUSIFY_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("VMBUSIFY_BIN", "/usr/bin")
    monkeypatch.setenv("VMBUSIFY_CONFIG", "/etc/vmbusify/vmbusify.toml")
    options = ServerOptions()
    options.realize(args=["-c", str(root / "etc/vmbusify/supervisord.conf")])
    groups = {g.name: g.process_configs[0] for g in options.process_group_configs}
    assert set(groups) >= {"mux", "control", "exec", "proxy", "subnet"}
    for name, config in groups.items():
        assert config.stdout_syslog is True, name
        assert config.stdout_logfile == str(tmp_path / "run" / f"{name}.log")


def test_second_build_reuses_the_package(deb: Path) -> None:
    before = deb.stat().st_mtime_ns
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(deb.parent)],
                          capture_output=True, text=True, timeout=60, check=True)
    assert Path(done.stdout.strip()) == deb and deb.stat().st_mtime_ns == before


def test_a_dependency_debian_lacks_is_refused() -> None:
    build = _module()
    assert build.debian_relations(["pyzmq>=24", "click"]) == [
        "python3-zmq (>= 24)", "python3-click"]
    with pytest.raises(build.BuildError, match="no Debian package"):
        build.debian_relations(["requests>=2"])
    with pytest.raises(build.BuildError, match="NAME>=VERSION"):
        build.debian_relations(["pyzmq<26"])


def test_a_changed_unit_is_not_packaged_blindly(tmp_path: Path) -> None:
    build = _module()
    source = tmp_path / "src"
    (source / "packaging").mkdir(parents=True)
    unit = (ROOT / "packaging/vmbusify-guest.service").read_text()
    (source / "packaging/vmbusify-guest.service").write_text(
        unit.replace("/opt/vmbusify/venv/bin/supervisord", "/usr/local/bin/supervisord"))
    with pytest.raises(build.BuildError, match="UNIT_EDITS"):
        build.unit_text(source)
