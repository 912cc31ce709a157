"""A bad VMBUSIFY_LAB_INSTANCE is one line from `vmbusify lab`, not a traceback (the lab's
layout checks it as it loads, which happens as the `vmbusify` program starts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

VMBUSIFY = Path(sys.executable).with_name("vmbusify")


@pytest.mark.skipif(not VMBUSIFY.exists(), reason="needs the installed `vmbusify` program")
def test_a_bad_lab_instance_is_one_line_and_leaves_the_other_commands_alone() -> None:
    env = {**os.environ, "VMBUSIFY_LAB_INSTANCE": "toolongname"}
    lab = subprocess.run([str(VMBUSIFY), "lab", "status", "--json"], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert lab.returncode == 1
    assert "Traceback" not in lab.stderr
    assert lab.stderr.startswith("Error: VMBUSIFY_LAB_INSTANCE must be 1-6 lower-case")
    assert "'toolongname'" in lab.stderr
    other = subprocess.run([str(VMBUSIFY), "check-config", os.devnull], env=env,
                           capture_output=True, text=True, timeout=60, check=False)
    assert other.returncode == 0, other.stderr
