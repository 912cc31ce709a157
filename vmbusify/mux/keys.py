"""Shared tunnel keys: read from root-only files, refused with one clear line otherwise."""

from __future__ import annotations

import os
import stat

from vmbusify.errors import ConfigError

#: A key shorter than this (after trimming whitespace) is refused: too easy to guess.
MIN_KEY = 16
#: A key file larger than this is not a key.
MAX_KEY_FILE = 4096
#: How to make a good key, for the error lines.
HOW_TO_MAKE = "(umask 077; head -c 32 /dev/urandom | base64 > FILE)"


def load_key(path: str) -> bytes:
    """The key in ``path``: its bytes with surrounding whitespace trimmed.

    The file must be a regular file owned by this user (root) that neither group nor others
    may read or write; anything else raises ConfigError naming the file and the fix.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"key file {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"key file {path}: not a regular file")
        if st.st_uid != os.geteuid():
            raise ConfigError(f"key file {path}: owned by uid {st.st_uid}, not by this user "
                              f"(uid {os.geteuid()}): chown it")
        if st.st_mode & 0o077:
            raise ConfigError(f"key file {path}: group or others may read or write it (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
        data = os.read(fd, MAX_KEY_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"key file {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise ConfigError(f"key file {path}: larger than {MAX_KEY_FILE} bytes: not a key")
    key = data.strip()
    if len(key) < MIN_KEY:
        raise ConfigError(f"key file {path}: the key is {len(key)} bytes, at least {MIN_KEY} "
                          f"are needed; make one with {HOW_TO_MAKE.replace('FILE', path)}")
    return key
