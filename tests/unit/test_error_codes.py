"""One numeric ErrorCode per error class: what crosses processes (ERROR ACKs, CTL replies,
the listener's JSON) and the one table that turns it into an HTTP status and exit codes."""

from __future__ import annotations

import pytest

from vmbusify import errors
from vmbusify.bus.link import reply_error
from vmbusify.errors import (
    CLASS_OF,
    ErrorCode,
    LimitReached,
    NoHandlerError,
    NotConnectedError,
    RequestTimeout,
    TunnelError,
    UnknownVMError,
    VMBusifyError,
    ctl_exit,
    error_from,
    exec_exit,
    http_status,
)
from vmbusify.protocol.exec_api import EXIT_FAILURE
from vmbusify.protocol.package import ErrorReply, PackageFlag, PackageType


def _all_error_classes() -> list[type[VMBusifyError]]:
    out, todo = [], [VMBusifyError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += cls.__subclasses__()
    return [c for c in out if c.__module__ == errors.__name__]


def test_every_error_class_has_a_code_of_its_own() -> None:
    classes = _all_error_classes()
    codes = [c.code for c in classes]
    assert len(set(codes)) == len(codes) == len(ErrorCode)
    for cls in classes:
        assert CLASS_OF[cls.code] is cls
        again = error_from(int(cls.code), "why")
        assert type(again) is cls and str(again) == "why" and again.code is cls.code


def test_an_unknown_code_is_the_base_class() -> None:
    for code in (0, 9999, None, -1):
        exc = error_from(code, "from the future")
        assert type(exc) is VMBusifyError and exc.code is ErrorCode.GENERIC


@pytest.mark.parametrize(("exc", "status"), [
    (UnknownVMError("x"), 404), (RequestTimeout("x"), 504), (NotConnectedError("x"), 503),
    (TunnelError("x"), 503), (NoHandlerError("x"), 503), (errors.ControlError("x"), 400),
    (LimitReached("x"), 503), (VMBusifyError("x"), 500), (errors.ConfigError("x"), 500),
    (errors.RemoteProtocolError("x"), 500),
])
def test_the_http_status_follows_the_code(exc: VMBusifyError, status: int) -> None:
    assert http_status(exc.code) == status


def test_exit_statuses_follow_the_code() -> None:
    assert errors.EXEC_FAILURE == EXIT_FAILURE  # vmbusifyexec's own failure: 255
    for code in ErrorCode:
        assert ctl_exit(code) == 1 and exec_exit(code) == EXIT_FAILURE


def test_error_replies_round_trip_and_read_old_plain_text() -> None:
    reply = ErrorReply(ErrorCode.NOT_CONNECTED, "not connected: vm1 is disconnected")
    assert ErrorReply.decode(reply.encode()) == reply
    assert reply.plain() == b"not connected: vm1 is disconnected"
    assert ErrorReply.read(reply.plain(), coded=False) == ErrorReply(
        ErrorCode.GENERIC, "not connected: vm1 is disconnected")
    ack = reply.ack(entity=2, id=9, message_id=1, stream=4)
    assert (ack.type, ack.flags, ack.entity, ack.id, ack.message_id, ack.stream) == (
        PackageType.ACK, PackageFlag.ERROR, 2, 9, 1, 4)
    assert ack.payload == reply.encode()
    assert reply.ack(entity=2, id=9, message_id=1, plain=True).payload == reply.plain()


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"plain words", b"\x92\x01\x02",
                                     b"\x82\xa4code\xa1x\xa6reason\xa1y"])
def test_a_malformed_coded_reply_is_read_not_raised(payload: bytes) -> None:
    with pytest.raises(errors.RemoteProtocolError):
        ErrorReply.decode(payload)
    got = ErrorReply.read(payload)
    assert got.code is ErrorCode.REMOTE_PROTOCOL and "malformed" in got.reason


def test_a_long_reason_is_cut() -> None:
    assert len(ErrorReply.decode(ErrorReply(ErrorCode.GENERIC, "x" * 10_000).encode())
               .reason) == 2000


def test_sync_send_raises_by_the_code_and_always_a_tunnel_error() -> None:
    """A request that failed over there: callers catch TunnelError (as before codes); the
    class is the code's where that is one, and the code travels either way."""
    assert type(reply_error(ErrorReply(ErrorCode.NOT_CONNECTED, "not connected: x"))) is (
        NotConnectedError)
    assert type(reply_error(ErrorReply(ErrorCode.UNKNOWN_VM, "unknown VM 'x'"))) is (
        UnknownVMError)
    limit = reply_error(ErrorReply(ErrorCode.LIMIT, "vm1: 4096 streams open: limit reached"))
    assert type(limit) is TunnelError and limit.code is ErrorCode.LIMIT
    assert http_status(limit.code) == 503
    old = reply_error(ErrorReply.read(b"not connected: from a 0.1.0 guest", coded=False))
    assert type(old) is TunnelError and old.code is ErrorCode.GENERIC
    # the peer's text is escaped: no control character reaches a terminal or a log
    evil = reply_error(ErrorReply(ErrorCode.GENERIC, "boom\x1b[2J\nforged"))
    assert "\x1b" not in str(evil) and "\n" not in str(evil)


def test_the_listeners_error_body_gives_back_the_error_of_its_code() -> None:
    from vmbusify.control.client import _error_of

    got = _error_of({"error": "unknown VM 'vm9'", "code": int(ErrorCode.UNKNOWN_VM)}, "HTTP 404")
    assert type(got) is UnknownVMError and str(got) == "unknown VM 'vm9'"
    assert type(_error_of({"error": "missing or wrong bearer token"}, "HTTP 401")) is (
        errors.ControlError)  # a refusal without a code
    assert type(_error_of({"error": "x", "code": 4242}, "HTTP 500")) is VMBusifyError
    assert str(_error_of(None, "HTTP 502 Bad Gateway")) == "HTTP 502 Bad Gateway"
