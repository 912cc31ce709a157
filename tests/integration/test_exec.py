"""vmbusifyexec end to end without root: real muxes, the real command listener, the real
exec worker, and the real `vmbusifyexec` client (host and guest on this machine).

Processes started remotely run on this machine too, so psutil can check that none is left.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.integration.exec_harness import ExecStack, start_stack
from tests.integration.harness import BIN
from vmbusify.control.exec_wire import find_listener, open_exec
from vmbusify.protocol.exec_api import Channel
from vmbusify.protocol.websocket import FrameDecoder, Opcode, encode_frame


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExecStack]:
    s = start_stack(tmp_path_factory.mktemp("exec"))
    yield s
    s.stop()


def marked(tag: str) -> list[psutil.Process]:
    """Live processes whose command line contains ``tag`` (and are not this test's clients)."""
    found = []
    for p in psutil.process_iter(["cmdline", "name"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if tag in cmd and "vmbusifyexec" not in cmd and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def wait_marked(tag: str, count: int, timeout: float = 10.0) -> None:
    """Until at least ``count`` processes carry ``tag`` (a shell forks its children a moment
    after it has printed what came before)."""
    deadline = time.monotonic() + timeout
    while len(marked(tag)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(marked(tag)) >= count, [p.cmdline() for p in marked(tag)]


def wait_gone(tag: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while marked(tag):
        assert time.monotonic() < deadline, f"left running: {[p.cmdline() for p in marked(tag)]}"
        time.sleep(0.1)


def test_stdout_stderr_and_exit_status(stack: ExecStack) -> None:
    p = stack.run("vm1", "--", "sh", "-c", "echo out; echo err >&2; printf '\\000\\377'; exit 3")
    assert p.returncode == 3
    assert p.stdout == b"out\n\x00\xff"
    assert p.stderr == b"err\n"


def test_stdin_eof_closes_remote_stdin(stack: ExecStack) -> None:
    p = stack.run("-i", "vm1", "--", "sort", input=b"b\na\n", timeout=20)
    assert (p.returncode, p.stdout, p.stderr) == (0, b"a\nb\n", b"")


def test_stdin_large_and_binary(stack: ExecStack) -> None:
    data = os.urandom(20 << 20)
    p = stack.run("-i", "vm1", "--", "sha256sum", input=data, timeout=60)
    assert p.returncode == 0
    assert p.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("script", ["exec 0<&-; sleep 0.3; echo done", "sleep 0.3; echo done"],
                         ids=["closes its stdin", "never reads it"])
def test_stdin_the_program_does_not_want_is_discarded(stack: ExecStack, script: str) -> None:
    """More stdin than any pipe holds, for a program that closes it or never reads it: the
    program runs to its end, its status and output arrive, nothing hangs."""
    p = stack.run("-i", "vm1", "--", "sh", "-c", script, input=os.urandom(8 << 20), timeout=60)
    assert (p.returncode, p.stdout) == (0, b"done\n"), p.stderr


def test_options_after_vmid_env_workdir(stack: ExecStack, tmp_path: Path) -> None:
    p = stack.run("vm1", "-e", "A=1", "--env", "B=two words", "-w", str(tmp_path), "--",
                  "sh", "-c", 'echo "$A|$B|$(pwd)|$VMBUSIFY_CONFIG"')
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode() == f"1|two words|{tmp_path}|\n"  # the executor's env stays out


def test_output_arrives_while_running(stack: ExecStack) -> None:
    proc = stack.popen("vm1", "--", "sh", "-c", "echo first; sleep 5; echo second",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    start = time.monotonic()
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"first\n"
    assert time.monotonic() - start < 4
    assert proc.wait(20) == 0
    assert proc.stdout.read() == b"second\n"


@pytest.mark.parametrize(("script", "code"), [
    ("kill -TERM $$", 128 + signal.SIGTERM),
    ("kill -KILL $$", 128 + signal.SIGKILL),
    ("exit 0", 0),
    ("exit 255", 255),
])
def test_exit_codes(stack: ExecStack, script: str, code: int) -> None:
    assert stack.run("vm1", "--", "sh", "-c", script).returncode == code


def test_not_found_and_not_executable(stack: ExecStack, tmp_path: Path) -> None:
    p = stack.run("vm1", "--", "no-such-program-xyz")
    assert p.returncode == 127
    assert p.stderr == b"vmbusifyexec: no-such-program-xyz: command not found\n"
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    p = stack.run("vm1", "--", str(script))
    assert p.returncode == 126 and b"permission denied" in p.stderr
    p = stack.run("-w", "/no/such/dir", "vm1", "--", "true")
    assert p.returncode == 126 and b"no such directory" in p.stderr


def test_timeout_kills_the_whole_tree(stack: ExecStack) -> None:
    tag = f"{uuid.uuid4().int % 10**6 + 1000}.5"  # a unique sleep duration to find them by
    start = time.monotonic()
    p = stack.run("--timeout", "1", "vm1", "--", "sh", "-c",
                  f"sleep {tag} & (setsid sleep {tag} &); sleep {tag}")
    assert p.returncode == 124
    assert b"timed out" in p.stderr
    assert time.monotonic() - start < 10
    wait_gone(tag, 3)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_are_forwarded(stack: ExecStack, sig: signal.Signals) -> None:
    name = sig.name[3:]
    proc = stack.popen("vm1", "--", "sh", "-c",
                       f'trap "echo got {name}; exit 7" {name}; echo ready; '
                       f'while :; do sleep 0.1; done',
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(sig)
    assert proc.wait(20) == 7
    assert proc.stdout.read() == f"got {name}\n".encode()


#: A program that, when SIGINT comes, prints what its stdin pipe already holds (without
#: waiting for more) and exits 7.
PEEK_STDIN_ON_INT = """
import os, signal
def on_int(_sig, _frame):
    os.set_blocking(0, False)
    try:
        data = os.read(0, 1 << 16)
    except BlockingIOError:
        data = b""
    os.write(1, b"stdin held: " + data + b"\\n")
    os._exit(7)
signal.signal(signal.SIGINT, on_int)
os.write(1, b"ready\\n")
while True:
    signal.pause()
"""


def test_stdin_sent_before_a_signal_reaches_the_program_first(stack: ExecStack) -> None:
    """Bytes of stdin the client sent before a signal are in the program's stdin before the
    signal comes (as ssh orders a channel's requests after its data): SIGNAL, a control
    message, must not overtake the stream's bytes on the bus's lanes or in the executor."""
    listener = find_listener(str(stack.pair.host.config_path))
    body = json.dumps({"argv": [sys.executable, "-c", PEEK_STDIN_ON_INT],
                       "stdin": True}).encode()
    for round_ in range(20):
        decoder = FrameDecoder()
        sock = open_exec(listener, "vm1", body, decoder, timeout=30)
        try:
            out = b""
            while b"ready\n" not in out:
                out += _next_output(sock, decoder)
            data = f"round {round_} ".encode() * 50
            # One write: the listener reads the stdin frame before the signal frame.
            sock.sendall(encode_frame(Opcode.BINARY, bytes([Channel.STDIN]) + data)
                         + encode_frame(Opcode.BINARY, bytes([Channel.SIGNAL])
                                        + b'{"signal": "INT"}'))
            while b"\n" not in out[len(b"ready\n"):]:
                out += _next_output(sock, decoder)
            assert out == b"ready\nstdin held: " + data + b"\n", (round_, out)
        finally:
            sock.close()


def test_a_signal_does_not_wait_behind_stdin_the_program_does_not_read(stack: ExecStack
                                                                      ) -> None:
    """Held behind stdin, a signal must still reach a program that reads no more of it:
    once its stdin pipe is full, what is held goes (Ctrl-C must stop a stuck program)."""
    listener = find_listener(str(stack.pair.host.config_path))
    script = 'trap "echo got INT; exit 7" INT; echo ready; while :; do sleep 0.1; done'
    body = json.dumps({"argv": ["sh", "-c", script], "stdin": True}).encode()
    decoder = FrameDecoder()
    sock = open_exec(listener, "vm1", body, decoder, timeout=30)
    try:
        out = b""
        while b"ready\n" not in out:
            out += _next_output(sock, decoder)
        chunk = encode_frame(Opcode.BINARY, bytes([Channel.STDIN]) + b"x" * (64 << 10))
        sock.sendall(chunk * 16 + encode_frame(Opcode.BINARY, bytes([Channel.SIGNAL])
                                               + b'{"signal": "INT"}'))
        while b"got INT\n" not in out:
            out += _next_output(sock, decoder)
        assert out == b"ready\ngot INT\n"
    finally:
        sock.close()


def _next_output(sock: socket.socket, decoder: FrameDecoder, timeout: float = 20) -> bytes:
    """The next stdout bytes of an exec's WebSocket (AssertionError if it ends first)."""
    sock.settimeout(timeout)
    while True:
        frame = decoder.next_frame()
        if frame is None:
            chunk = sock.recv(1 << 16)
            assert chunk, "the listener closed the exec"
            decoder.receive_data(chunk)
            continue
        if frame.opcode is Opcode.BINARY and frame.payload[:1] == bytes([Channel.STDOUT]):
            return bytes(frame.payload[1:])
        assert not (frame.opcode is Opcode.BINARY
                    and frame.payload[:1] == bytes([Channel.STATUS])), frame.payload


def test_unhandled_interrupt_gives_130(stack: ExecStack) -> None:
    proc = stack.popen("vm1", "--", "sh", "-c", "echo ready; exec sleep 100",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 130


def test_three_interrupts_give_up_and_kill_the_tree(stack: ExecStack) -> None:
    tag = f"{uuid.uuid4().int % 10**6 + 1000}.625"
    proc = stack.popen("vm1", "--", "sh", "-c", f"trap '' INT; echo ready; sleep {tag}",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    for _ in range(3):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
    assert proc.wait(20) == 130
    assert proc.stderr is not None and b"gave up" in proc.stderr.read()
    wait_gone(tag, 5)


def test_local_stdout_closed_stops_everything(stack: ExecStack) -> None:
    tag = f"{uuid.uuid4().int % 10**6 + 1000}.875"
    script = f'{stack.exec_path} vm1 -- sh -c "yes {tag}" | head -1; echo "${{PIPESTATUS[0]}}"'
    p = subprocess.run(["bash", "-c", script],
                       env=stack.env, capture_output=True, timeout=30, check=False)
    assert p.stdout.decode().split() == [tag, "141"]
    wait_gone(f"yes {tag}", 5)


@pytest.mark.parametrize(("redirect", "args", "code", "out", "err"), [
    # stdin closed: with -i the client read the listener's socket (fd 0) as stdin and hung
    ("<&-", ["-i", "vm1", "--", "sh", "-c", "cat; echo done"], 0, b"done\n", b""),
    # stdout closed: the output went into the WebSocket (fd 1), then a traceback
    (">&-", ["vm1", "--", "sh", "-c", "echo out; echo err >&2; exit 3"], 3, None, b"err\n"),
    ("2>&-", ["vm1", "--", "sh", "-c", "echo out; echo err >&2; exit 3"], 3, b"out\n", None),
    (">&-", ["--help"], 0, None, b""),
])
def test_closed_standard_fds(stack: ExecStack, redirect: str, args: list[str], code: int,
                             out: bytes | None, err: bytes | None) -> None:
    """A closed stdin, stdout or stderr behaves as /dev/null (as with ssh)."""
    p = subprocess.run(["sh", "-c", f'exec "$@" {redirect}', "sh", stack.exec_path, *args],
                       env=stack.env, capture_output=True, timeout=20, check=False)
    assert p.returncode == code, p.stderr
    assert b"Traceback" not in p.stderr
    if out is not None:
        assert p.stdout == out
    if err is not None:
        assert p.stderr == err


def test_oversized_request_is_refused_with_the_reason(stack: ExecStack) -> None:
    big = "a" * (120 << 10)
    env = [arg for i in range(9) for arg in ("-e", f"V{i}={big}")]
    for detach in ([], ["-d"]):
        p = stack.run(*detach, *env, "vm1", "--", "true")
        assert p.returncode == 255
        assert p.stderr.startswith(b"vmbusifyexec: the exec request is too large"), p.stderr
        assert p.stderr.count(b"\n") == 1


def test_client_killed_kills_remote_tree(stack: ExecStack) -> None:
    tag = f"{uuid.uuid4().int % 10**6 + 1000}.25"
    proc = stack.popen("vm1", "--", "sh", "-c",
                       f"sleep {tag} & (setsid sleep {tag} &); echo ready; sleep {tag}",
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    wait_marked(tag, 4)  # sh + 3 sleeps
    proc.kill()
    proc.wait()
    wait_gone(tag, 5)


def test_many_execs_at_once(stack: ExecStack) -> None:
    def one(i: int) -> tuple[int, bytes]:
        p = stack.run("vm1", "--", "sh", "-c", f"sleep 0.2; echo {i}; echo e{i} >&2; exit {i}")
        assert p.stderr == f"e{i}\n".encode()
        return p.returncode, p.stdout

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(24)))
    assert results == [(i, f"{i}\n".encode()) for i in range(24)]


def test_large_output_intact_with_a_slow_reader(stack: ExecStack, tmp_path: Path) -> None:
    """256 MiB through a reader that pauses: intact, and no process buffers it."""
    blob = tmp_path / "blob"
    with open(blob, "wb") as fh:
        fh.writelines(os.urandom(4 << 20) for _ in range(64))
    want = hashlib.sha256(blob.read_bytes()).hexdigest()
    procs = {"control": stack.control.pid, "exec": stack.worker.pid,
             "host mux": stack.pair.host.pid, "guest mux": stack.pair.guest.pid}
    before = {k: psutil.Process(pid).memory_info().rss for k, pid in procs.items()}
    client = stack.popen("vm1", "--", "cat", str(blob), stdout=subprocess.PIPE)
    assert client.stdout is not None
    digest = hashlib.sha256()
    peak = dict(before)
    peak["client"] = 0
    got = 0
    while chunk := client.stdout.read(1 << 20):
        digest.update(chunk)
        got += len(chunk)
        if got % (32 << 20) < (1 << 20):  # now and then: stall, and look at everyone's memory
            time.sleep(0.5)
            for k, pid in [*procs.items(), ("client", client.pid)]:
                peak[k] = max(peak[k], psutil.Process(pid).memory_info().rss)
    assert client.wait(30) == 0
    assert got == 64 * (4 << 20)
    assert digest.hexdigest() == want
    assert peak["client"] < 64 << 20, peak
    for k in procs:
        assert peak[k] - before[k] < 48 << 20, (k, peak[k] - before[k])


def test_detach_returns_the_pid(stack: ExecStack) -> None:
    tag = f"{uuid.uuid4().int % 10**6 + 1000}.75"
    p = stack.run("-d", "vm1", "--", "sleep", tag)
    assert p.returncode == 0, p.stderr
    pid = int(p.stdout)
    # The pid comes back once the exec is under way (Popen's close-on-exec pipe closed);
    # the kernel fills in the new program's arguments a moment later, and until then its
    # cmdline reads empty (seen under load: the client is fast enough to look that soon).
    deadline = time.monotonic() + 5
    while not psutil.Process(pid).cmdline() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert psutil.Process(pid).cmdline() == ["sleep", tag]
    psutil.Process(pid).kill()
    p = stack.run("-d", "vm1", "--", "no-such-program-xyz")
    assert p.returncode == 127 and b"command not found" in p.stderr


def test_tty_gets_a_pty(stack: ExecStack) -> None:
    p = stack.run("-t", "vm1", "--", "sh", "-c", "tty; echo $TERM; stty size; exit 4")
    assert p.returncode == 4
    lines = p.stdout.decode().splitlines()
    assert lines[0].startswith("/dev/pts/"), lines
    # no local terminal to take the size from: the classic 24x80, not a 0x0 terminal
    assert lines[2] == "24 80", lines
    assert p.stderr == b""


def test_vm_by_ip_and_unknown_vm(stack: ExecStack) -> None:
    ip = json.loads(subprocess.run([str(BIN / "vmbusifyctl"), "status", "--json"], env=stack.env,
                                   capture_output=True, check=True).stdout)["vms"][0]["ips"][0]
    p = stack.run(ip, "--", "echo", "by-ip")
    assert (p.returncode, p.stdout) == (0, b"by-ip\n")
    p = stack.run("vm9", "--", "true")
    assert p.returncode == 255
    assert p.stderr == b"vmbusifyexec: unknown VM 'vm9'\n"
    p = stack.run("192.0.2.199", "--", "true")
    assert p.returncode == 255 and p.stderr.count(b"\n") == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--bogus", "vm1", "true"], b"option --bogus not recognized"),
    (["vm1"], b"missing PROGRAM"),
    ([], b"missing VMID"),
    (["-e", "=x", "vm1", "true"], b"bad environment assignment"),
    (["--timeout", "soon", "vm1", "true"], b"--timeout wants a number"),
    (["--timeout", "-1", "vm1", "true"], b"more than 0"),
    (["-d", "-i", "vm1", "true"], b"cannot be combined"),
    (["-d", "--timeout", "5", "vm1", "true"], b"cannot be combined with --timeout"),
])
def test_usage_errors(stack: ExecStack, args: list[str], message: bytes) -> None:
    p = stack.run(*args)
    assert p.returncode == 255
    assert message in p.stderr and b"Traceback" not in p.stderr
    assert p.stderr.count(b"\n") == 2  # the reason and "Try --help"


def test_help(stack: ExecStack) -> None:
    p = stack.run("--help")
    assert p.returncode == 0 and b"Usage: vmbusifyexec" in p.stdout


def _http(stack: ExecStack, method: str, path: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    conn = stack.listener().http()
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


def test_unknown_vms_are_404_and_a_bad_address_is_named(stack: ExecStack) -> None:
    """The mux's errors keep their kind through the listener: an unknown VM is a 404 for
    every command (as for exec), and a vmid lookup of something not an IP says so."""
    auth = {"Authorization": f"Bearer {stack.listener().token}"}
    for method, path, named in (("POST", "/v1/vms/vm9/ping", "vm9"),
                                ("POST", "/v1/vms/vm9/connect", "vm9"),
                                ("POST", "/v1/vms/vm9/disconnect", "vm9"),
                                ("GET", "/v1/vmid/192.0.2.99", "192.0.2.99")):
        status, doc = _http(stack, method, path, b"", auth)
        assert status == 404 and named in str(doc["error"]), (path, status, doc)
    status, doc = _http(stack, "GET", "/v1/vmid/notanip", None, auth)
    assert (status, doc["error"]) == (400, "not an IP address: 'notanip'")
    p = subprocess.run([str(BIN / "vmbusifyctl"), "ping", "vm9"], env=stack.env,
                       capture_output=True, timeout=30, check=False)
    assert p.returncode == 1 and p.stderr.startswith(b"vmbusifyctl: unknown VM 'vm9'"), p.stderr


def test_listener_refuses_bad_requests(stack: ExecStack) -> None:
    auth = {"Authorization": f"Bearer {stack.listener().token}"}
    assert _http(stack, "GET", "/v1/vms/vm1/exec")[0] == 401
    assert _http(stack, "POST", "/v1/vms/vm1/exec", b'{"argv": ["true"], "detach": true}',
                 {"Authorization": "Bearer wrong"})[0] == 401
    status, doc = _http(stack, "GET", "/v1/vms/vm1/exec", headers=auth)
    assert status == 400 and "WebSocket" in str(doc["error"])
    detached = b'{"argv": ["true"], "detach": true}'
    assert _http(stack, "POST", "/v1/vms/vm9/exec", detached, auth)[0] == 404
    assert _http(stack, "POST", "/v1/vms/192.0.2.199/exec", detached, auth)[0] == 404
    for body, why in [(b"{not json", "not JSON"), (b'{"argv": []}', "argv"),
                      (b'{"argv": ["true"]}', "detach"),
                      (b'{"argv": ["true"], "detach": true, "bogus": 1}', "unknown field"),
                      (b'{"argv": ["true"], "detach": true, "timeout": -3}', "timeout"),
                      # a detached program is not watched: its timeout would be ignored
                      (b'{"argv": ["true"], "detach": true, "timeout": 3}', "timeout"),
                      (b'{"argv": ["a\\u0000b"], "detach": true}', "NUL")]:
        status, doc = _http(stack, "POST", "/v1/vms/vm1/exec", body, auth)
        assert status == 400 and why in str(doc["error"]), (body, doc)
    conn = stack.listener().http()
    conn.request("PUT", "/v1/vms/vm1/exec", headers=auth)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 405 and "POST" in (resp.getheader("Allow") or "")


def test_websocket_with_a_malformed_request(stack: ExecStack) -> None:
    """A WebSocket whose first message is not a valid request gets a status and a close."""

    from vmbusify.protocol.websocket import (
        Frame,
        FrameDecoder,
        Opcode,
        encode_frame,
        expected_accept,
        handshake_key,
    )
    listener = stack.listener()
    token = listener.token
    for first in [encode_frame(Opcode.TEXT, b'{"argv": 5}'),
                  encode_frame(Opcode.BINARY, b"\x00hello")]:
        key = handshake_key()
        with listener.connect() as s:
            s.sendall((f"GET /v1/vms/vm1/exec HTTP/1.1\r\nHost: x\r\n"
                       f"Authorization: Bearer {token}\r\nUpgrade: websocket\r\n"
                       f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                       f"Sec-WebSocket-Version: 13\r\n\r\n").encode() + first)
            data = b""
            while b"\r\n\r\n" not in data:
                data += s.recv(4096)
            head, _, rest = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101") and expected_accept(key).encode() in head
            dec = FrameDecoder()
            dec.receive_data(rest)
            frames: list[Frame] = []
            while not frames or frames[-1].opcode is not Opcode.CLOSE:
                frame = dec.next_frame()
                if frame is None:
                    chunk = s.recv(4096)
                    assert chunk, frames
                    dec.receive_data(chunk)
                else:
                    frames.append(frame)
            status = json.loads(frames[0].payload[1:])
            assert frames[0].payload[0] == 3 and status["exit_code"] == 255
            assert status["message"]


def test_executor_not_running_is_said_plainly(tmp_path: Path) -> None:
    """A stack of its own: the guest's exec worker stops; both exec paths say so at once."""
    s = start_stack(tmp_path)
    try:
        s.worker.terminate()
        s.worker.wait(15)
        for detach in ([], ["-d"]):
            t0 = time.monotonic()
            p = s.run(*detach, "vm1", "--", "true", timeout=30)
            assert p.returncode == 255
            assert p.stderr.startswith(
                b"vmbusifyexec: the command executor is not running on vm1"), p.stderr
            assert p.stderr.count(b"\n") == 1 and time.monotonic() - t0 < 5
    finally:
        s.stop()


@pytest.mark.parametrize("side", ["host", "guest"])
def test_mux_crash_kills_remote_tree_and_client_says_why(tmp_path: Path, side: str) -> None:
    """A stack of its own: one mux is killed mid-exec and restarted (as supervisord does)."""
    s = start_stack(tmp_path)
    try:
        tag = f"{uuid.uuid4().int % 10**6 + 1000}.125"
        proc = s.popen("vm1", "--", "sh", "-c", f"echo ready; sleep {tag}",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        wait_marked(tag, 2)  # sh and its sleep
        mux = s.pair.host if side == "host" else s.pair.guest
        mux.kill(signal.SIGKILL)
        mux.start()
        assert proc.wait(30) == 255
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert b"lost" in err and err.count(b"\n") == 1, err
        wait_gone(tag, 15)
    finally:
        s.stop()


def test_an_exec_right_after_a_host_mux_restart_runs(tmp_path: Path) -> None:
    """The host mux restarts (as supervisord does after a crash): once the VM is connected
    again, the next exec runs, even before the listener's next heartbeat (2 s) would have
    told it of the new mux; it must not be failed as lost to the old one."""
    s = start_stack(tmp_path)
    try:
        for _ in range(3):
            s.pair.host.kill(signal.SIGKILL)  # waits for it to be gone
            s.pair.host.start()
            deadline = time.monotonic() + 20
            while True:  # the status call answers once the new mux runs with vm1 connected
                out = subprocess.run([str(BIN / "vmbusifyctl"), "status", "--json"],
                                     env=s.env, capture_output=True, text=True, check=False)
                if out.returncode == 0 and any(
                        vm["vmid"] == "vm1" and vm["state"] == "connected"
                        for vm in json.loads(out.stdout)["vms"]):
                    break
                assert time.monotonic() < deadline, out.stderr
                time.sleep(0.05)
            p = s.run("vm1", "--", "echo", "again", timeout=30)
            assert (p.returncode, p.stdout, p.stderr) == (0, b"again\n", b"")
    finally:
        s.stop()


def test_listener_stopping_ends_execs_with_a_reason(tmp_path: Path) -> None:
    s = start_stack(tmp_path)
    try:
        tag = f"{uuid.uuid4().int % 10**6 + 1000}.375"
        proc = s.popen("vm1", "--", "sh", "-c", f"echo ready; sleep {tag}",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        s.control.terminate()
        assert s.control.wait(15) == 0
        assert proc.wait(15) == 255
        assert proc.stderr is not None
        assert b"command listener is stopping" in proc.stderr.read()
        wait_gone(tag, 10)
    finally:
        s.stop()


def test_no_heavy_imports_in_the_client(stack: ExecStack) -> None:
    """vmbusifyexec starts once per command: what it loads is its latency."""
    code = ("import sys, vmbusify.cli.exec as e, vmbusify.control.verify; e._listener(None); "
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], env=stack.env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert "vmbusify.config_file" in out and "vmbusify.control.token" in out
    assert "vmbusify.control.verify" in out  # users.peer: for a TCP listener only
    # Each of these costs milliseconds of CPU on every start (dataclasses ~9, urllib.parse and
    # hashlib ~2 each): the client's start is its latency. (typing comes with tomllib.)
    for heavy in ("asyncio", "aiohttp", "zmq", "msgpack", "click", "http.client",
                  "vmbusify.config", "dataclasses", "urllib.parse", "hashlib",
                  "pathlib", "secrets", "queue"):
        assert heavy not in out, heavy
