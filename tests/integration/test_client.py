"""The Python API (vmbusify.client) against a real host and guest stack (two muxes, the
command listener and the executor as processes; no root): what a caller of each method sees."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.exec_harness import ExecStack, start_stack
from tests.integration.test_exec import marked, wait_gone
from vmbusify.client import Client, ExecFailed, ExitReason, Failure, Stream
from vmbusify.errors import UnknownVMError


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExecStack]:
    s = start_stack(tmp_path_factory.mktemp("client"))
    yield s
    s.stop()


@pytest.fixture
def client(stack: ExecStack) -> Client:
    return Client(stack.pair.host.config_path, timeout=20)


def test_status_lists_the_connected_vm(client: Client) -> None:
    st = client.status()
    assert st.role == "host" and st.pid > 0
    vm = st.vm("vm1")
    assert vm.connected and vm.state == "connected"
    assert vm.rtt_ms is None or vm.rtt_ms >= 0
    assert vm.bytes_in > 0 and vm.bytes_out > 0
    assert [v.vmid for v in client.vms()] == [v.vmid for v in st.vms]
    assert client.ping("vm1") > 0


def test_run_gives_output_and_status(client: Client) -> None:
    r = client.run("vm1", ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.exit_code, r.reason, r.stdout, r.stderr) == (3, ExitReason.EXITED, b"out\n",
                                                           b"err\n")
    assert not r.ok
    with pytest.raises(ExecFailed, match="vm1: exited with status 3") as info:
        r.check()
    assert info.value.result is r
    assert client.run("vm1", "printf '%s' \"$X\"", env={"X": "y z"}, check=True).stdout == b"y z"


def test_run_sends_stdin_larger_than_a_window(client: Client) -> None:
    data = bytes(range(256)) * (12 << 12)  # 12 MiB: more than one credit window each way
    r = client.run("vm1", ["cat"], input=data, check=True)
    assert r.stdout == data


def test_timeout_kills_the_program(client: Client) -> None:
    start = time.monotonic()
    r = client.run("vm1", ["sleep", "30"], timeout=0.5)
    assert (r.exit_code, r.reason) == (124, ExitReason.TIMEOUT)
    assert time.monotonic() - start < 10


def test_not_found_and_unknown_vm(client: Client) -> None:
    r = client.run("vm1", ["/no/such/program"])
    assert (r.exit_code, r.reason) == (127, ExitReason.NOT_FOUND) and r.message
    with pytest.raises(Failure) as info:
        client.run("no-such-vm", ["true"])
    assert info.value.exit_status == 255 and "no-such-vm" in str(info.value)
    with pytest.raises(UnknownVMError):
        client.ping("no-such-vm")


def test_streams_and_signals(client: Client) -> None:
    with client.start("vm1", "trap 'echo got-term; exit 7' TERM; echo ready; "
                             "while :; do sleep 0.1; done", stdin=True) as proc:
        assert proc.read(10) == (Stream.STDOUT, b"ready\n")
        proc.signal("TERM")
        chunks = list(proc)
        assert b"".join(c for s, c in chunks if s is Stream.STDOUT) == b"got-term\n"
        assert proc.result is not None and proc.result.exit_code == 7
    with client.start("vm1", ["sleep", "30"]) as proc:
        proc.signal(signal.SIGINT)
        r = proc.wait(10)
        assert (r.exit_code, r.reason) == (128 + signal.SIGINT, ExitReason.SIGNALED)


def test_read_times_out_and_close_kills_the_program(client: Client) -> None:
    tag = f"{time.time_ns() % 10**6 + 1000}.25"
    proc = client.start("vm1", ["sleep", tag])
    with pytest.raises(TimeoutError):
        proc.read(0.3)
    assert marked(tag)
    proc.close()
    wait_gone(tag, 15)


def test_interactive_stdin_and_eof(client: Client) -> None:
    with client.start("vm1", ["sort"], stdin=True) as proc:
        proc.write(b"b\na\n")
        proc.close_stdin()
        r = proc.communicate()
    assert (r.exit_code, r.stdout) == (0, b"a\nb\n")


def test_spawn_returns_the_pid(client: Client) -> None:
    tag = f"{time.time_ns() % 10**6 + 1000}.5"
    pid = client.spawn("vm1", ["sleep", tag])
    assert pid > 0
    out = client.run("vm1", ["cat", f"/proc/{pid}/cmdline"], check=True).stdout
    assert out.split(b"\0")[:2] == [b"sleep", tag.encode()]
    client.run("vm1", ["kill", str(pid)], check=True)


def test_importing_the_api_is_lazy() -> None:
    """vmbusifyexec imports vmbusify.client.wire: the package must not load the whole API."""
    code = ("import sys, vmbusify.client.wire; "
            "print(' '.join(m for m in sys.modules if m.startswith('vmbusify')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert "vmbusify.client.wire" in out
    assert not {"vmbusify.client.api", "vmbusify.config", "vmbusify.client.execution"} & set(out)


def test_push_and_pull_a_file(client: Client, tmp_path: Path) -> None:
    source = tmp_path / "src.bin"
    source.write_bytes(bytes(range(256)) * 4096)
    remote = tmp_path / "in-vm"
    remote.mkdir()
    pushed = client.push("vm1", source, f"{remote}/copy.bin", checksum=True)
    assert pushed.ok
    assert client.run("vm1", ["cat", f"{remote}/copy.bin"], check=True).stdout == \
        source.read_bytes()
    back = tmp_path / "back"
    back.mkdir()
    assert client.pull("vm1", f"{remote}/copy.bin", back).ok
    assert (back / "copy.bin").read_bytes() == source.read_bytes()
