"""Shared tunnel keys: read from root-only files, refused with one clear line otherwise."""

from __future__ import annotations

from vmbusify.config_file import read_private_file
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
    data = read_private_file(path, "key file", MAX_KEY_FILE)
    key = data.strip()
    if len(key) < MIN_KEY:
        raise ConfigError(f"key file {path}: the key is {len(key)} bytes, at least {MIN_KEY} "
                          f"are needed; make one with {HOW_TO_MAKE.replace('FILE', path)}")
    return key
