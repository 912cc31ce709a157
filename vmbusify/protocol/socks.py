"""SOCKS5 (RFC 1928, 1929), SOCKS4/4a and the HTTP proxy handshake, as one sans-I/O parser.

Theory of operation
-------------------
The proxy client's port speaks three protocols, told apart by the first byte: 0x05 SOCKS5,
0x04 SOCKS4/4a, an ASCII capital letter an HTTP proxy request (httpproxy.py). A Handshake is
fed the user's bytes with ``receive_data`` and drained with ``next_event``, which returns
None while it needs more, or one of:

    Socks5Greeting   the client's methods; answer with ``select_method`` (returns the bytes)
    Socks5Auth       RFC 1929 user/password; answer with ``auth_result``
    TargetRequest    where to connect (or UDP ASSOCIATE); the handshake is over, and
                     ``trailing`` holds any bytes the client sent beyond it

Malformed input raises HandshakeError, whose ``reply`` is the ReplyCode to answer with (None:
nothing sensible can be said, just close). ``error_reply`` / ``success_reply`` encode the
answer in the protocol the client spoke. Every field is bounded: nothing here buffers more
than one maximal handshake (MAX_HANDSHAKE).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import Enum, IntEnum

from vmbusify.protocol.httpproxy import HttpRequest, http_error, http_established, parse_head
from vmbusify.protocol.proxy import Command, HandshakeError, ReplyCode

#: The longest handshake accepted, in bytes (an HTTP proxy request head is the largest).
MAX_HANDSHAKE = 16 << 10
_PORT = struct.Struct(">H")


class ProxyKind(Enum):
    """Which protocol the user's client speaks."""

    SOCKS4 = "socks4"
    SOCKS5 = "socks5"
    HTTP = "http"


class AddrType(IntEnum):
    """SOCKS5 ATYP."""

    IPV4 = 1
    DOMAIN = 3
    IPV6 = 4


class Method(IntEnum):
    """SOCKS5 authentication methods this proxy knows."""

    NO_AUTH = 0
    USERPASS = 2
    NO_ACCEPTABLE = 0xFF


class Phase(Enum):
    """Where a Handshake is."""

    DETECT = "detect"
    GREETING = "greeting"
    METHOD = "awaiting select_method"
    AUTH = "auth"
    AUTH_RESULT = "awaiting auth_result"
    REQUEST = "request"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Socks5Greeting:
    """The SOCKS5 client's offered methods."""

    methods: bytes


@dataclass(frozen=True, slots=True)
class Socks5Auth:
    """RFC 1929 credentials."""

    username: str
    password: str


@dataclass(frozen=True, slots=True)
class TargetRequest:
    """The end of a handshake: what the user wants reached."""

    kind: ProxyKind
    command: Command
    host: str
    port: int
    #: SOCKS4 user id, or the HTTP request to forward (plain, non-CONNECT requests).
    userid: str = ""
    http: HttpRequest | None = None


def detect(first: int) -> ProxyKind:
    """The protocol a connection speaks, from its first byte; HandshakeError if none."""
    if first == 5:
        return ProxyKind.SOCKS5
    if first == 4:
        return ProxyKind.SOCKS4
    if 0x41 <= first <= 0x5A:  # HTTP methods are upper-case tokens
        return ProxyKind.HTTP
    raise HandshakeError(f"unknown protocol (first byte 0x{first:02x})", None)


def check_host(raw: bytes) -> str:
    """A host name from the wire: 1..255 printable ASCII bytes, no spaces or controls."""
    if not 0 < len(raw) <= 255:
        raise HandshakeError("host name empty or too long", ReplyCode.GENERAL_FAILURE)
    if any(b <= 0x20 or b >= 0x7F for b in raw):
        raise HandshakeError("host name has non-printable bytes", ReplyCode.HOST_UNREACHABLE)
    return raw.decode("ascii")


def _cstring(buf: bytearray, start: int, what: str) -> tuple[bytes, int] | None:
    """A NUL-terminated field of at most 255 bytes at ``start``: (value, index after NUL)."""
    end = buf.find(b"\0", start, start + 256)
    if end < 0:
        if len(buf) - start > 255:
            raise HandshakeError(f"SOCKS4 {what} longer than 255 bytes", ReplyCode.GENERAL_FAILURE)
        return None
    return bytes(buf[start:end]), end + 1


class Handshake:
    """One user connection's handshake (sans-I/O)."""

    def __init__(self, require_auth: bool = False, prefer_auth: bool = False) -> None:
        #: Only RFC 1929 user/password will do (SOCKS5).
        self.require_auth = require_auth
        #: Pick user/password over "no authentication" when the client offers both (a user
        #: who is not served without credentials); otherwise "no authentication" wins, and
        #: user/password is taken when it is all the client offers.
        self.prefer_auth = prefer_auth
        self.kind: ProxyKind | None = None
        self.phase = Phase.DETECT
        self.method = Method.NO_AUTH
        self._buf = bytearray()
        self._request: HttpRequest | None = None

    @property
    def trailing(self) -> bytes:
        """Bytes received after the handshake (only meaningful once it is DONE)."""
        return bytes(self._buf)

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the user; HandshakeError if the handshake grows past its bound."""
        self._buf += data
        if self.phase is not Phase.DONE and len(self._buf) > MAX_HANDSHAKE:
            self.phase = Phase.FAILED
            raise HandshakeError("handshake too long", ReplyCode.GENERAL_FAILURE)

    def next_event(self) -> Socks5Greeting | Socks5Auth | TargetRequest | None:
        """The next event, or None when more bytes are needed."""
        try:
            return self._next()
        except HandshakeError:
            self.phase = Phase.FAILED
            raise

    def _next(self) -> Socks5Greeting | Socks5Auth | TargetRequest | None:
        if self.phase is Phase.FAILED:
            raise HandshakeError("handshake already failed", None)
        if self.phase in (Phase.METHOD, Phase.AUTH_RESULT, Phase.DONE) or not self._buf:
            return None
        if self.phase is Phase.DETECT:
            self.kind = detect(self._buf[0])
            self.phase = {ProxyKind.SOCKS5: Phase.GREETING}.get(self.kind, Phase.REQUEST)
        if self.phase is Phase.GREETING:
            return self._greeting()
        if self.phase is Phase.AUTH:
            return self._auth()
        if self.kind is ProxyKind.SOCKS5:
            return self._socks5_request()
        if self.kind is ProxyKind.SOCKS4:
            return self._socks4_request()
        return self._http_request()

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    # -- SOCKS5 ----------------------------------------------------------------------------
    def _greeting(self) -> Socks5Greeting | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        n = buf[1]
        if n == 0:
            raise HandshakeError("SOCKS5 greeting offers no method", None)
        if len(buf) < 2 + n:
            return None
        methods = self._take(2 + n)[2:]
        self.phase = Phase.METHOD
        return Socks5Greeting(methods)

    def select_method(self, methods: bytes) -> bytes:
        """Choose a method from the greeting; the bytes to send. Raises if none fits."""
        if self.phase is not Phase.METHOD:
            raise HandshakeError("select_method out of order", None)
        order: tuple[Method, ...]
        if self.require_auth:
            order = (Method.USERPASS,)
        elif self.prefer_auth:
            order = (Method.USERPASS, Method.NO_AUTH)
        else:
            order = (Method.NO_AUTH, Method.USERPASS)
        wanted = next((m for m in order if m in methods), None)
        if wanted is None:
            self.phase = Phase.FAILED
            raise HandshakeError("client offers no acceptable method (needs "
                                 f"{' or '.join(m.name for m in order)})", None)
        self.method = wanted
        self.phase = Phase.AUTH if wanted is Method.USERPASS else Phase.REQUEST
        return bytes((5, wanted))

    @staticmethod
    def no_acceptable_method() -> bytes:
        """The answer to a greeting none of whose methods is acceptable."""
        return bytes((5, Method.NO_ACCEPTABLE))

    def _auth(self) -> Socks5Auth | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        if buf[0] != 1:
            raise HandshakeError(f"RFC 1929 version {buf[0]} (expected 1)", None)
        ulen = buf[1]
        if len(buf) < 3 + ulen:
            return None
        plen = buf[2 + ulen]
        if len(buf) < 3 + ulen + plen:
            return None
        raw = self._take(3 + ulen + plen)
        self.phase = Phase.AUTH_RESULT
        return Socks5Auth(raw[2:2 + ulen].decode("utf-8", "replace"),
                          raw[3 + ulen:].decode("utf-8", "replace"))

    def auth_result(self, ok: bool) -> bytes:
        """The RFC 1929 answer; after a failure the connection must be closed."""
        if self.phase is not Phase.AUTH_RESULT:
            raise HandshakeError("auth_result out of order", None)
        self.phase = Phase.REQUEST if ok else Phase.FAILED
        return bytes((1, 0 if ok else 1))

    def _socks5_request(self) -> TargetRequest | None:
        buf = self._buf
        if len(buf) < 5:
            return None
        if buf[0] != 5:
            raise HandshakeError(f"SOCKS5 request with version {buf[0]}", ReplyCode.GENERAL_FAILURE)
        cmd, rsv, atyp = buf[1], buf[2], buf[3]
        if rsv != 0:
            raise HandshakeError("SOCKS5 request with a non-zero reserved byte",
                                 ReplyCode.GENERAL_FAILURE)
        if atyp == AddrType.IPV4:
            need = 4 + 4 + 2
        elif atyp == AddrType.IPV6:
            need = 4 + 16 + 2
        elif atyp == AddrType.DOMAIN:
            need = 4 + 1 + buf[4] + 2
            if buf[4] == 0:
                raise HandshakeError("SOCKS5 request with an empty host name",
                                     ReplyCode.HOST_UNREACHABLE)
        else:
            raise HandshakeError(f"SOCKS5 address type {atyp}",
                                 ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED)
        if len(buf) < need:
            return None
        raw = self._take(need)
        host = _decode_addr(atyp, raw[4:need - 2])
        (port,) = _PORT.unpack_from(raw, need - 2)
        if cmd not in (Command.CONNECT, Command.UDP):
            raise HandshakeError(f"SOCKS5 command {cmd} not supported",
                                 ReplyCode.COMMAND_NOT_SUPPORTED)
        self.phase = Phase.DONE
        return TargetRequest(ProxyKind.SOCKS5, Command(cmd), host, port)

    # -- SOCKS4 / 4a -----------------------------------------------------------------------
    def _socks4_request(self) -> TargetRequest | None:
        buf = self._buf
        if len(buf) < 9:
            return None
        cmd = buf[1]
        (port,) = _PORT.unpack_from(buf, 2)
        ip = bytes(buf[4:8])
        got = _cstring(buf, 8, "user id")
        if got is None:
            return None
        userid, end = got
        if ip[:3] == b"\0\0\0" and ip[3] != 0:  # SOCKS4a: a host name follows
            name = _cstring(buf, end, "host name")
            if name is None:
                return None
            raw_host, end = name
            host = check_host(raw_host)
        else:
            host = str(ipaddress.IPv4Address(ip))
        del buf[:end]
        if cmd != Command.CONNECT:
            raise HandshakeError(f"SOCKS4 command {cmd} not supported",
                                 ReplyCode.COMMAND_NOT_SUPPORTED)
        self.phase = Phase.DONE
        return TargetRequest(ProxyKind.SOCKS4, Command.CONNECT, host, port,
                             userid=userid.decode("utf-8", "replace"))

    # -- HTTP ------------------------------------------------------------------------------
    def _http_request(self) -> TargetRequest | None:
        got = parse_head(self._buf)
        if got is None:
            return None
        req, used = got
        del self._buf[:used]
        self._request = req
        self.phase = Phase.DONE
        return TargetRequest(ProxyKind.HTTP, Command.CONNECT, req.host, req.port, http=req)

    # -- answers ---------------------------------------------------------------------------
    def success_reply(self, bound_host: str = "0.0.0.0", bound_port: int = 0) -> bytes:
        """The "connected" answer in the client's protocol (empty for plain HTTP requests)."""
        if self.kind is ProxyKind.SOCKS5:
            return socks5_reply(ReplyCode.SUCCEEDED, bound_host, bound_port)
        if self.kind is ProxyKind.SOCKS4:
            return socks4_reply(True)
        if self.kind is ProxyKind.HTTP and self._request is not None and self._request.is_connect:
            return http_established()
        return b""

    def error_reply(self, code: ReplyCode, reason: str = "") -> bytes:
        """The failure answer in the client's protocol (empty if it has none)."""
        if self.kind is ProxyKind.SOCKS5 and self.phase in (Phase.REQUEST, Phase.DONE,
                                                             Phase.FAILED):
            return socks5_reply(code)
        if self.kind is ProxyKind.SOCKS4:
            return socks4_reply(False)
        if self.kind is ProxyKind.HTTP:
            return http_error(code, reason, malformed=self.phase is Phase.FAILED)
        return b""


def _decode_addr(atyp: int, raw: bytes) -> str:
    if atyp == AddrType.IPV4:
        return str(ipaddress.IPv4Address(raw))
    if atyp == AddrType.IPV6:
        return str(ipaddress.IPv6Address(raw))
    return check_host(raw[1:])


def encode_addr(host: str, port: int) -> bytes:
    """ATYP + address + port, as SOCKS5 replies and UDP headers carry them."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raw = host.encode("ascii", "replace")[:255]
        return bytes((AddrType.DOMAIN, len(raw))) + raw + _PORT.pack(port)
    atyp = AddrType.IPV4 if ip.version == 4 else AddrType.IPV6
    return bytes((atyp,)) + ip.packed + _PORT.pack(port)


def socks5_reply(code: ReplyCode, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """A SOCKS5 reply: VER REP RSV ATYP BND.ADDR BND.PORT."""
    return bytes((5, code, 0)) + encode_addr(host, port)


def socks4_reply(granted: bool) -> bytes:
    """A SOCKS4 reply: 0x5A granted or 0x5B rejected (port and address zero)."""
    return bytes((0, 0x5A if granted else 0x5B)) + b"\0" * 6


def parse_udp_request(datagram: bytes) -> tuple[str, int, bytes]:
    """A SOCKS5 UDP request header (RFC 1928 section 7): (host, port, data).

    Fragments (FRAG != 0) are refused, as most servers do; HandshakeError for anything bad.
    """
    if len(datagram) < 4 or datagram[0] or datagram[1]:
        raise HandshakeError("UDP datagram without a valid SOCKS5 header", None)
    if datagram[2] != 0:
        raise HandshakeError("fragmented SOCKS5 UDP datagrams are not supported", None)
    atyp = datagram[3]
    if atyp == AddrType.IPV4:
        end = 4 + 4
    elif atyp == AddrType.IPV6:
        end = 4 + 16
    elif atyp == AddrType.DOMAIN and len(datagram) > 4:
        end = 5 + datagram[4]
    else:
        raise HandshakeError(f"UDP datagram with address type {atyp}", None)
    if len(datagram) < end + 2:
        raise HandshakeError("truncated SOCKS5 UDP header", None)
    host = _decode_addr(atyp, datagram[4:end])
    (port,) = _PORT.unpack_from(datagram, end)
    return host, port, datagram[end + 2:]


def udp_reply_header(host: str, port: int) -> bytes:
    """The SOCKS5 UDP header in front of a datagram sent back to the client."""
    return b"\0\0\0" + encode_addr(host, port)


__all__ = [
    "AddrType", "Handshake", "HandshakeError", "HttpRequest", "Method", "Phase", "ProxyKind",
    "Socks5Auth", "Socks5Greeting", "TargetRequest", "detect", "encode_addr", "http_established",
    "parse_udp_request", "socks4_reply", "socks5_reply", "udp_reply_header",
]
