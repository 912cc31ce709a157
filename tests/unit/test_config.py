"""The configuration file: the full model (vmbusify.config) and the light reader that
vmbusifyexec uses (vmbusify.config_file) must agree on where the command listener is."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vmbusify.config import check_config, load_config
from vmbusify.config_file import listener_of, parse_control_listen
from vmbusify.errors import ConfigError


@pytest.mark.parametrize("text", [
    "",
    'role = "host"\nstate_dir = "/srv/vb"\n',
    '[control]\nlisten = "127.0.0.1:7000"\n',
    '[control]\nlisten = "tcp:127.0.0.1:7000"\n',
    '[control]\nlisten = "unix:/srv/c/control.sock"\n',
    'state_dir = "/x"\n[control]\nlisten = "[::1]:6600"\n[proxy]\nlisten = "127.0.0.1:1"\n',
])
def test_the_light_reader_agrees_with_the_model(tmp_path: Path, text: str) -> None:
    path = tmp_path / "vmbusify.toml"
    path.write_text(text)
    config = load_config(path)
    assert listener_of(path) == (*parse_control_listen(config.control.listen),
                                 str(config.token_path))


def test_defaults(tmp_path: Path) -> None:
    """A Unix socket in a directory of its own, the token beside it (where the group it is
    granted to can read it); a TCP listener keeps its token in the state directory."""
    path = tmp_path / "empty.toml"
    path.write_text("")
    assert listener_of(path) == ("unix", "/run/vmbusify-control/control.sock", 0,
                                 "/run/vmbusify-control/control.token")
    config = load_config(path)
    assert config.control.group == config.proxy.group == "vmbusify"
    assert config.proxy.access == "auto" and config.proxy.credentials_file == ""
    path.write_text('[control]\nlisten = "127.0.0.1:6543"\n')
    assert listener_of(path) == ("tcp", "127.0.0.1", 6543, "/var/lib/vmbusify/control.token")


def test_the_environment_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "env.toml"
    path.write_text('[control]\nlisten = "127.0.0.1:7100"\n')
    monkeypatch.setenv("VMBUSIFY_CONFIG", str(path))
    assert listener_of()[2] == 7100
    assert load_config().path == str(path)


@pytest.mark.parametrize(("text", "why"), [
    ("[control\n", "Expected"),
    ("control = 3\n", "control: expected a table"),
    ("[control]\nlisten = 6543\n", "control.listen: expected str"),
    ("state_dir = true\n", "state_dir: expected str"),
    ('[control]\nlisten = "localhost"\n', "bad listen address"),
    ('[control]\nlisten = "unix:relative.sock"\n', "unix:/absolute/path"),
    ('[control]\nlisten = "unix:/dir/"\n', "unix:/absolute/path"),
])
def test_bad_files_are_clear_errors(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=why):
        listener_of(path)


def test_a_named_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        listener_of(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize(("text", "why"), [
    ('role = "host"\n[[vms]]\nvmid = "a"\n', r"vms\[0\]: missing key 'address'"),
    ('log_level = "LOUD"\n', "log_level: 'LOUD' is not one of"),
    ("[tunnel]\ndead_after = 0\n", "tunnel.dead_after: must be > 0"),
    ("[tunnel]\nping_interval = -1\n", "tunnel.ping_interval: must be > 0"),
    ("[tunnel]\nping_interval = 20.0\n", "dead_after .* must be longer than ping_interval"),
    ('[tunnel]\nlisten = "bogus:1"\n', "tunnel.listen: address 'bogus:1': unknown scheme"),
    ('role = "host"\n[[vms]]\nvmid = "a"\naddress = "vsock:notanumber"\n',
     r"vms\[0\].address: address 'vsock:notanumber'"),
    ('[subnet]\ndns_upstream = ["not-an-ip"]\n', "dns_upstream: 'not-an-ip' is not an IP"),
])
def test_values_that_cannot_work_are_refused_at_load(tmp_path: Path, text: str,
                                                      why: str) -> None:
    """Each of these used to load, then end in a traceback (missing key, log level, DNS
    server) or a program that ran but could never work (a dead_after of 0, an address that
    does not parse: the host retried it forever)."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=why):
        load_config(path)


def test_the_shipped_examples_still_load() -> None:
    root = Path(__file__).resolve().parents[2]
    for name in ("host.toml", "guest.toml"):
        load_config(root / "packaging" / name)


def test_a_run_dir_that_cannot_be_made_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from vmbusify.cli.main import main
    (tmp_path / "file").write_text("")
    path = tmp_path / "vmbusify.toml"
    path.write_text(f'run_dir = "{tmp_path}/file/run"\n[tunnel]\n'
                    f'listen = "unix:{tmp_path}/t.sock"\n')
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        result = CliRunner().invoke(main, ["mux", "--config", str(path)])
    finally:  # the program set up its logging in this process: put pytest's back
        root.handlers[:], root.level = handlers, level
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # not the OSError itself
    assert "Not a directory" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(("text", "line"), [
    ('[proxy]\nallow = ["10.0.0.0/33"]\n',
     "proxy.allow[0]: proxy rule '10.0.0.0/33': '10.0.0.0/33' does not appear to be an IPv4"),
    ('[proxy]\ndeny = ["10.0.0.0/8:80,99999"]\n',
     "proxy.deny[0]: proxy rule '10.0.0.0/8:80,99999': port range '99999' out of 0..65535"),
    ('[proxy]\nlisten = "127.0.0.1:0"\n', "proxy.listen: port 0 is not a port (1-65535)"),
    ('[proxy]\nconnect_timeout = 0\n', "proxy.connect_timeout: must be > 0"),
    ('[proxy]\ncredentials_file = "creds"\n', "proxy.credentials_file: 'creds' is not an"),
    ('[control]\nlisten = "tcp:127.0.0.1:70000"\n', "control.listen: port 70000 is not a port"),
    ('[subnet]\ncidr = "100.77.0.0/40"\n', "subnet.cidr: '100.77.0.0/40' is not an IPv4 network"),
    ('[subnet]\ncidr = "100.77.0.1/24"\n',
     "subnet.cidr: '100.77.0.1/24' is not an IPv4 network: 100.77.0.1/24 has host bits set"),
    ('[subnet]\ncidr = "100.77.0.0/31"\n', "subnet.cidr: '100.77.0.0/31' is too small"),
    ('[subnet]\ncidr6 = "fd77::/127"\n', "subnet.cidr6: 'fd77::/127' is too small"),
    ('[subnet]\ncidr6 = "10.0.0.0/8"\n', "subnet.cidr6: '10.0.0.0/8' is not an IPv6 network"),
    ("[subnet]\nmtu = 100\n", "subnet.mtu: must be between 1280 and 65535, not 100"),
    ("[subnet]\nroute_metric = -1\n", "subnet.route_metric: must be between 0 and"),
    ('[subnet]\nifname = "a-name-longer-than-15"\n',
     "subnet.ifname: 'a-name-longer-than-15' is not an interface name"),
    ('[subnet]\ntable = "no spaces"\n', "subnet.table: 'no spaces' is not an nftables"),
    ('run_dir = "relative"\n', "run_dir: 'relative' is not an absolute path"),
    ('role = "host"\n[[vms]]\nvmid = "a b"\naddress = "vsock:3"\n',
     "vms[0].vmid: 'a b' is not a VM id"),
    (('role = "host"\n[[vms]]\nvmid = "a"\naddress = "vsock:3"\n[[vms]]\nvmid = "a"\n'
      'address = "vsock:4"\n'), "vms[1].vmid: vmid 'a' appears twice"),
    ("[tunnel]\nmax_payload = 1\n", "tunnel.max_payload: must be between"),
])
def test_every_value_is_checked_at_load(tmp_path: Path, text: str, line: str) -> None:
    """Each of these loaded before, and a program then failed on it (a subnet worker that
    restarted in a loop on a /40), or, for a rule or a port, later still."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    _config, problems = check_config(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: {line}"), problems
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == problems[0]


def test_check_config_finds_every_problem_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('log_level = "LOUD"\nbogus = 1\n[tunnel]\ndead_after = "x"\n'
                    '[subnet]\nmtu = 1\n[proxy]\nallow = ["x", "10.0.0.0/8"]\n')
    _config, problems = check_config(path)
    assert [p.split(": ")[1] for p in problems] == [
        "unknown key 'bogus'", "tunnel.dead_after", "log_level", "proxy.allow[0]", "subnet.mtu"]
    with pytest.raises(ConfigError, match=r"unknown key 'bogus' \(and 4 more problems: "
                                          r"vmbusify check-config lists them\)$"):
        load_config(path)


def test_the_mtu_range_is_the_protocols() -> None:
    from vmbusify.config import MTU_RANGE
    from vmbusify.protocol.subnet import MAX_PACKET
    assert MTU_RANGE[1] == MAX_PACKET
