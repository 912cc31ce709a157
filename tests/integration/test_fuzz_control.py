"""Bad input at the command listener's HTTP side (no root): malformed, oversized and
unauthenticated requests, raw over a socket, against the real `vmbusify control` process.

Every request is answered (a 4xx with a JSON error where the listener got to answer) or the
connection is closed, within a few seconds; afterwards the listener still serves, its memory
stayed bounded and its open connections were all given back. (The WebSocket exec API's
request validation is tested in test_exec.py; the vmbus package decoder in
tests/unit/test_package.py; the SOCKS/HTTP-proxy handshakes in test_socks.py / test_proxy.py.)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.exec_harness import ExecStack, start_stack
from vmbusify.protocol.websocket import Opcode, encode_frame, handshake_key

#: Seconds a bad request may take to be answered or closed.
ANSWER = 10.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExecStack]:
    s = start_stack(tmp_path_factory.mktemp("fuzz-control"))
    yield s
    s.stop()


def exchange(stack: ExecStack, data: bytes, timeout: float = ANSWER) -> tuple[bytes, bool]:
    """Send ``data``, read until the listener closes or ``timeout``; (what came back, closed)."""
    got = b""
    with stack.listener().connect(timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return got, True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                return got, True
            if not chunk:
                return got, True
            got += chunk
            if _complete(got):
                return got, False
    return got, False


def _complete(data: bytes) -> bool:
    """A whole HTTP response with a Content-Length body is in ``data``."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def status_of(response: bytes) -> int:
    line = response.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[0].startswith(b"HTTP/") else 0


def answered_or_closed(stack: ExecStack, data: bytes) -> int:
    """The status the listener answered ``data`` with (0: it closed without one); fails
    if it neither answered nor closed within ANSWER seconds."""
    got, closed = exchange(stack, data)
    status = status_of(got)
    assert status or closed, f"no answer and no close for {data[:120]!r}: got {got[:200]!r}"
    return status


def request(path: str = "/v1/status", method: str = "GET", headers: str = "",
            body: bytes = b"", token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}{headers}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def listener_proc(stack: ExecStack) -> psutil.Process:
    return psutil.Process(stack.control.pid)


def still_serving(stack: ExecStack) -> None:
    token = stack.listener().token
    got, _ = exchange(stack, request(token=token))
    assert status_of(got) == 200, got[:300]
    assert "vms" in json.loads(got.partition(b"\r\n\r\n")[2])


# --- unauthenticated --------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [
    "", "Authorization: Bearer wrong\r\n", "Authorization: Bearer \r\n",
    "Authorization: Basic cm9vdDpyb290\r\n", "Authorization: bearer\r\n",
    "Authorization: Bearer " + "A" * 4000 + "\r\n",
    "Authorization: Bearer \x7f\x01tok\r\n",
])
@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/status"), ("POST", "/v1/vms/vm1/connect"), ("GET", "/v1/vms/vm1/exec"),
    ("POST", "/v1/vms/vm1/exec"), ("GET", "/nope"), ("DELETE", "/v1/status"),
])
def test_every_unauthenticated_request_gets_401(stack: ExecStack, auth: str, method: str,
                                                path: str) -> None:
    got, _ = exchange(stack, request(path, method, headers=auth, body=b'{"argv": ["id"]}'))
    if "\x01" in auth:  # not even a valid header: the HTTP parser refuses it first
        assert status_of(got) == 400, got[:300]
        return
    assert status_of(got) == 401, got[:300]
    body = json.loads(got.partition(b"\r\n\r\n")[2])
    assert body == {"error": "missing or wrong bearer token"}


def test_unauthenticated_exec_never_runs(stack: ExecStack, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    body = json.dumps({"argv": ["touch", str(marker)], "detach": True}).encode()
    for auth in ("", "Authorization: Bearer wrong\r\n"):
        got, _ = exchange(stack, request("/v1/vms/vm1/exec", "POST", auth, body))
        assert status_of(got) == 401
    time.sleep(0.5)
    assert not marker.exists()


def test_unauthenticated_websocket_upgrade_refused(stack: ExecStack) -> None:
    key = handshake_key()
    got, _ = exchange(stack, (
        "GET /v1/vms/vm1/exec HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode() + encode_frame(Opcode.TEXT, b'{"argv": ["id"]}'))
    assert status_of(got) == 401, got[:300]


# --- malformed ----------------------------------------------------------------------------------

MALFORMED = [
    b"\x00\x01\x02\x03garbage\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /v1/status\r\n\r\n",
    b"GET /v1/status HTTP/9.9\r\nHost: x\r\n\r\n",
    b"G\xffT /v1/status HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/st\x00atus HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/status HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    b"POST /v1/vms/vm1/connect HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/vms/vm1/connect HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    (b"POST /v1/vms/vm1/connect HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nabc"),
    (b"POST /v1/vms/vm1/connect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nhello\r\n0\r\n\r\n"),
    (b"POST /v1/vms/vm1/connect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    b"0\r\n\r\n"),
    b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 100_000 + b"\r\n\r\n",
    b"GET /v1/status HTTP/1.1\r\nHost: x\r\n" + b"X-Many: 1\r\n" * 5000 + b"\r\n",
]


@pytest.mark.parametrize("data", MALFORMED, ids=[repr(d[:24]) for d in MALFORMED])
def test_malformed_requests_answered_or_closed(stack: ExecStack, data: bytes) -> None:
    status = answered_or_closed(stack, data)
    assert status == 0 or 400 <= status < 500, status


def test_malformed_requests_with_the_token_answered_or_closed(stack: ExecStack) -> None:
    token = stack.listener().token
    auth = f"Authorization: Bearer {token}\r\n"
    for path in ("/v1/vms/%ZZ/connect", "/v1/vms/" + "v" * 5000 + "/connect",
                 "/v1/vmid/not-an-ip", "/v1/vms/vm1/ping?timeout=abc",
                 "/v1/vms/vm1/ping?timeout=-1", "/v1/vms/vm1/ping?timeout=1e308",
                 "/v1/vms/vm1/connect?timeout=nan"):
        data = f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\n\r\n".encode()
        status = answered_or_closed(stack, data)
        assert status == 0 or 200 <= status < 600, (path, status)
        assert status != 500, f"{path}: an internal error for a bad argument"
    still_serving(stack)


# --- oversized ----------------------------------------------------------------------------------


def test_oversized_bodies_refused_memory_bounded(stack: ExecStack) -> None:
    token = stack.listener().token
    proc = listener_proc(stack)
    rss0 = proc.memory_info().rss
    junk = os.urandom(1 << 20)
    for auth in ("", f"Authorization: Bearer {token}\r\n"):
        head = (f"POST /v1/vms/vm1/exec HTTP/1.1\r\nHost: x\r\n{auth}"
                f"Content-Length: {1 << 30}\r\n\r\n").encode()
        with stack.listener().connect(ANSWER) as s:
            s.sendall(head)
            sent, got = 0, b""
            try:  # push 32 MiB of a claimed 1 GiB: it must answer or stop reading, not buffer
                while sent < (32 << 20):
                    s.sendall(junk)
                    sent += len(junk)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass
            try:
                s.settimeout(ANSWER)
                while not _complete(got):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
            except (ConnectionResetError, TimeoutError):
                pass
        assert status_of(got) in (0, 401, 413), got[:300]
    assert proc.memory_info().rss < rss0 + (24 << 20), "the listener buffered an oversized body"
    still_serving(stack)


def test_many_idle_and_half_sent_connections_do_not_stop_service(stack: ExecStack) -> None:
    proc = listener_proc(stack)
    fds0 = proc.num_fds()
    socks = []
    try:
        for i in range(300):
            s = stack.listener().connect(ANSWER)
            s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"")
            socks.append(s)
        t0 = time.monotonic()
        still_serving(stack)
        assert time.monotonic() - t0 < 5.0
    finally:
        for s in socks:
            s.close()
    # every connection given back (no fd leak)
    deadline = time.monotonic() + 10
    while proc.num_fds() > fds0 + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.num_fds() <= fds0 + 5, (proc.num_fds(), fds0)


# --- random ---------------------------------------------------------------------------------

_methods = st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"\x00", b"get", b""])
_paths = st.sampled_from([b"/v1/status", b"/v1/vms/vm1/exec", b"/v1/vms/vm1/connect",
                          b"/v1/vmid/1.2.3.4", b"*", b"", b"/../../etc/passwd"])


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=_methods, path=_paths, junk=st.binary(max_size=2048),
       version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b""]))
def test_random_requests_answered_or_closed(stack: ExecStack, method: bytes, path: bytes,
                                            junk: bytes, version: bytes) -> None:
    # Ends with a blank line, so the listener has a whole (if nonsensical) head to judge.
    data = method + b" " + path + b" " + version + b"\r\n" + junk + b"\r\n\r\n"
    status = answered_or_closed(stack, data)
    assert status != 500, data[:200]


def test_listener_survived_everything(stack: ExecStack) -> None:
    """Run last in this module: the same process, serving, no traceback in its log."""
    assert stack.control.poll() is None, "the command listener died"
    still_serving(stack)
    log = (stack.pair.root / "control.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
