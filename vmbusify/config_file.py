"""Finding and reading the configuration file, and the defaults every program agrees on.

Light on purpose (os and tomllib only: no dataclasses, no pathlib). ``vmbusifyexec`` starts
once per command and needs two values of the file, the command listener's address and its
token, so it reads them here (``listener_of``) instead of loading the whole model of
``vmbusify.config``, which builds on this module. Importing that model costs more CPU than
the rest of the client's start together.
"""

from __future__ import annotations

import os
import tomllib

from vmbusify.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_CONFIG_PATH = "/etc/vmbusify/vmbusify.toml"
#: The tunnel's vsock port. 6541 sits beside the spec's 6542 (SOCKS) and 6543 (command
#: listener) and clear of the ports other tools claim (1024, 22, 50000-50002, >= 0x40000000).
DEFAULT_TUNNEL_PORT = 6541
DEFAULT_PROXY_PORT = 6542
DEFAULT_CONTROL_PORT = 6543
DEFAULT_CONTROL_LISTEN = f"127.0.0.1:{DEFAULT_CONTROL_PORT}"
DEFAULT_RUN_DIR = "/run/vmbusify"
DEFAULT_STATE_DIR = "/var/lib/vmbusify"
#: The command listener's bearer token, in the state directory.
TOKEN_FILE = "control.token"


def read_config_file(path: str | os.PathLike[str] | None = None) -> tuple[str, dict[str, Any]]:
    """(the path chosen, its parsed TOML) from ``path``, ``$VMBUSIFY_CONFIG`` or the default.

    A missing default file reads as empty (every key has a default); a missing file that was
    asked for by name, or one that cannot be read or parsed, raises ConfigError.
    """
    explicit = path or os.environ.get("VMBUSIFY_CONFIG")
    chosen = os.fspath(explicit or DEFAULT_CONFIG_PATH)
    try:
        with open(chosen, "rb") as fh:
            return chosen, tomllib.load(fh)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {chosen} does not exist") from None
        return chosen, {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{chosen}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{chosen}: {exc.strerror}") from None


def token_path(state_dir: str) -> str:
    """The command listener's token file under ``state_dir``."""
    return os.path.join(state_dir, TOKEN_FILE)


def split_listen(listen: str) -> tuple[str, int]:
    """``127.0.0.1:6543`` -> ("127.0.0.1", 6543); raises ConfigError if malformed."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"bad listen address {listen!r} (expected HOST:PORT)")
    return host.strip("[]") or "127.0.0.1", int(port)


def listener_of(path: str | os.PathLike[str] | None = None) -> tuple[str, int, str]:
    """(host, port, token file) of this endpoint's command listener, read from the file alone.

    Only the two keys it needs are checked; the daemons load and check the whole file.
    """
    chosen, raw = read_config_file(path)
    control = raw.get("control", {})
    if not isinstance(control, dict):
        raise ConfigError(f"{chosen}.control: expected a table")
    listen = control.get("listen", DEFAULT_CONTROL_LISTEN)
    state_dir = raw.get("state_dir", DEFAULT_STATE_DIR)
    for key, value in (("control.listen", listen), ("state_dir", state_dir)):
        if not isinstance(value, str):
            raise ConfigError(f"{chosen}.{key}: expected str, got {type(value).__name__}")
    host, port = split_listen(listen)
    return host, port, token_path(state_dir)
