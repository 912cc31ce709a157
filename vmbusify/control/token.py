"""The command listener's bearer token: made at first start, readable by root only, or by
root and the group the listener is granted to (0640) when that group exists.

Clients import this module for ``read_token`` alone, so it loads nothing beyond ``os`` at
import time (vmbusifyexec's start is its latency).
"""

from __future__ import annotations

import os

from vmbusify.errors import ControlError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path


class ListenerDown(ControlError):
    """The command listener is not running (no token, no socket, nobody listening). The CLIs
    add how to look, as a command for this endpoint's supervisord (cli/locate.py)."""


def ensure_token(path: Path, gid: int | None = None) -> str:
    """Return the token at ``path``, creating it if it does not exist; its mode is 0640 with
    group ``gid`` when one is given, 0600 otherwise. The directory must exist and be safe
    (the listener makes it: control/sockdir.py); a token file that is not a regular file of
    this user is replaced."""
    import secrets
    import stat

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid()):
        os.unlink(path)  # not ours (or a link): never trust or chmod what it points at
        st = None
    if st is None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, 0o640 if gid is not None else 0o600)
    return read_token(path)


def read_token(path: str | os.PathLike[str]) -> str:
    """The token a client presents; a clear ControlError when it cannot be read."""
    return read_token_owned(path)[0]


def read_token_owned(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(the token, the uid owning the file it was read from); ControlError with a clear
    reason when it cannot be read. The owner is that of the file actually read (fstat), so
    a client sends a token only to its owner or root (control/verify.py)."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            owner = os.fstat(fd).st_uid
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
        token = raw.decode("utf-8").strip()
    except PermissionError:
        raise ControlError(f"cannot read the control token {path}: run as root or as a member "
                           "of group vmbusify") from None
    except FileNotFoundError:
        raise ListenerDown(f"no control token at {path}: the command listener is not "
                           "running (it makes the token when it starts)") from None
    except OSError as exc:
        raise ControlError(f"cannot read the control token {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ControlError(f"the control token {path} is not text") from None
    if not token:
        raise ControlError(f"the control token {path} is empty")
    if any(c in token for c in "\r\n\0 "):
        raise ControlError(f"the control token {path} is malformed")
    return token, owner


def token_matches(presented: str, expected: str) -> bool:
    """Constant-time comparison of a presented token."""
    import hmac

    return hmac.compare_digest(presented.encode(), expected.encode())
