"""The bus's two lanes end to end (docs/protocol.md, "The bus: two lanes"): beside a stream
that saturates both ZeroMQ hops, an exec's output and its EXIT take different lanes, and not
a byte is lost or reordered (real muxes, listener, executor and vmbusifyexec clients)."""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.exec_harness import ExecStack, module_stack

stack = module_stack("lanes")


@pytest.fixture
def hog(stack: ExecStack) -> Iterator[subprocess.Popen[bytes]]:
    """An exec streaming /dev/zero at full speed: its bytes fill the bulk lane of every hop."""
    p = stack.popen("vm1", "--", "cat", "/dev/zero", stdout=subprocess.DEVNULL,
                    stdin=subprocess.DEVNULL)
    time.sleep(1.0)  # up to speed
    assert p.poll() is None
    yield p
    p.terminate()
    p.wait(15)


#: Sizes around what matters: nothing, one byte, one package, a few packages, a credit window.
SIZES = [0, 1, 1000, (1 << 20) - 1, 1 << 20, (3 << 20) + 17, 9 << 20]


@pytest.mark.timeout(300)
def test_output_then_exit_loses_nothing_beside_a_stream(stack: ExecStack, tmp_path: Path,
                                                        hog: subprocess.Popen[bytes]) -> None:
    """The EXIT and EOFs go on the control lane, the bytes on the bulk lane behind the hog's:
    every exec's stdout and stderr arrive whole, in order, and then its status."""
    blobs = []
    for n in SIZES:
        blob = tmp_path / f"blob{n}"
        blob.write_bytes(bytes((i * 7 + n) % 251 for i in range(min(n, 1 << 16))) * (
            n // (1 << 16) + 1))
        with open(blob, "r+b") as fh:
            fh.truncate(n)
        blobs.append(blob)

    def one(i: int) -> None:
        blob = blobs[i % len(blobs)]
        want = blob.read_bytes()
        # The program writes its output and exits at once: EXIT is sent right behind the last
        # bytes, so it would overtake them if the lanes did not keep a stream's order.
        p = stack.run("vm1", "--", "sh", "-c", f'cat "$1"; printf "err{i}" >&2; exit {i % 7}',
                      "sh", str(blob), timeout=120)
        assert p.returncode == i % 7, p.stderr[-500:]
        assert p.stderr == f"err{i}".encode()
        assert len(p.stdout) == len(want), (i, len(p.stdout), len(want))
        assert hashlib.sha256(p.stdout).digest() == hashlib.sha256(want).digest()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(3 * len(SIZES))))
    assert hog.poll() is None  # the stream went on all along


@pytest.mark.timeout(120)
def test_stdin_then_eof_reaches_the_program_whole_beside_a_stream(
        stack: ExecStack, hog: subprocess.Popen[bytes]) -> None:
    """The other direction: stdin bytes (bulk) then its EOF (control) from the listener."""
    data = bytes(range(256)) * 8000  # ~2 MiB
    for _ in range(5):
        p = stack.run("-i", "vm1", "--", "sha256sum", input=data, timeout=60)
        assert p.returncode == 0, p.stderr
        assert p.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
