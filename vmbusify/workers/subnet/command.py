"""Run a system command (ip, nft) by argument list and turn a failure into SubnetError."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from vmbusify.errors import SubnetError
from vmbusify.system import run_command


def run(argv: Sequence[str], *, input: str | None = None, check: bool = True,
        timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (no shell) capturing output; with ``check`` a failure raises SubnetError
    carrying the command and the last line of its error output."""
    return run_command(argv, error=SubnetError, check=check, input=input, timeout=timeout)
