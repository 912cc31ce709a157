"""packaging/: the example configs load, the units say what supervisord needs, the Hyper-V
registration script uses the same service GUID as the code, and install.sh's plan is sane."""

from __future__ import annotations

import grp
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vmbusify.config import DEFAULT_TUNNEL_PORT, Role, load_config
from vmbusify.transport import TransportKind, parse_address, service_guid

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"


@pytest.mark.parametrize("role", ["host", "guest"])
def test_example_config_loads_and_its_addresses_parse(role: str) -> None:
    config = load_config(PACKAGING / f"{role}.toml")
    assert config.role is Role(role)
    assert config.run_dir == "/run/vmbusify"
    listen = parse_address(config.tunnel.listen)
    assert str(listen) == f"vsock:any:{DEFAULT_TUNNEL_PORT}"
    for vm in config.vms:
        parse_address(vm.address)


def test_host_example_shows_vsock_and_firecracker() -> None:
    config = load_config(PACKAGING / "host.toml")
    kinds = {parse_address(vm.address).kind for vm in config.vms}
    assert {TransportKind.VSOCK, TransportKind.FC} <= kinds
    assert config.host.keep_connected


def _unit(path: Path) -> dict[str, list[str]]:
    """A systemd unit as {"Section.Key": [values]} (keys may repeat, like Environment=)."""
    entries: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not key=value: {line!r}"
        entries.setdefault(f"{section}.{key}", []).append(value)
    return entries


@pytest.mark.parametrize("role", ["host", "guest"])
def test_systemd_unit(role: str) -> None:
    unit = _unit(PACKAGING / f"vmbusify-{role}.service")
    assert unit["Service.ExecStart"] == [
        "/opt/vmbusify/venv/bin/supervisord -n -c /etc/vmbusify/supervisord.conf"]
    assert sorted(unit["Service.Environment"]) == [
        "VMBUSIFY_BIN=/opt/vmbusify/venv/bin",
        "VMBUSIFY_CONFIG=/etc/vmbusify/vmbusify.toml",
        "VMBUSIFY_RUN_DIR=/run/vmbusify",
    ]
    assert unit["Service.RuntimeDirectory"] == ["vmbusify"]
    assert unit["Service.RuntimeDirectoryMode"] == ["0700"]
    assert unit["Install.WantedBy"] == ["multi-user.target"]


def test_only_the_host_unit_reloads_and_through_vmbusifyctl() -> None:
    """systemctl reload runs `vmbusifyctl reload` (the mux re-reads its VMs); a SIGHUP to
    supervisord, systemd's default, would restart every program."""
    host = _unit(PACKAGING / "vmbusify-host.service")
    assert host["Service.ExecReload"] == ["/opt/vmbusify/venv/bin/vmbusifyctl reload"]
    assert "Service.ExecReload" not in _unit(PACKAGING / "vmbusify-guest.service")


def test_units_supply_what_supervisord_conf_expects() -> None:
    conf = (ROOT / "conf" / "supervisord.conf").read_text()
    wanted = set(re.findall(r"%\(ENV_(\w+)\)s", conf))
    for role in ("host", "guest"):
        unit = _unit(PACKAGING / f"vmbusify-{role}.service")
        provided = {e.partition("=")[0] for e in unit["Service.Environment"]}
        assert wanted <= provided, f"{role}: missing {wanted - provided}"


def test_hyperv_register_script_uses_the_same_guid_mapping() -> None:
    script = (PACKAGING / "hyperv-register.ps1").read_text()
    match = re.search(r"'\{0:X8\}(-FACB-11E6-BD58-64006A7986D3)'", script)
    assert match, "the script's GUID template changed"
    assert service_guid(DEFAULT_TUNNEL_PORT).endswith(match.group(1))
    assert f"{DEFAULT_TUNNEL_PORT:08X}{match.group(1)}" == service_guid(DEFAULT_TUNNEL_PORT)
    assert f"@({DEFAULT_TUNNEL_PORT})" in script
    assert "GuestCommunicationServices" in script
    assert "ElementName" in script


def _install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(PACKAGING / "install.sh"), *args],
                          check=False, capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
@pytest.mark.parametrize("role", ["host", "guest"])
def test_install_dry_run_plan(role: str) -> None:
    done = _install(role, "--dry-run", "--source", str(ROOT))
    assert done.returncode == 0, done.stderr
    plan = done.stdout
    # the host-only extras (aiohttp, uvloop) on the host alone
    extra = "[host]" if role == "host" else ""
    assert f"+ /opt/vmbusify/venv/bin/pip install --upgrade {ROOT}{extra}\n" in plan
    assert f"{ROOT}/conf/supervisord.conf /etc/vmbusify/supervisord.conf" in plan
    # every program supervisord.conf includes is installed beside it (else it starts none)
    for program in sorted((ROOT / "conf" / "programs").glob("*.conf")):
        assert f"{program} /etc/vmbusify/programs/{program.name}" in plan, program.name
        # ... and sends its output to syslog too: the journal, under systemd
        assert f"+ append stdout_syslog=true to /etc/vmbusify/programs/{program.name}" in plan
    # the config checked as the programs load it, and the man pages made from the help
    assert "+ /opt/vmbusify/venv/bin/vmbusify check-config -q /etc/vmbusify/vmbusify.toml\n" in plan
    assert ("+ /opt/vmbusify/venv/bin/vmbusify man --output /usr/local/share/man/man1\n"
            in plan)
    assert f"/etc/systemd/system/vmbusify-{role}.service" in plan
    assert f"+ systemctl enable vmbusify-{role}.service" in plan
    # The host makes group vmbusify (the command listener's and the proxy's, as docker's),
    # and lets it read the config to find the listener; a guest's stays root's alone.
    mode = "-m 0640 -g vmbusify" if role == "host" else "-m 0600"
    if not Path("/etc/vmbusify/vmbusify.toml").exists():
        assert f"install {mode} {ROOT}/packaging/{role}.toml /etc/vmbusify/vmbusify.toml" in plan
    if role == "host":
        assert "+ install -d -m 0750 -g vmbusify /etc/vmbusify" in plan
        try:
            grp.getgrnam("vmbusify")
        except KeyError:
            assert "+ groupadd --system vmbusify" in plan
    else:
        assert "+ install -d -m 0700 /etc/vmbusify" in plan and "groupadd" not in plan


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
def test_the_installed_supervisord_conf_starts_every_program(tmp_path: Path) -> None:
    """Lay out /etc/vmbusify as install.sh's plan says (under a temporary directory) and let
    supervisor read it: every program of conf/ must be there, none left behind."""
    from supervisor.options import ServerOptions

    plan = _install("host", "--dry-run", "--source", str(ROOT)).stdout
    etc = tmp_path / "etc"
    (tmp_path / "run").mkdir()  # systemd's RuntimeDirectory=
    for source, target in re.findall(r"^\+ install -m \d+ (\S+) /etc/vmbusify/(\S+)$", plan,
                                     re.MULTILINE):
        (etc / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, etc / target)
    for target in re.findall(r"^\+ append stdout_syslog=true to /etc/vmbusify/(\S+)$", plan,
                             re.MULTILINE):
        with open(etc / target, "a") as f:
            f.write("stdout_syslog=true\n")
    with pytest.MonkeyPatch.context() as mp:  # what the systemd unit sets
        mp.setenv("VMBUSIFY_RUN_DIR", str(tmp_path / "run"))
        mp.setenv("VMBUSIFY_BIN", "/opt/vmbusify/venv/bin")
        mp.setenv("VMBUSIFY_CONFIG", "/etc/vmbusify/vmbusify.toml")
        options = ServerOptions()  # it reads the environment when made
        options.realize(args=["-c", str(etc / "supervisord.conf")])
    shipped = {p.stem for p in (ROOT / "conf" / "programs").glob("*.conf")}
    assert {g.name for g in options.process_group_configs} == shipped
    assert all(g.process_configs[0].stdout_syslog for g in options.process_group_configs)
    assert {"mux", "control", "exec", "proxy", "subnet"} <= shipped


def test_install_rejects_a_bad_role() -> None:
    done = _install("hypervisor", "--dry-run")
    assert done.returncode == 2
    assert "usage:" in done.stderr


def test_install_script_parses() -> None:
    for shell in ("sh", "bash"):
        if shutil.which(shell):
            subprocess.run([shell, "-n", str(PACKAGING / "install.sh")], check=True)
