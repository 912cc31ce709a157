"""Which configuration the CLIs use, what access they need, and hints that work as typed.

Shared by ``vmbusifyctl`` and ``vmbusifyexec``; light on purpose (os and glob only at import:
``vmbusifyexec`` starts once per command, docs/exec.md "A light client").

The configuration: ``--config``, else ``$VMBUSIFY_CONFIG``, else ``/etc/vmbusify/vmbusify.toml``
when it exists. With none of these, a lab: ``$VMBUSIFY_LAB_INSTANCE``'s when it is set, else
the one lab running on this machine (``vmbusify lab up``); with several running, ConfigError
says what to export. With no lab either, the defaults (a guest's, or a host installed without
a file).
"""

from __future__ import annotations

import os

from vmbusify.config_file import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_GROUP,
    DEFAULT_RUN_DIR,
    listener_of,
    parse_control_listen,
    read_config_file,
)
from vmbusify.control.token import ListenerDown
from vmbusify.errors import ConfigError, VMBusifyError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

#: Where labs live: ``/run/vmbusify-lab`` (the default instance) and ``/run/vmbusify-lab-NAME``
#: (vmbusify/lab/layout.py's LAB_ROOT). A lab is running while its host config is there
#: (``lab down`` removes the directory).
LAB_PARENT = "/run"
LAB_DIR_PREFIX = "vmbusify-lab"
LAB_HOST_CONFIG = "host/vmbusify.toml"


def lab_config_path(instance: str = "") -> str:
    """The host config of lab ``instance`` ("" = the default lab)."""
    name = LAB_DIR_PREFIX + (f"-{instance}" if instance else "")
    return os.path.join(LAB_PARENT, name, LAB_HOST_CONFIG)


def running_labs() -> list[tuple[str, str]]:
    """(instance, host config path) of every lab whose host config exists, sorted."""
    import glob

    found = []
    for path in sorted(glob.glob(os.path.join(LAB_PARENT, LAB_DIR_PREFIX + "*",
                                              LAB_HOST_CONFIG))):
        name = os.path.basename(os.path.dirname(os.path.dirname(path)))
        instance = name[len(LAB_DIR_PREFIX):].removeprefix("-")
        if name == LAB_DIR_PREFIX or name.startswith(LAB_DIR_PREFIX + "-"):
            found.append((instance, path))
    return found


def _exports(labs: Iterable[tuple[str, str]]) -> str:
    return ", or ".join(f"export VMBUSIFY_CONFIG={path}" for _instance, path in labs)


def config_path(explicit: str | None = None) -> str | None:
    """The configuration file to read, or None for the defaults (see the module's note)."""
    chosen = explicit or os.environ.get("VMBUSIFY_CONFIG")
    if chosen:
        return chosen
    if os.path.lexists(DEFAULT_CONFIG_PATH):
        return DEFAULT_CONFIG_PATH
    instance = os.environ.get("VMBUSIFY_LAB_INSTANCE", "").strip()
    if instance:
        path = lab_config_path(instance)
        if not os.path.exists(path):
            raise ConfigError(f"VMBUSIFY_LAB_INSTANCE={instance}, but that lab is not up (no "
                              f"{path}): VMBUSIFY_LAB_INSTANCE={instance} vmbusify lab up")
        return path
    labs = running_labs()
    if len(labs) == 1:
        return labs[0][1]
    if len(labs) > 1:
        raise ConfigError(f"no {DEFAULT_CONFIG_PATH} and {len(labs)} labs are running: "
                          f"pick one: {_exports(labs)}")
    return None


def supervisorctl_hint(run_dir: str, *args: str) -> str:
    """A supervisorctl command line that reaches this endpoint's supervisord as typed: its
    socket named (``-s``: conf/supervisord.conf cannot be read without its variables set),
    the supervisorctl beside this Python when none is on PATH, ``sudo`` for a non-root user
    (the socket is root's)."""
    import shutil
    import sys

    ctl = shutil.which("supervisorctl")
    beside = os.path.join(os.path.dirname(sys.executable), "supervisorctl")
    if ctl is None or (os.path.exists(beside) and os.path.realpath(ctl)
                       != os.path.realpath(beside)):
        ctl = beside if os.path.exists(beside) else "supervisorctl"
    sudo = "sudo " if os.geteuid() != 0 else ""
    return f"{sudo}{ctl} -s unix://{run_dir}/supervisor.sock {' '.join(args)}".rstrip()


def _group_state(group: str) -> tuple[bool, bool, bool]:
    """(the group exists, this user is a member per the group database, this process has
    it)."""
    import grp
    import pwd

    try:
        entry = grp.getgrnam(group)
    except KeyError:
        return False, False, False
    try:
        user = pwd.getpwuid(os.getuid())
        member = user.pw_name in entry.gr_mem or user.pw_gid == entry.gr_gid
    except KeyError:
        member = False
    return True, member, entry.gr_gid in os.getgroups() or os.getegid() == entry.gr_gid


def access_needed(prog: str, what: str, group: str = DEFAULT_GROUP) -> str:
    """One sentence: ``what`` was refused to this (non-root) user, the access ``prog`` needs
    and how to get it (docs/deploy.md "Who may use it")."""
    group = group or DEFAULT_GROUP
    exists, member, has = _group_state(group)
    head = f"permission denied on {what}: {prog} needs root or group {group}"
    if not exists:
        return (f"{head}, and there is no group {group} on this machine (packaging/install.sh "
                f"host makes it): run it as root (sudo {prog} ...)")
    if member and not has:
        return (f"{head}: you are in group {group}, but this login session is not yet: log "
                f"in again (or start a shell with: newgrp {group})")
    return (f"{head}: ask an administrator to run: sudo usermod -aG {group} "
            f"{_user_name()} (then log in again), or run it as root (sudo {prog} ...)")


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def explain(prog: str, exc: Exception, explicit: str | None = None) -> str:
    """The one line a CLI prints for ``exc``: for a non-root user refused the config file, the
    token or the listener's socket, what access is needed (once, whichever was refused
    first); for a listener that is not running, the reason and a supervisorctl command that
    shows it; otherwise the error's own text."""
    try:
        path = config_path(explicit)
        if os.geteuid() != 0:
            if path and _denied(path, os.R_OK):
                return access_needed(prog, path)
            st = Settings(path)
            if _denied(st.token_path, os.R_OK):
                return access_needed(prog, st.token_path, st.group)
            if st.socket_path and _denied(st.socket_path, os.W_OK):
                return access_needed(prog, st.socket_path, st.group)
        if isinstance(exc, ListenerDown):
            hint = supervisorctl_hint(Settings(path).run_dir, "status", "control")
            return f"{exc}: see {hint}"
    except VMBusifyError:
        pass
    return str(exc)


def _denied(path: str, mode: int) -> bool:
    """Whether ``path`` is there but refused to this user (missing: not refused)."""
    try:
        os.stat(path)
    except PermissionError:
        return True
    except OSError:
        return False
    return not os.access(path, mode)


class Settings:
    """The few keys a client of the command listener needs, read with config_file alone (the
    whole model, vmbusify.config, is for the programs and ``vmbusify check-config``)."""

    def __init__(self, path: str | None) -> None:
        chosen, raw = read_config_file(path)
        self.path = chosen
        self.kind, self.where, self.port, self.token_path = listener_of(path)
        self.listen = raw.get("control", {}).get("listen", "")
        if not self.listen:
            self.listen = ("unix:" + self.where if self.kind == "unix"
                           else f"tcp:{self.where}:{self.port}")
        parse_control_listen(self.listen)  # listener_of checked it
        run_dir = raw.get("run_dir", DEFAULT_RUN_DIR)
        self.run_dir = run_dir if isinstance(run_dir, str) else DEFAULT_RUN_DIR
        group = raw.get("control", {}).get("group", DEFAULT_GROUP)
        self.group = group if isinstance(group, str) else DEFAULT_GROUP

    @property
    def socket_path(self) -> str:
        """The listener's Unix socket ("" for a TCP listener)."""
        return self.where if self.kind == "unix" else ""
