"""bench/files.py's fresh file system for the tree figure: a new ext4 mounted for the copies,
visible in another mount namespace (as the lab VMs' are), and nothing left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from bench.files import fresh_ext4

pytestmark = pytest.mark.root


def _loop_devices() -> str:
    return subprocess.run(["losetup", "-a"], capture_output=True, text=True,
                          check=False).stdout


@pytest.fixture
def loop_ok() -> None:
    if shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
        pytest.skip("needs mkfs.ext4 and losetup (bin/setup installs e2fsprogs)")
    if subprocess.run(["losetup", "--find"], capture_output=True, check=False).returncode:
        pytest.skip("no free loop device on this machine")


def test_a_fresh_ext4_is_mounted_for_the_copies_and_removed_after(
        loop_ok: None, tmp_path: Path) -> None:
    where = tmp_path / "fs"
    with fresh_ext4(where, mib=64) as at:
        assert at == where
        fstype = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", str(at)],
                                capture_output=True, text=True, check=True).stdout.strip()
        assert fstype == "ext4"
        assert sorted(p.name for p in at.iterdir()) == ["lost+found"]  # a new file system
        image = str(where.with_suffix(".img"))
        assert image in _loop_devices()
        (at / "f").write_text("x")
    assert not where.exists() and not Path(image).exists()
    assert image not in _loop_devices()


def test_the_fresh_ext4_is_mounted_in_a_namespace_made_before_it(
        loop_ok: None, tmp_path: Path) -> None:
    """As a lab VM's programs (``ip netns exec`` made their mount namespace at lab up): a
    mount made here afterwards is not theirs unless fresh_ext4 mounts it there too."""
    other = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{other.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        enter = ["nsenter", f"--mount=/proc/{other.pid}/ns/mnt", "--"]
        with fresh_ext4(tmp_path / "fs", mib=64, also_in=[other.pid]) as at:
            (at / "f").write_text("written here")
            seen = subprocess.run([*enter, "cat", str(at / "f")], capture_output=True,
                                  text=True, check=False)
            assert seen.stdout == "written here", seen.stderr
        gone = subprocess.run([*enter, "mountpoint", "-q", str(tmp_path / "fs")],
                              check=False)
        assert gone.returncode != 0  # unmounted there too
    finally:
        other.kill()
        other.wait()
