"""Run a system command (ip, nft) by argument list and turn a failure into SubnetError."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from vmbusify.errors import SubnetError


def run(argv: Sequence[str], *, input: str | None = None, check: bool = True,
        timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (no shell) capturing output; with ``check`` a failure raises SubnetError
    carrying the command and the last line of its error output."""
    try:
        proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, check=False,
                              timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError:
        raise SubnetError(f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise SubnetError(f"`{' '.join(argv)}` took longer than {timeout:g} s") from None
    if check and proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise SubnetError(f"`{' '.join(argv)}` failed: {lines[-1] if lines else proc.returncode}")
    return proc
