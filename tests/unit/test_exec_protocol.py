"""Exec messages, the WebSocket client codec and vmbusifyexec's command line (no sockets)."""

from __future__ import annotations

import os
import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmbusify.cli.exec import Options, UsageError, parse_args
from vmbusify.errors import RemoteProtocolError
from vmbusify.protocol.exec import (
    ExecSpec,
    ExitStatus,
    Resize,
    SendSignal,
    StartReply,
    parse_signal,
    status_from_returncode,
)
from vmbusify.protocol.exec_api import EXIT_TIMEOUT, ExitReason
from vmbusify.protocol.websocket import (
    FrameDecoder,
    Opcode,
    close_payload,
    encode_frame,
    expected_accept,
    mask,
)

# --- ExecSpec ---------------------------------------------------------------------------------


def test_spec_round_trip() -> None:
    spec = ExecSpec(argv=["sh", "-c", "x"], env={"A": "1"}, cwd="/tmp", user="nobody",
                    tty=True, stdin=True, timeout=2.5, rows=40, cols=120, term="xterm",
                    side_stream=7)
    assert ExecSpec.from_body(spec.to_body()) == spec
    assert ExecSpec.from_body({"argv": ["true"]}) == ExecSpec(argv=["true"])


@pytest.mark.parametrize(("body", "why"), [
    ([], "JSON object"),
    ({}, "argv"),
    ({"argv": []}, "argv"),
    ({"argv": "ls"}, "argv"),
    ({"argv": [""]}, "empty"),
    ({"argv": ["a\0b"]}, "NUL"),
    ({"argv": [1]}, "argument 0"),
    ({"argv": ["x"], "bogus": 1}, "unknown field 'bogus'"),
    ({"argv": ["x"], "env": {"A=B": "1"}}, "bad environment name"),
    ({"argv": ["x"], "env": {"A": 1}}, "environment value"),
    ({"argv": ["x"], "env": []}, "'env' must be a map"),
    ({"argv": ["x"], "timeout": 0}, "timeout"),
    ({"argv": ["x"], "timeout": float("inf")}, "timeout"),
    ({"argv": ["x"], "timeout": True}, "timeout"),
    ({"argv": ["x"], "tty": "yes"}, "true or false"),
    ({"argv": ["x"], "rows": 70000}, "rows"),
    ({"argv": ["x"], "detach": True, "stdin": True}, "detached"),
    ({"argv": ["x"] * 5000}, "more than"),
])
def test_spec_rejects(body: object, why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        ExecSpec.from_body(body)


@given(st.dictionaries(st.sampled_from(["argv", "env", "cwd", "tty", "timeout", "rows", "x"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                                 st.text(max_size=5), st.lists(st.text(max_size=3)),
                                 st.dictionaries(st.text(max_size=3), st.text(max_size=3)))))
def test_spec_never_fails_otherwise(body: dict[str, object]) -> None:
    try:
        ExecSpec.from_body(body)
    except RemoteProtocolError:
        pass


def test_status_and_replies() -> None:
    assert status_from_returncode(3) == ExitStatus(3, ExitReason.EXITED)
    killed = status_from_returncode(-signal.SIGTERM, 9)
    assert (killed.exit_code, killed.reason, killed.signal, killed.id) == (
        143, ExitReason.SIGNALED, signal.SIGTERM, 9)
    assert "SIGTERM" in killed.message
    st_ = ExitStatus(EXIT_TIMEOUT, ExitReason.TIMEOUT, "timed out", 4, 9)
    assert ExitStatus.from_body(st_.to_body()) == st_
    with pytest.raises(RemoteProtocolError):
        ExitStatus.from_body({"exit_code": 300, "reason": "exited"})
    with pytest.raises(RemoteProtocolError):
        ExitStatus.from_body({"exit_code": 1, "reason": "bored"})
    assert StartReply.from_body({"pid": 12}).started
    failed = StartReply.from_body({"exit_code": 127, "message": "x: command not found"})
    assert not failed.started and failed.exit_code == 127
    with pytest.raises(RemoteProtocolError):
        StartReply.from_body({"pid": 0})
    assert parse_signal("INT") is signal.SIGINT and parse_signal("sigterm") is signal.SIGTERM
    for bad in ("SEGV", "9", 9, None):
        with pytest.raises(RemoteProtocolError):
            parse_signal(bad)
    assert Resize.from_body({"rows": 30, "cols": 100}) == Resize(30, 100)
    with pytest.raises(RemoteProtocolError):
        Resize.from_body({"rows": 0, "cols": 100})


def test_signals_and_resizes_say_how_much_stdin_went_before() -> None:
    """``after`` (docs/exec.md, "Signals, and no orphans"): round-trips, is 0
    from a listener of before it, and a negative or non-integer one is refused."""
    sig = SendSignal(7, "INT", 4096)
    assert SendSignal.from_body(sig.to_body()) == sig
    assert SendSignal.from_body({"id": 7, "signal": "INT"}).after == 0
    resize = Resize(30, 100, 7, 12)
    assert resize.to_body() == {"id": 7, "rows": 30, "cols": 100, "after": 12}
    assert Resize.from_body(resize.to_body()) == resize
    assert "after" not in Resize(30, 100, 7).to_body()
    for bad in (-1, "5", 1.5, True):
        with pytest.raises(RemoteProtocolError):
            SendSignal.from_body({"id": 7, "signal": "INT", "after": bad})
        with pytest.raises(RemoteProtocolError):
            Resize.from_body({"id": 7, "rows": 30, "cols": 100, "after": bad})


# --- WebSocket framing --------------------------------------------------------------------------


def test_accept_key_from_rfc6455() -> None:
    assert expected_accept("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@given(st.binary(max_size=70000), st.binary(min_size=4, max_size=4))
def test_mask_is_an_involution(data: bytes, key: bytes) -> None:
    assert mask(mask(data, key), key) == data
    assert len(mask(data, key)) == len(data)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 300000])
def test_frames_round_trip_in_pieces(size: int) -> None:
    payload = os.urandom(size)
    for masked in (True, False):
        wire = encode_frame(Opcode.BINARY, payload, masked=masked)
        dec = FrameDecoder()
        frames = []
        for i in range(0, len(wire), 7777):
            dec.receive_data(wire[i:i + 7777])
            while (f := dec.next_frame()) is not None:
                frames.append(f)
        assert [(f.opcode, f.fin, f.payload) for f in frames] == [(Opcode.BINARY, True, payload)]
        assert dec.buffered == 0


def test_decoder_refuses_bad_frames() -> None:
    dec = FrameDecoder(max_frame=100)
    dec.receive_data(encode_frame(Opcode.BINARY, b"x" * 101, masked=False))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        dec.next_frame()
    dec = FrameDecoder()
    dec.receive_data(b"\xf2\x00")
    with pytest.raises(RemoteProtocolError, match="reserved"):
        dec.next_frame()
    dec = FrameDecoder()
    dec.receive_data(b"\x83\x00")
    with pytest.raises(RemoteProtocolError, match="opcode"):
        dec.next_frame()
    assert close_payload(b"\x03\xe8bye") == (1000, "bye")
    assert close_payload(b"") == (1005, "")


# --- the command line ---------------------------------------------------------------------------


def test_parse_options_before_and_after_vmid() -> None:
    o = parse_args(["-i", "vm1", "--", "sort"])
    assert (o.vmid, o.argv, o.interactive) == ("vm1", ["sort"], True)
    o = parse_args(["vm1", "-it", "bash", "-l"])
    assert (o.vmid, o.argv, o.interactive, o.tty) == ("vm1", ["bash", "-l"], True, True)
    o = parse_args(["-e", "A=1", "--env=B=x=y", "-w", "/tmp", "-u", "nobody",
                    "--timeout", "2.5", "10.0.0.5", "ls", "-la", "--", "-x"])
    assert o.env == {"A": "1", "B": "x=y"} and o.workdir == "/tmp" and o.user == "nobody"
    assert o.timeout == 2.5 and o.vmid == "10.0.0.5" and o.argv == ["ls", "-la", "--", "-x"]
    assert parse_args(["-d", "vm1", "sleep", "9"]).detach
    assert parse_args(["--help"]).help


def test_env_key_alone_takes_the_local_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VB_TEST_X", "local")
    monkeypatch.delenv("VB_TEST_UNSET", raising=False)
    assert parse_args(["-e", "VB_TEST_X", "-e", "VB_TEST_UNSET", "vm1", "env"]).env == {
        "VB_TEST_X": "local"}


@pytest.mark.parametrize("args", [[], ["vm1"], ["-x", "vm1", "ls"], ["--timeout"],
                                  ["--timeout", "0", "vm1", "ls"], ["-d", "-t", "vm1", "ls"],
                                  ["-e", "=1", "vm1", "ls"], ["", "ls"]])
def test_parse_errors(args: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_args(args)


def test_options_make_the_request() -> None:
    body = Options(vmid="vm1", argv=["ls"], interactive=True, timeout=3.0).request()
    assert body == {"argv": ["ls"], "stdin": True, "timeout": 3.0}
    # The client builds the request without ExecSpec (it does not import dataclasses): what
    # it sends must be what the listener's checker accepts and means.
    opts = parse_args(["-i", "-t", "-e", "A=1", "-w", "/tmp", "-u", "nobody", "--timeout", "2",
                       "vm1", "sh", "-c", "x"])
    spec = ExecSpec.from_body(opts.request(24, 80))
    assert spec == ExecSpec(argv=["sh", "-c", "x"], env={"A": "1"}, cwd="/tmp", user="nobody",
                            tty=True, stdin=True, timeout=2.0, rows=24, cols=80,
                            term=os.environ.get("TERM", ""))
    assert ExecSpec.from_body(parse_args(["-d", "vm1", "true"]).request()).detach


@pytest.mark.parametrize(("vmid", "path"), [
    ("vm1", "/v1/vms/vm1/exec"),
    ("fd00::5", "/v1/vms/fd00::5/exec"),
    ("a/b?c#d %", "/v1/vms/a%2Fb%3Fc%23d%20%25/exec"),
    ("vm\u00e9", "/v1/vms/vm%C3%A9/exec"),
])
def test_exec_path_quotes_the_vmid(vmid: str, path: str) -> None:
    from urllib.parse import quote, unquote

    from vmbusify.control.exec_wire import exec_path as _exec_path

    assert _exec_path(vmid) == path
    assert unquote(path.split("/")[3]) == vmid
    assert _exec_path(vmid) == f"/v1/vms/{quote(vmid, safe=':')}/exec"


@pytest.mark.parametrize("payload", [b"", b"[]", b"{}", b'{"exit_code": 256}',
                                     b'{"exit_code": true}', b"\xff"])
def test_a_malformed_status_is_a_clear_failure(payload: bytes) -> None:
    from vmbusify.control.exec_wire import Failure
    from vmbusify.control.exec_wire import parse_status as _parse_status

    with pytest.raises(Failure, match="malformed exit status"):
        _parse_status(payload)
    assert _parse_status(b'{"exit_code": 3, "reason": "lost", "message": "m"}') == (3, "lost", "m")
