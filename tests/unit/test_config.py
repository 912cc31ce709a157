"""The configuration file: the full model (vmbusify.config) and the light reader that
vmbusifyexec uses (vmbusify.config_file) must agree on where the command listener is."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmbusify.config import load_config
from vmbusify.config_file import DEFAULT_CONTROL_PORT, listener_of, split_listen
from vmbusify.errors import ConfigError


@pytest.mark.parametrize("text", [
    "",
    'role = "host"\nstate_dir = "/srv/vb"\n',
    '[control]\nlisten = "127.0.0.1:7000"\n',
    'state_dir = "/x"\n[control]\nlisten = "[::1]:6600"\n[proxy]\nlisten = "127.0.0.1:1"\n',
])
def test_the_light_reader_agrees_with_the_model(tmp_path: Path, text: str) -> None:
    path = tmp_path / "vmbusify.toml"
    path.write_text(text)
    config = load_config(path)
    host, port = split_listen(config.control.listen)
    assert listener_of(path) == (host, port, str(config.token_path))


def test_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("")
    assert listener_of(path) == ("127.0.0.1", DEFAULT_CONTROL_PORT,
                                 "/var/lib/vmbusify/control.token")


def test_the_environment_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "env.toml"
    path.write_text('[control]\nlisten = "127.0.0.1:7100"\n')
    monkeypatch.setenv("VMBUSIFY_CONFIG", str(path))
    assert listener_of()[1] == 7100
    assert load_config().path == str(path)


@pytest.mark.parametrize(("text", "why"), [
    ("[control\n", "Expected"),
    ("control = 3\n", "control: expected a table"),
    ("[control]\nlisten = 6543\n", "control.listen: expected str"),
    ("state_dir = true\n", "state_dir: expected str"),
    ('[control]\nlisten = "localhost"\n', "bad listen address"),
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
