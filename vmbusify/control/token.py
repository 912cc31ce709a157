"""The command listener's bearer token: made at first start, readable by root only.

Clients import this module for ``read_token`` alone, so it loads nothing beyond ``os`` at
import time (vmbusifyexec's start is its latency).
"""

from __future__ import annotations

import os

from vmbusify.errors import ControlError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path


def ensure_token(path: Path) -> str:
    """Return the token at ``path``, creating it (mode 0600, dir 0700) if it does not exist."""
    import secrets

    from vmbusify.bus.sockets import ensure_private_dir  # here: clients must not load ZeroMQ

    ensure_private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        return read_token(path)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def read_token(path: str | os.PathLike[str]) -> str:
    """The token a client presents; a clear ControlError when it cannot be read."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except PermissionError:
        raise ControlError(f"cannot read the control token {path}: run as root") from None
    except FileNotFoundError:
        raise ControlError(f"no control token at {path}: is the command listener running "
                           "(supervisorctl status control)?") from None
    except OSError as exc:
        raise ControlError(f"cannot read the control token {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ControlError(f"the control token {path} is not text") from None
    if not token:
        raise ControlError(f"the control token {path} is empty")
    return token


def token_matches(presented: str, expected: str) -> bool:
    """Constant-time comparison of a presented token."""
    import hmac

    return hmac.compare_digest(presented.encode(), expected.encode())
