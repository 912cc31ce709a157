"""Who may use the host proxy and ``vmbusifyctl forward``: root and members of group
``vmbusify`` without credentials, other local users with credentials from a root-only file.

The connecting user is the owner of the client's socket (users/peer.py), asked once per
connection. Membership is the group database's (primary group or member list), cached for
a few seconds per uid. Credentials are ``user:password`` lines of ``[proxy]
credentials_file`` (root's, mode 0600 or 0400; re-read when it changes) plus the inline
``[proxy] username``/``password`` pair.
"""

from __future__ import annotations

import grp
import hmac
import logging
import os
import pwd
import time
from enum import Enum

from vmbusify.config import ProxyConfig, Role
from vmbusify.config_file import read_private_file
from vmbusify.errors import ConfigError

log = logging.getLogger("vmbusify.access")

#: Seconds a uid's membership answer is kept (a user added to the group waits this long).
MEMBERSHIP_TTL = 10.0


class AccessMode(str, Enum):
    """Who a proxy listener serves (``[proxy] access``)."""

    OPEN = "open"                #: every local user
    GROUP = "group"              #: root and the group; others with credentials
    CREDENTIALS = "credentials"  #: everyone with credentials


def access_mode(cfg: ProxyConfig, role: Role) -> AccessMode:
    """The mode ``[proxy] access`` asks for, "auto" resolved: "group" on the host; on a
    guest "open" (its proxy is for every guest process), "credentials" when some are set."""
    if cfg.access != "auto":
        return AccessMode(cfg.access)
    if role is Role.HOST:
        return AccessMode.GROUP
    return AccessMode.CREDENTIALS if cfg.username or cfg.credentials_file else AccessMode.OPEN


class LocalUsers:
    """Whether a local uid is served without credentials: root, this process's own user,
    and members of ``group``."""

    def __init__(self, group: str, ttl: float = MEMBERSHIP_TTL) -> None:
        self.group = group
        self.ttl = ttl
        self._cache: dict[int, tuple[float, bool]] = {}

    def privileged(self, uid: int | None) -> bool:
        """True for root, this process's user and members of the group; False for anyone
        else and for None (an unknown or non-local peer)."""
        if uid is None:
            return False
        if uid in (0, os.geteuid()):
            return True
        now = time.monotonic()
        hit = self._cache.get(uid)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        answer = self._member(uid)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[uid] = (now, answer)
        return answer

    def _member(self, uid: int) -> bool:
        if not self.group:
            return False
        try:
            g = grp.getgrnam(self.group)
        except KeyError:
            return False
        try:
            user = pwd.getpwuid(uid)
        except KeyError:
            return False
        return user.pw_gid == g.gr_gid or user.pw_name in g.gr_mem


def read_credentials(path: str) -> dict[str, str]:
    """``user:password`` lines of a root-only file (``#`` comments and blank lines skipped);
    ConfigError if it cannot be read, is not this user's or others may read it."""
    text = read_private_file(path, "proxy credentials_file", 1 << 20).decode(
        "utf-8", "replace")
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ConfigError(f"proxy credentials_file {path}:{n}: expected user:password")
        if len(user) > 255 or len(password.encode()) > 255:
            raise ConfigError(f"proxy credentials_file {path}:{n}: a user or password longer "
                              "than 255 bytes (RFC 1929's limit)")
        out[user] = password
    return out


class Credentials:
    """The user/password pairs a proxy accepts; the file is re-read when it changes."""

    def __init__(self, path: str = "", username: str = "", password: str = "") -> None:
        self.path = path
        self.inline = {username: password} if username else {}
        self._stamp: tuple[int, int, int] | None = None
        self._from_file: dict[str, str] = {}
        if path:
            self._reload(strict=True)

    @classmethod
    def from_config(cls, cfg: ProxyConfig) -> Credentials:
        return cls(cfg.credentials_file, cfg.username, cfg.password)

    @property
    def configured(self) -> bool:
        """Whether any credentials are set."""
        return bool(self.inline or self.path)

    def _reload(self, strict: bool = False) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
            if stamp == self._stamp:
                return
            self._from_file = read_credentials(self.path)
            self._stamp = stamp
        except (OSError, ConfigError) as exc:
            if strict:
                raise ConfigError(str(exc)) from None
            if self._stamp is not None or self._from_file:
                log.error("%s; accepting none of its credentials until it is fixed", exc)
            self._from_file, self._stamp = {}, None

    def check(self, username: str, password: str) -> bool:
        """Whether ``username``/``password`` is one of the pairs (constant time per pair)."""
        if self.path:
            self._reload()
        ok = False
        for user, secret in (*self.inline.items(), *self._from_file.items()):
            ok |= hmac.compare_digest(username.encode(), user.encode()) & \
                hmac.compare_digest(password.encode(), secret.encode())
        return ok
