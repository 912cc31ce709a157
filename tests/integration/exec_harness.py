"""A host (mux + command listener) and a guest (mux + exec worker) as real processes, for
tests and benchmarks of vmbusifyexec without root (see tests/integration/harness.py)."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.harness import BIN, Pair, make_pair
from vmbusify.config import load_config
from vmbusify.config_file import parse_control_listen
from vmbusify.control.token import read_token
from vmbusify.control.verify import connect_unix_socket

EXEC = str(BIN / "vmbusifyexec")


@dataclass
class Listener:
    """The command listener of a stack, for tests that speak its HTTP themselves."""

    kind: str
    where: str
    port: int
    token: str

    def connect(self, timeout: float = 10) -> socket.socket:
        """A raw connection (no checks: the tests know whose listener it is)."""
        if self.kind == "unix":
            return connect_unix_socket(self.where, timeout)
        return socket.create_connection((self.where, self.port), timeout=timeout)

    def http(self, timeout: float = 10) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("localhost", timeout=timeout)
        conn.sock = self.connect(timeout)
        return conn


@dataclass
class ExecStack:
    """A host (mux + command listener) and a guest (mux + exec worker)."""

    pair: Pair
    control: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]

    exec_path: str = EXEC

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "VMBUSIFY_CONFIG": str(self.pair.host.config_path)}

    def run(self, *args: str, input: bytes | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([EXEC, *args], input=input, capture_output=True, check=False,
                              env=self.env, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def popen(self, *args: str, **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen([EXEC, *args], env=self.env, **kw)  # type: ignore[call-overload]

    def listener(self) -> Listener:
        config = load_config(self.pair.host.config_path)
        return Listener(*parse_control_listen(config.control.listen),
                        read_token(config.token_path))

    def stop(self) -> None:
        for p in (self.control, self.worker):
            if p.poll() is None:
                p.terminate()
                p.wait(15)
        self.pair.stop()


def start_stack(root: Path) -> ExecStack:
    """Start the four processes under ``root``; returns once `vmbusifyexec vm1 true` works."""
    pair = make_pair(root)
    vmbusify = str(BIN / "vmbusify")
    with open(root / "control.log", "ab") as log:
        control = subprocess.Popen(
            [vmbusify, "control", "--config", str(pair.host.config_path)],
            stdout=log, stderr=subprocess.STDOUT)
    with open(root / "exec.log", "ab") as log:
        # Started as by `nohup` from a background shell job (SIGHUP, SIGINT and SIGQUIT
        # ignored): the programs it starts must still get those signals' default actions.
        worker = subprocess.Popen(
            ["sh", "-c", 'trap "" HUP INT QUIT; exec "$@"', "sh",
             vmbusify, "worker", "exec", "--config", str(pair.guest.config_path)],
            stdout=log, stderr=subprocess.STDOUT)
    stack = ExecStack(pair, control, worker)
    deadline = time.monotonic() + 60
    try:
        while True:
            proc = stack.run("vm1", "--", "true", timeout=30)
            if proc.returncode == 0:
                return stack
            if time.monotonic() > deadline:
                raise AssertionError(f"exec never worked: {proc.stderr!r}")
            time.sleep(0.3)
    except BaseException:
        stack.stop()  # never leave the four processes behind a failed start
        raise


def module_stack(name: str) -> Callable[..., Iterator[ExecStack]]:
    """A module-scoped pytest fixture of a stack under a temporary directory ``name``:
    ``stack = module_stack("lanes")`` in a test module."""
    import pytest  # here: bench/exec.py imports this module without pytest

    @pytest.fixture(scope="module")
    def stack(tmp_path_factory: Any) -> Iterator[ExecStack]:
        s = start_stack(tmp_path_factory.mktemp(name))
        yield s
        s.stop()

    return stack
