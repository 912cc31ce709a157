"""Run a system command (ip, nft) by argument list and turn a failure into SubnetError.

The programs the subnet needs live in ``/usr/sbin`` (or ``/sbin``), which a supervisord
started without them on ``PATH`` does not search: the command's name is looked up on ``PATH``
and then in the system directories, and a program found nowhere is a clear SubnetError.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

from vmbusify.errors import SubnetError
from vmbusify.system import run_command

#: Searched after PATH: where Debian (and every other distribution) installs ip and nft.
SYSTEM_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin")
#: The Debian package of each program, for the error when it is missing.
PACKAGES = {"ip": "iproute2", "nft": "nftables"}
_found: dict[str, str] = {}


def find_program(name: str) -> str:
    """The full path of program ``name``: on PATH or in SYSTEM_DIRS; SubnetError if absent."""
    if name in _found:
        return _found[name]
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SYSTEM_DIRS))
    if path is None:
        package = PACKAGES.get(name, name)
        raise SubnetError(f"{name}: command not found on PATH or in {', '.join(SYSTEM_DIRS)} "
                          f"(the subnet needs it: install the {package} package)")
    _found[name] = path
    return path


def run(argv: Sequence[str], *, input: str | None = None, check: bool = True,
        timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (no shell) capturing output; with ``check`` a failure raises SubnetError
    carrying the command and the last line of its error output. ``argv[0]`` is looked up with
    ``find_program``."""
    return run_command([find_program(argv[0]), *argv[1:]], error=SubnetError, check=check,
                       input=input, timeout=timeout)
