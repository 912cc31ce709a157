"""Finding and reading the configuration file, and the defaults every program agrees on.

Light on purpose (os only: no re, dataclasses or pathlib; tomllib only for a file outside
the plain subset ``plain_toml`` reads, since tomllib brings typing and datetime with it: a
third of the exec client's imports; re and its compiled patterns were ~2 ms more).
``vmbusifyexec`` starts once per command and needs two values of the file, the command
listener's address and its token, so it reads them here (``listener_of``) instead of
loading the whole model of ``vmbusify.config``, which builds on this module. Importing that
model costs more CPU than the rest of the client's start together.
"""

from __future__ import annotations

import os

from vmbusify.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_CONFIG_PATH = "/etc/vmbusify/vmbusify.toml"
#: The tunnel's vsock port. 6541 sits beside the proxy's 6542 (SOCKS) and the command listener's
#: 6543 and clear of the ports other tools claim (1024, 22, 50000-50002, >= 0x40000000).
DEFAULT_TUNNEL_PORT = 6541
DEFAULT_PROXY_PORT = 6542
#: The port of a TCP command listener (``[control] listen = "tcp:127.0.0.1:6543"``), which
#: is for development only: any local user can bind a free port first.
DEFAULT_CONTROL_PORT = 6543
#: The command listener is a Unix socket in a directory of its own, NOT in run_dir: run_dir
#: holds the ZeroMQ endpoints and stays 0700 (root only), so nothing inside it could ever be
#: granted to a group. The control directory is root's, mode 0750 with group ``vmbusify``
#: when that group exists (0700 otherwise); /run is traversable by everyone, so membership
#: of that group is all a user needs to reach the socket and read the token beside it.
DEFAULT_CONTROL_LISTEN = "unix:/run/vmbusify-control/control.sock"
DEFAULT_RUN_DIR = "/run/vmbusify"
DEFAULT_STATE_DIR = "/var/lib/vmbusify"
#: The group whose members may use the command listener and the host proxy as root does.
DEFAULT_GROUP = "vmbusify"
#: The command listener's bearer token: beside a Unix listener's socket (in the control
#: directory, so the group it is granted to can read it), in the state directory for TCP.
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
            data = fh.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {chosen} does not exist") from None
        return chosen, {}
    except OSError as exc:
        raise ConfigError(f"{chosen}: {exc.strerror}") from None
    plain = plain_toml(data)
    if plain is not None:
        return chosen, plain
    # A function-level import for start-up time: tomllib (with typing and datetime) is
    # loaded only for a file outside the plain subset.
    import tomllib
    try:
        return chosen, tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{chosen}: {exc}") from None


#: The plain subset, line by line (no re: its import and patterns cost the exec client ~2 ms
#: of every start). A line is blank, a comment, a header ``[name]`` or ``[[name]]``, or
#: ``key = value``: a bare key (ASCII letters, digits, ``_``, ``-``), then a string without
#: escapes or control characters (``"..."`` without backslashes, ``'...'``), an integer or a
#: decimal float (``-?(0|[1-9][0-9]*)(.[0-9]+)?``), ``true``, ``false``, or a one-line array
#: of those (a trailing comma allowed); after it blanks and an optional comment.
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_DIGITS = frozenset("0123456789")
_BLANKS = " \t"


def _skip_blanks(line: str, at: int) -> int:
    while at < len(line) and line[at] in _BLANKS:
        at += 1
    return at


def _key_end(line: str, at: int) -> int:
    """The end of the bare key at ``at`` (``at`` itself: none there)."""
    while at < len(line) and line[at] in _KEY_CHARS:
        at += 1
    return at


def _ends_plainly(line: str, at: int) -> bool:
    """Whether the rest of ``line`` from ``at`` is blanks and at most a comment (whose text
    has no control character but tab)."""
    at = _skip_blanks(line, at)
    if at == len(line):
        return True
    return line[at] == "#" and all(c == "\t" or (c >= " " and c != "\x7f")
                                   for c in line[at + 1:])


def _scalar_at(line: str, at: int) -> tuple[Any, int] | None:
    """(the value, where it ends) of the scalar at ``at``, or None."""
    n = len(line)
    if at >= n:
        return None
    c = line[at]
    if c in "\"'":
        end = line.find(c, at + 1)
        if end < 0:
            return None
        body = line[at + 1:end]
        if any(ch < " " or ch == "\x7f" or (ch == "\\" and c == '"') for ch in body):
            return None
        return body, end + 1
    if line.startswith("true", at):
        return True, at + 4
    if line.startswith("false", at):
        return False, at + 5
    end = at + (c == "-")
    if end < n and line[end] == "0":
        end += 1
    elif end < n and line[end] in _DIGITS:
        while end < n and line[end] in _DIGITS:
            end += 1
    else:
        return None
    if end + 1 < n and line[end] == "." and line[end + 1] in _DIGITS:
        end += 2
        while end < n and line[end] in _DIGITS:
            end += 1
    token = line[at:end]
    return (float(token) if "." in token else int(token)), end


def _value_at(line: str, at: int) -> tuple[Any, int] | None:
    """(the value, where it ends) of the scalar or one-line array at ``at``, or None."""
    if not line.startswith("[", at):
        return _scalar_at(line, at)
    items: list[Any] = []
    at = _skip_blanks(line, at + 1)
    while True:
        if line.startswith("]", at):
            return items, at + 1
        got = _scalar_at(line, at)
        if got is None:
            return None
        items.append(got[0])
        at = _skip_blanks(line, got[1])
        if line.startswith(",", at):
            at = _skip_blanks(line, at + 1)
        elif not line.startswith("]", at):
            return None


def _key_value(line: str) -> tuple[str, Any] | None:
    """(key, value) of a ``key = value`` line of the subset, or None."""
    key_end = _key_end(line, 0)
    at = _skip_blanks(line, key_end)
    if not key_end or not line.startswith("=", at):
        return None
    got = _value_at(line, _skip_blanks(line, at + 1))
    if got is None or not _ends_plainly(line, got[1]):
        return None
    return line[:key_end], got[0]


def _header(line: str) -> tuple[bool, str] | None:
    """(whether it is ``[[name]]``, name) of a header line of the subset, or None."""
    brackets = 2 if line.startswith("[[") else 1
    at = _skip_blanks(line, brackets)
    name_end = _key_end(line, at)
    if name_end == at:
        return None
    close = _skip_blanks(line, name_end)
    closing = 2 if line.startswith("]]", close) else 1 if line.startswith("]", close) else 0
    if closing != brackets or not _ends_plainly(line, close + closing):
        return None
    return brackets == 2, line[at:name_end]


def plain_toml(data: bytes) -> dict[str, Any] | None:
    """The TOML document ``data`` if it is in the plain subset every shipped and generated
    configuration uses, else None (then tomllib reads it, errors and all).

    The subset: comments; ``[table]`` and ``[[array]]`` headers of one bare name each; and
    ``key = value`` lines as the note above ``_KEY_CHARS`` says. Whatever it accepts, it
    reads as tomllib does; anything else (escapes, multi-line or nested values, dotted keys, a
    key or table defined twice) is left to tomllib.
    """
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return None
    if "\r" in text or "\ufeff" in text:
        return None
    doc: dict[str, Any] = {}
    table = doc
    arrays: set[str] = set()  # names made by [[name]]
    for raw in text.split("\n"):
        line = raw.strip(" \t")
        if not line:
            continue
        if line[0] == "#":
            if any((c < " " and c != "\t") or c == "\x7f" for c in line):
                return None
            continue
        if line[0] == "[":
            header = _header(line)
            if header is None:
                return None
            is_array, name = header
            if is_array:
                if name in doc and name not in arrays:
                    return None
                arrays.add(name)
                table = {}
                doc.setdefault(name, []).append(table)
            else:
                if name in doc:
                    return None
                table = doc[name] = {}
            continue
        pair = _key_value(line)
        if pair is None or pair[0] in table:
            return None
        table[pair[0]] = pair[1]
    return doc


def token_path(state_dir: str, listen: str = DEFAULT_CONTROL_LISTEN) -> str:
    """The command listener's token file: beside the socket of a Unix listener ``listen``
    (its directory is the one group ``vmbusify`` may be granted), else under ``state_dir``."""
    kind, where, _port = parse_control_listen(listen)
    if kind == "unix":
        return os.path.join(os.path.dirname(where), TOKEN_FILE)
    return os.path.join(state_dir, TOKEN_FILE)


def parse_control_listen(listen: str) -> tuple[str, str, int]:
    """The command listener's address: ("unix", PATH, 0) for ``unix:/abs/path``, ("tcp",
    HOST, PORT) for ``tcp:HOST:PORT`` or plain ``HOST:PORT`` (development only); ConfigError
    if malformed."""
    if listen.startswith("unix:"):
        path = listen[len("unix:"):]
        if not path.startswith("/") or path.endswith("/") or "\0" in path:
            raise ConfigError(f"bad listen address {listen!r} (expected unix:/absolute/path)")
        return "unix", os.path.normpath(path), 0
    host, port = split_listen(listen.removeprefix("tcp:"))
    return "tcp", host, port


def split_listen(listen: str) -> tuple[str, int]:
    """``127.0.0.1:6543`` -> ("127.0.0.1", 6543); raises ConfigError if malformed."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"bad listen address {listen!r} (expected HOST:PORT)")
    return host.strip("[]") or "127.0.0.1", int(port)


def listener_of(path: str | os.PathLike[str] | None = None) -> tuple[str, str, int, str]:
    """(kind, path or host, port, token file) of this endpoint's command listener, read from
    the file alone (``parse_control_listen`` says what the first three are).

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
    try:
        kind, where, port = parse_control_listen(listen)
    except ConfigError as exc:
        raise ConfigError(f"{chosen}.control.listen: {exc}") from None
    return kind, where, port, token_path(state_dir, listen)


def read_private_file(path: str, what: str, limit: int) -> bytes:
    """The bytes of a secret file (a key, credentials), which must be a regular file owned
    by this user that neither group nor others may read or write: anything else raises
    ConfigError naming ``what``, the file and the fix. Links are not followed; a file larger
    than ``limit`` bytes is refused."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path}: not a regular file")
        if st.st_uid != os.geteuid():
            raise ConfigError(f"{what} {path}: owned by uid {st.st_uid}, not by this user "
                              f"(uid {os.geteuid()}): chown it")
        if st.st_mode & 0o077:
            raise ConfigError(f"{what} {path}: group or others may read or write it (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
        data = os.read(fd, limit + 1)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ConfigError(f"{what} {path}: larger than {limit} bytes")
    return data
