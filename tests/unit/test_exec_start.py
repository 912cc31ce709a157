"""vmbusifyexec's start: the light replacements it uses instead of getopt, json and the socket,
signal and threading modules behave as those do (docs/performance.md, "`vmbusifyexec true`
against ssh")."""

from __future__ import annotations

import _socket
import getopt
import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmbusify.cli.exec import _LONG, _SHORT, _getopt, _GetoptError
from vmbusify.control import json_light
from vmbusify.control.verify import connect_verified_as

#: Words a command line of vmbusifyexec is made of: every option, prefixes, clusters, values.
WORDS = ["-i", "-t", "-it", "-ti", "-e", "-eA=1", "-w", "-w/tmp", "-u", "-unobody", "-d",
         "-h", "-V", "-x", "-i:", "-", "--", "--interactive", "--inter", "--tty", "--tty-mode",
         "--tty-mode=auto", "--tty=never", "--env", "--env=B=2", "--workdir", "--user=root",
         "--timeout", "--timeout=3", "--detach=1", "--config", "--conf=/x", "--completion",
         "--version", "--help", "--he", "--t", "--no", "--=", "vm1", "true", "A=1", "3"]


def _reference(args: list[str]) -> tuple[object, ...]:
    try:
        pairs, rest = getopt.getopt(args, _SHORT, _LONG)
    except getopt.GetoptError as exc:
        return ("error", str(exc))
    return ("ok", pairs, rest)


def _ours(args: list[str]) -> tuple[object, ...]:
    try:
        pairs, rest = _getopt(args)
    except _GetoptError as exc:
        return ("error", str(exc))
    return ("ok", pairs, rest)


@pytest.mark.parametrize("args", [
    [], ["vm1", "true"], ["-it", "vm1"], ["-e", "A=1", "--env=B=x=y", "-w", "/tmp", "vm1"],
    ["--tty"], ["--t"], ["--inter", "vm1"], ["-e"], ["--env"], ["--detach=1"], ["-q"],
    ["--nope"], ["--", "-i"], ["-", "x"], ["-ie", "K=V", "x"], ["--time"], ["-x:"],
])
def test_getopt_replacement_examples(args: list[str]) -> None:
    assert _ours(args) == _reference(args)


@given(st.lists(st.sampled_from(WORDS), max_size=8))
def test_getopt_replacement_matches_getopt(args: list[str]) -> None:
    assert _ours(args) == _reference(args)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@given(JSON)
def test_json_light_writes_what_json_writes(value: object) -> None:
    assert json_light.dumps(value) == json.dumps(value)
    assert json_light.loads(json_light.dumps(value)) == json.loads(json.dumps(value))


def _read(loads: Callable[[str | bytes], object], data: str | bytes) -> object:
    try:
        value = loads(data)
    except ValueError:
        return "refused"
    return ("nan",) if isinstance(value, float) and math.isnan(value) else value


@given(st.text(max_size=40) | st.sampled_from([
    '{"exit_code": 0}', ' [1, 2.5e3, "\\u00e9"] \n', "NaN", "-Infinity", "{} {}", "[1,]",
    '"\\x01"', "01", "1.", '{"a":1,"a":2}', "\ufeff{}", "  ", "true false"]))
def test_json_light_reads_what_json_reads(text: str) -> None:
    expected = _read(json.loads, text)
    assert _read(json_light.loads, text) == expected
    assert _read(json_light.loads, text.encode()) == expected


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {1: 2}, b"x", object()])
def test_json_light_refuses_what_is_not_json(value: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        json_light.dumps(value)


def test_the_start_loads_none_of_the_modules_it_avoids() -> None:
    """What parse_args, the configuration and the listener's address load: none of the
    Python modules the client uses the C modules of (each costs CPU on every start)."""
    code = ("import sys, vmbusify.cli.exec as e, vmbusify.control.verify; "
            "from vmbusify.config_file import listener_of; "
            "e.parse_args(['-e', 'A=1', 'vm1', 'true']); listener_of(); "
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert "vmbusify.control.json_light" in out
    for avoided in ("re", "socket", "signal", "threading", "json", "getopt", "gettext", "base64",
                    "selectors", "queue", "typing", "tomllib"):
        assert avoided not in out, avoided


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_the_light_socket_class_connects_to_either_listener(kind: str, tmp_path: Path) -> None:
    """connect_verified_as(_socket.socket, ...): what vmbusifyexec connects with, for a Unix
    listener and for a TCP one (made with socket.create_connection, then handed over)."""
    if kind == "unix":
        d = tmp_path / "control"
        d.mkdir(mode=0o700)
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(str(d / "control.sock"))
        where, port = str(d / "control.sock"), 0
    else:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        where, port = "127.0.0.1", srv.getsockname()[1]
    srv.listen()
    with srv:
        sock = connect_verified_as(_socket.socket, kind, where, port, os.geteuid(), 5.0)
        try:
            assert type(sock) is _socket.socket
            assert sock.gettimeout() == 5.0
            peer, _ = srv.accept()
            with peer:
                sock.sendall(b"ping")
                assert peer.recv(4) == b"ping"
        finally:
            sock.close()
