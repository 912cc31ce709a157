"""The command listener's directory: root's, mode 0750 with the granted group, else 0700.

Granting the group lets its members reach the socket and read the token beside it, as
docker.sock's group does; nothing else of VMBusify is in that directory (the ZeroMQ
endpoints stay in run_dir, 0700).
"""

from __future__ import annotations

import grp
import logging
import os
import stat

from vmbusify.errors import ControlError

log = logging.getLogger("vmbusify.control")


def group_id(name: str) -> int | None:
    """The gid of group ``name``, None if it is "" or does not exist."""
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def prepare_dir(path: str, gid: int | None) -> int | None:
    """Make ``path`` this user's directory, mode 0750 with group ``gid`` (0700 when None);
    the group it was given (None: none, or this user may not give it that group).

    An existing directory must be this user's and no link: a directory someone else made
    is refused (they could swap the socket or read the token), not adopted.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ControlError(f"cannot make the command listener's directory {path}: "
                           f"{exc.strerror}") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise ControlError(f"{path} is not a directory of uid {os.geteuid()}: refusing to put "
                           "the command listener there")
    os.chmod(path, 0o700)  # first close it, then open it to the group
    if gid is not None:
        try:
            os.chown(path, -1, gid)
        except PermissionError:
            log.warning("cannot give %s to gid %d: root only", path, gid)
            return None
        os.chmod(path, 0o750)
    return gid


def secure_socket(path: str, gid: int | None) -> None:
    """The socket file: 0660 with group ``gid`` (0600 when None)."""
    if gid is not None:
        try:
            os.chown(path, -1, gid)
        except PermissionError:
            gid = None
    os.chmod(path, 0o660 if gid is not None else 0o600)
