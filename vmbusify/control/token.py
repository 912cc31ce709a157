"""The command listener's bearer token: made at first start, readable by root only."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from vmbusify.errors import ControlError


def ensure_token(path: Path) -> str:
    """Return the token at ``path``, creating it (mode 0600, dir 0700) if it does not exist."""
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


def read_token(path: Path) -> str:
    """The token a client presents; a clear ControlError when it cannot be read."""
    try:
        token = path.read_text().strip()
    except PermissionError:
        raise ControlError(f"cannot read the control token {path}: run as root") from None
    except FileNotFoundError:
        raise ControlError(f"no control token at {path}: is the command listener running "
                           "(supervisorctl status control)?") from None
    except OSError as exc:
        raise ControlError(f"cannot read the control token {path}: {exc.strerror}") from None
    if not token:
        raise ControlError(f"the control token {path} is empty")
    return token


def token_matches(presented: str, expected: str) -> bool:
    """Constant-time comparison of a presented token."""
    return hmac.compare_digest(presented.encode(), expected.encode())
