"""The proxy handshake parser (SOCKS5, SOCKS4/4a, HTTP) and the proxy messages, without sockets."""

from __future__ import annotations

import base64
import struct
from typing import TypeAlias

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmbusify.errors import RemoteProtocolError
from vmbusify.protocol.httpproxy import HttpRequest, http_error, parse_head
from vmbusify.protocol.proxy import (
    Command,
    DatagramDecoder,
    OpenAck,
    ProxyOpen,
    ReplyCode,
    encode_datagram,
    reply_for_errno,
)
from vmbusify.protocol.socks import (
    MAX_HANDSHAKE,
    Handshake,
    HandshakeError,
    Phase,
    ProxyKind,
    Socks5Auth,
    Socks5Greeting,
    TargetRequest,
    parse_udp_request,
    socks5_reply,
    udp_reply_header,
)

Event: TypeAlias = Socks5Greeting | Socks5Auth | TargetRequest


def feed(hs: Handshake, data: bytes) -> Event | None:
    hs.receive_data(data)
    return hs.next_event()


def feed_greeting(hs: Handshake, data: bytes) -> Socks5Greeting:
    """Feed bytes that must complete a SOCKS5 greeting."""
    greeting = feed(hs, data)
    assert isinstance(greeting, Socks5Greeting)
    return greeting


def feed_request(hs: Handshake, data: bytes) -> TargetRequest:
    """Feed bytes that must complete the handshake's request."""
    req = feed(hs, data)
    assert isinstance(req, TargetRequest)
    return req


def http_head(req: TargetRequest) -> HttpRequest:
    """The HTTP request a plain or CONNECT HTTP proxy request carries."""
    assert req.http is not None
    return req.http


def socks5(hs: Handshake, request: bytes) -> TargetRequest:
    greeting = feed_greeting(hs, b"\x05\x01\x00")
    assert hs.select_method(greeting.methods) == b"\x05\x00"
    return feed_request(hs, request)


def test_socks5_ipv4_ipv6_and_domain() -> None:
    req = socks5(Handshake(), b"\x05\x01\x00\x01\xc6\x12\x00\x02\x00\x50")
    assert (req.kind, req.command, req.host, req.port) == (
        ProxyKind.SOCKS5, Command.CONNECT, "198.18.0.2", 80)
    v6 = bytes(15) + b"\x01"
    assert socks5(Handshake(), b"\x05\x01\x00\x04" + v6 + b"\x01\xbb").host == "::1"
    hs = Handshake()
    req = socks5(hs, b"\x05\x01\x00\x03\x0cexternal.lab\x1f\x90early")
    assert (req.host, req.port) == ("external.lab", 8080)
    assert hs.trailing == b"early"  # bytes sent before the reply go through
    assert hs.success_reply("198.18.0.1", 4242) == b"\x05\x00\x00\x01\xc6\x12\x00\x01\x10\x92"


def test_socks5_byte_by_byte_gives_the_same_result() -> None:
    data = b"\x05\x02\x00\x02"
    hs = Handshake()
    events: list[Event] = []
    for i in range(len(data)):
        hs.receive_data(data[i:i + 1])
        if (ev := hs.next_event()) is not None:
            events.append(ev)
    assert events == [Socks5Greeting(b"\x00\x02")]
    assert isinstance(events[0], Socks5Greeting)
    hs.select_method(events[0].methods)
    request = b"\x05\x01\x00\x03\x03abc\x00\x16"
    got = None
    for i in range(len(request)):
        hs.receive_data(request[i:i + 1])
        ev = hs.next_event()
        assert ev is None or i == len(request) - 1
        got = ev
    assert got == TargetRequest(ProxyKind.SOCKS5, Command.CONNECT, "abc", 22)


def test_socks5_userpass() -> None:
    hs = Handshake(require_auth=True)
    greeting = feed_greeting(hs, b"\x05\x01\x02")
    assert hs.select_method(greeting.methods) == b"\x05\x02"
    auth = feed(hs, b"\x01\x03bob\x06s3cret")
    assert auth == Socks5Auth("bob", "s3cret")
    assert hs.auth_result(True) == b"\x01\x00"
    assert feed_request(hs, b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x16").port == 22
    bad = Handshake(require_auth=True)
    feed(bad, b"\x05\x01\x02")
    bad.select_method(b"\x02")
    feed(bad, b"\x01\x03bob\x03bad")
    assert bad.auth_result(False) == b"\x01\x01"
    assert bad.phase is Phase.FAILED


def test_socks5_auth_required_but_not_offered() -> None:
    hs = Handshake(require_auth=True)
    greeting = feed_greeting(hs, b"\x05\x01\x00")
    with pytest.raises(HandshakeError) as err:
        hs.select_method(greeting.methods)
    assert err.value.reply is None
    assert hs.no_acceptable_method() == b"\x05\xff"


@pytest.mark.parametrize(("request_bytes", "code"), [
    (b"\x05\x02\x00\x01\x01\x02\x03\x04\x00\x50", ReplyCode.COMMAND_NOT_SUPPORTED),  # BIND
    (b"\x05\x09\x00\x01\x01\x02\x03\x04\x00\x50", ReplyCode.COMMAND_NOT_SUPPORTED),
    (b"\x05\x01\x00\x07\x01\x02\x03\x04\x00\x50", ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED),
    (b"\x05\x01\x00\x03\x00\x00\x50", ReplyCode.HOST_UNREACHABLE),          # empty name
    (b"\x05\x01\x00\x03\x03a\x00b\x00\x50", ReplyCode.HOST_UNREACHABLE),    # NUL in the name
    (b"\x05\x01\x01\x01\x01\x02\x03\x04\x00\x50", ReplyCode.GENERAL_FAILURE),  # RSV
    (b"\x04\x01\x00\x01\x01\x02\x03\x04\x00\x50", ReplyCode.GENERAL_FAILURE),  # version
])
def test_socks5_bad_requests_get_the_right_reply(request_bytes: bytes, code: ReplyCode) -> None:
    hs = Handshake()
    hs.select_method(feed_greeting(hs, b"\x05\x01\x00").methods)
    hs.receive_data(request_bytes)
    with pytest.raises(HandshakeError) as err:
        hs.next_event()
    assert err.value.reply == code
    assert hs.error_reply(code) == socks5_reply(code)
    assert hs.error_reply(code)[1] == code


def test_socks5_udp_associate_request_and_udp_headers() -> None:
    req = socks5(Handshake(), b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
    assert req.command is Command.UDP
    dgram = b"\0\0\0\x01" + bytes([198, 18, 0, 2]) + struct.pack(">H", 53) + b"query"
    assert parse_udp_request(dgram) == ("198.18.0.2", 53, b"query")
    assert parse_udp_request(b"\0\0\0\x03\x03abc\x00\x35x") == ("abc", 53, b"x")
    assert udp_reply_header("198.18.0.2", 53) + b"r" == dgram[:10] + b"r"
    for bad in (b"", b"\0\0\x01\x01" + bytes(6), b"\0\0\0\x01\x01", b"\1\0\0\x01" + bytes(6)):
        with pytest.raises(HandshakeError):
            parse_udp_request(bad)


def test_socks4_and_4a() -> None:
    hs = Handshake()
    req = feed(hs, b"\x04\x01\x00\x50\xc6\x12\x00\x02bob\x00")
    assert req == TargetRequest(ProxyKind.SOCKS4, Command.CONNECT, "198.18.0.2", 80, "bob")
    assert hs.success_reply() == b"\x00\x5a" + bytes(6)
    req = feed_request(Handshake(), b"\x04\x01\x01\xbb\x00\x00\x00\x07\x00external.lab\x00")
    assert (req.host, req.port) == ("external.lab", 443)
    hs = Handshake()
    with pytest.raises(HandshakeError) as err:
        feed(hs, b"\x04\x02\x00\x50\x01\x02\x03\x04\x00")
    assert err.value.reply is ReplyCode.COMMAND_NOT_SUPPORTED
    assert hs.error_reply(ReplyCode.COMMAND_NOT_SUPPORTED) == b"\x00\x5b" + bytes(6)


def test_socks4_user_id_is_bounded() -> None:
    hs = Handshake()
    hs.receive_data(b"\x04\x01\x00\x50\x01\x02\x03\x04" + b"u" * 200)
    assert hs.next_event() is None
    hs.receive_data(b"u" * 100)
    with pytest.raises(HandshakeError):
        hs.next_event()


def test_http_connect_and_plain() -> None:
    hs = Handshake()
    req = feed_request(hs, b"CONNECT external.lab:443 HTTP/1.1\r\nHost: external.lab:443\r\n\r\n")
    assert (req.kind, req.host, req.port, http_head(req).is_connect) == (
        ProxyKind.HTTP, "external.lab", 443, True)
    assert hs.success_reply() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    hs = Handshake()
    raw = (b"GET http://external.lab:8080/a/b?c=1 HTTP/1.1\r\nHost: external.lab:8080\r\n"
           b"Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eDp5\r\n"
           b"Accept: */*\r\n\r\nBODY")
    req = feed_request(hs, raw)
    head = http_head(req)
    assert (req.host, req.port, head.path) == ("external.lab", 8080, "/a/b?c=1")
    assert head.forward_head() == (b"GET /a/b?c=1 HTTP/1.1\r\nHost: external.lab:8080\r\n"
                                   b"Accept: */*\r\nConnection: close\r\n\r\n")
    assert hs.trailing == b"BODY" and hs.success_reply() == b""
    req = feed_request(Handshake(), b"CONNECT [::1]:22 HTTP/1.1\r\n\r\n")
    assert (req.host, req.port) == ("::1", 22)
    req = feed_request(Handshake(), b"GET http://h HTTP/1.0\r\n\r\n")
    head = http_head(req)
    assert (req.host, req.port, head.path) == ("h", 80, "/")
    assert b"Host: h\r\n" in head.forward_head()


def test_http_heads_with_bare_lf_line_ends_are_read() -> None:
    """RFC 9112 2.2: a recipient may take a bare LF as a line end. Hand-written clients
    (printf | nc) send them; a head that never showed CRLFCRLF used to wait out the
    handshake timeout instead of being answered."""
    raw = b"GET http://external.lab/x HTTP/1.1\nHost: external.lab\r\nAccept: */*\n\nBODY"
    req = feed_request(Handshake(), raw)
    head = http_head(req)
    assert (req.host, req.port, head.path, head.headers) == (
        "external.lab", 80, "/x", ((b"Host", b"external.lab"), (b"Accept", b"*/*")))
    parsed = parse_head(raw)
    assert parsed is not None and raw[parsed[1]:] == b"BODY"
    assert parse_head(b"GET http://a/ HTTP/1.1\nHost: a\n") is None  # no blank line yet
    with pytest.raises(HandshakeError):  # a bare CR is no line end: a control character
        feed(Handshake(), b"GET http://a/ HTTP/1.1\nX: a\rb\n\n")


def test_http_credentials() -> None:
    token = base64.b64encode(b"bob:pa:ss").decode()
    parsed = parse_head(f"CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: Basic {token}\r\n\r\n"
                        .encode())
    assert parsed is not None  # a complete head
    head, _ = parsed
    assert head.credentials() == ("bob", "pa:ss")
    parsed = parse_head(b"CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: Basic !!\r\n\r\n")
    assert parsed is not None
    head, _ = parsed
    assert head.credentials() is None


@pytest.mark.parametrize("raw", [
    b"GET /relative HTTP/1.1\r\n\r\n",
    b"GET https://a/ HTTP/1.1\r\n\r\n",
    b"CONNECT host HTTP/1.1\r\n\r\n",
    b"CONNECT host:99999 HTTP/1.1\r\n\r\n",
    b"CONNECT host:22 HTTP/2.0\r\n\r\n",
    b"CONNECT [::1:22 HTTP/1.1\r\n\r\n",
    b"GET http://a/ HTTP/1.1\r\nBad Header\r\n\r\n",
    b"GET http://a/ HTTP/1.1\r\n folded\r\n\r\n",
    b"GET http://u@a/ HTTP/1.1\r\n\r\n",
    b"GET  http://a/ HTTP/1.1\r\n\r\n",
])
def test_http_malformed_requests_get_400(raw: bytes) -> None:
    hs = Handshake()
    with pytest.raises(HandshakeError):
        feed(hs, raw)
    assert hs.error_reply(ReplyCode.GENERAL_FAILURE).startswith(b"HTTP/1.1 400 ")


def test_http_errors_follow_the_reply_code() -> None:
    assert http_error(ReplyCode.CONNECTION_REFUSED).startswith(b"HTTP/1.1 502 ")
    assert http_error(ReplyCode.NOT_ALLOWED).startswith(b"HTTP/1.1 403 ")
    assert http_error(ReplyCode.TTL_EXPIRED).startswith(b"HTTP/1.1 504 ")
    assert b"X-Vmbusify-Reply: 5\r\n" in http_error(ReplyCode.CONNECTION_REFUSED)


def test_handshake_is_bounded() -> None:
    hs = Handshake()
    hs.receive_data(b"GET http://a/ HTTP/1.1\r\n")
    with pytest.raises(HandshakeError):
        hs.receive_data(b"X: " + b"y" * MAX_HANDSHAKE)


def test_unknown_first_byte_is_closed_without_reply() -> None:
    hs = Handshake()
    with pytest.raises(HandshakeError) as err:
        feed(hs, b"\x16\x03\x01")  # a TLS ClientHello
    assert err.value.reply is None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=64))
def test_fuzzed_input_never_raises_anything_but_handshake_error(data: bytes, step: int) -> None:
    """Any bytes, in any split: an event, a HandshakeError, or a wish for more. Nothing else."""
    for prefix in (b"", b"\x05\x01\x00", b"\x04\x01", b"CONNECT ", b"GET http://"):
        hs = Handshake(require_auth=prefix == b"")
        blob = prefix + data
        try:
            for i in range(0, len(blob), step):
                hs.receive_data(blob[i:i + step])
                while (ev := hs.next_event()) is not None:
                    if isinstance(ev, Socks5Greeting):
                        hs.select_method(ev.methods)
                    elif isinstance(ev, Socks5Auth):
                        hs.auth_result(True)
                    else:
                        assert hs.phase is Phase.DONE
                        break
                if hs.phase is Phase.DONE:
                    break
        except HandshakeError as exc:
            hs.error_reply(exc.reply or ReplyCode.GENERAL_FAILURE)


def test_reply_codes_from_errno() -> None:
    import errno
    assert reply_for_errno(errno.ECONNREFUSED) is ReplyCode.CONNECTION_REFUSED
    assert reply_for_errno(errno.ENETUNREACH) is ReplyCode.NETWORK_UNREACHABLE
    assert reply_for_errno(errno.EHOSTUNREACH) is ReplyCode.HOST_UNREACHABLE
    assert reply_for_errno(errno.ETIMEDOUT) is ReplyCode.TTL_EXPIRED
    assert reply_for_errno(None) is ReplyCode.GENERAL_FAILURE


def test_proxy_messages_round_trip_and_validate() -> None:
    msg = ProxyOpen("external.lab", 80, Command.UDP)
    assert ProxyOpen.from_body(msg.to_body()) == msg
    ack = OpenAck(ReplyCode.CONNECTION_REFUSED, reason="refused")
    assert OpenAck.from_body(ack.to_body()) == ack and not ack.ok
    for bad in ({"host": "", "port": 1}, {"host": "a", "port": 70000}, {"host": "a"},
                {"host": "a", "port": 1, "cmd": 9}, ["x"]):
        with pytest.raises(RemoteProtocolError):
            ProxyOpen.from_body(bad)
    with pytest.raises(RemoteProtocolError):
        OpenAck.from_body({"reply": 42, "host": "0.0.0.0", "port": 0})


def test_datagram_framing_survives_any_split() -> None:
    frames = encode_datagram("198.18.0.2", 53, b"q" * 300) + encode_datagram("a.lab", 1, b"")
    for step in (1, 7, 64, len(frames)):
        dec = DatagramDecoder()
        got = []
        for i in range(0, len(frames), step):
            got += dec.feed(frames[i:i + step])
        assert got == [("198.18.0.2", 53, b"q" * 300), ("a.lab", 1, b"")]
    with pytest.raises(RemoteProtocolError):
        DatagramDecoder().feed(b"\x00\x02\x00\x00")


def test_http_plain_request_host_header_is_the_uri_authority() -> None:
    """A proxy replaces the client's Host with the absolute URI's authority (RFC 9112
    3.2.2): the origin must not be told a different (or a second) name."""
    raw = (b"GET http://external.lab:8080/x HTTP/1.1\r\nHost: attacker.example\r\n"
           b"Accept: */*\r\nhost: second.example\r\n\r\n")
    head = http_head(feed_request(Handshake(), raw))
    assert head.forward_head() == (b"GET /x HTTP/1.1\r\nHost: external.lab:8080\r\n"
                                   b"Accept: */*\r\nConnection: close\r\n\r\n")
    head = http_head(feed_request(Handshake(), b"GET http://[::1]/ HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert head.forward_head().count(b"Host:") == 1 and b"Host: [::1]\r\n" in head.forward_head()


def test_socks5_method_preference() -> None:
    """"No authentication" first for those served without credentials; user/password first
    for the others (who then get reply 2 to a CONNECT made without); either taken when it is
    all a client offers."""
    for prefer, offered, chosen in ((False, b"\x00\x02", b"\x05\x00"),
                                    (True, b"\x00\x02", b"\x05\x02"),
                                    (True, b"\x00", b"\x05\x00"),
                                    (False, b"\x02", b"\x05\x02")):
        hs = Handshake(prefer_auth=prefer)
        greeting = feed_greeting(hs, bytes([5, len(offered)]) + offered)
        assert hs.select_method(greeting.methods) == chosen, (prefer, offered)
    hs = Handshake(prefer_auth=True)
    with pytest.raises(HandshakeError):
        hs.select_method(feed_greeting(hs, b"\x05\x01\x01").methods)  # GSSAPI only


def test_socks5_not_allowed_reply() -> None:
    hs = Handshake(prefer_auth=True)
    hs.select_method(feed_greeting(hs, b"\x05\x01\x00").methods)
    feed_request(hs, b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x16")
    assert hs.error_reply(ReplyCode.NOT_ALLOWED)[:2] == b"\x05\x02"
