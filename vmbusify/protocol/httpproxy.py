"""HTTP proxy requests (RFC 9110 CONNECT and absolute-form requests), parsed sans-I/O.

apt, pip, git and curl follow ``http_proxy``/``https_proxy``: HTTPS goes through ``CONNECT
host:port``, plain HTTP as ``GET http://host/path HTTP/1.1``. ``parse_head`` reads one request
head (bounded by MAX_HEAD) and returns an HttpRequest; a plain request is forwarded with
``forward_head()``: origin-form target, the proxy's own headers removed and ``Connection:
close`` set, so one user connection carries exactly one request to one origin.
Errors are answered with ``http_error``, whose status follows the far side's ReplyCode and
whose ``Proxy-Status`` header (RFC 9209) names it.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass

from vmbusify.protocol.proxy import HandshakeError, ReplyCode

#: Longest request head accepted.
MAX_HEAD = 16 << 10
MAX_HEADERS = 100
_METHOD = re.compile(rb"^[A-Z]{1,20}$")
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
#: Headers meant for the proxy (or for one hop) that never go to the origin.
_HOP = {b"proxy-connection", b"proxy-authorization", b"connection", b"keep-alive", b"te",
        b"trailer", b"upgrade", b"proxy-authenticate"}


def _bad(message: str) -> HandshakeError:
    return HandshakeError(f"HTTP proxy request: {message}", ReplyCode.GENERAL_FAILURE)


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One proxy request head."""

    method: str
    #: The request target as sent (authority for CONNECT, absolute URI otherwise).
    target: str
    version: str
    host: str
    port: int
    #: Origin-form path and query (``/`` for CONNECT).
    path: str
    headers: tuple[tuple[bytes, bytes], ...]

    @property
    def is_connect(self) -> bool:
        return self.method == "CONNECT"

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        key = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == key:
                return v.decode("latin-1")
        return None

    def credentials(self) -> tuple[str, str] | None:
        """``Proxy-Authorization: Basic`` user and password, or None if absent or malformed."""
        value = self.header("Proxy-Authorization")
        if not value:
            return None
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).decode(
                "utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return (user, password) if sep else None

    def forward_head(self) -> bytes:
        """The head to send the origin: origin-form, no proxy headers, ``Connection: close``.

        ``Host`` is the authority of the absolute URI, whatever Host header(s) the client
        sent (RFC 9112 section 3.2.2: a proxy ignores a received Host and replaces it), so
        the origin never sees a name other than the one the connection was opened for.
        """
        lines = [f"{self.method} {self.path} {self.version}".encode(),
                 b"Host: " + _authority(self.host, self.port, 80).encode()]
        for k, v in self.headers:
            low = k.lower()
            if low in _HOP or low == b"host":
                continue
            lines.append(k + b": " + v)
        lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n"


def _authority(host: str, port: int, default: int) -> str:
    h = f"[{host}]" if ":" in host else host
    return h if port == default else f"{h}:{port}"


def split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` / ``host`` -> (host, port); HandshakeError if malformed."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise _bad(f"unterminated IPv6 literal in {authority!r}")
        host, rest = authority[1:end], authority[end + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _bad(f"bad IPv6 literal {host!r}") from None
        if rest and not rest.startswith(":"):
            raise _bad(f"junk after the IPv6 literal in {authority!r}")
        port_text = rest[1:] if rest else ""
    else:
        host, sep, port_text = authority.partition(":")
        if sep and not port_text:
            raise _bad(f"empty port in {authority!r}")
    if not host or len(host) > 255 or any(c in host for c in "@/\\ \t?#"):
        raise _bad(f"bad host in {authority!r}")
    if port_text:
        if not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) <= 65535:
            raise _bad(f"bad port in {authority!r}")
        return host, int(port_text)
    if default_port is None:
        raise _bad(f"CONNECT target {authority!r} has no port")
    return host, default_port


def _head_lines(buf: bytes | bytearray) -> tuple[list[bytes], int] | None:
    """The lines of the head at the start of ``buf`` and the bytes it takes with its blank
    line, or None while the blank line has not come. Lines end in CRLF or, as RFC 9112 2.2
    lets a recipient accept, a bare LF (printf and hand-written clients send those)."""
    lines: list[bytes] = []
    pos = 0
    while (nl := buf.find(b"\n", pos, MAX_HEAD + 2)) >= 0:
        line = bytes(buf[pos:nl])
        line = line[:-1] if line.endswith(b"\r") else line
        pos = nl + 1
        if not line and lines:
            return lines, pos
        lines.append(line)
    return None


def parse_head(buf: bytes | bytearray) -> tuple[HttpRequest, int] | None:
    """One request head from the start of ``buf``: (request, bytes used) or None for more."""
    head = _head_lines(buf)
    if head is None:
        if len(buf) > MAX_HEAD:
            raise _bad("request head longer than 16 KiB")
        return None
    lines, used = head
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise _bad("malformed request line")
    raw_method, raw_target, raw_version = parts
    if not _METHOD.match(raw_method):
        raise _bad("malformed method")
    if raw_version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise _bad("unsupported HTTP version")
    if not raw_target or any(b <= 0x20 or b >= 0x7F for b in raw_target):
        raise _bad("malformed request target")
    if len(lines) - 1 > MAX_HEADERS:
        raise _bad("too many header fields")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise _bad("malformed header field")
        if any((b < 0x20 and b != 0x09) or b == 0x7F for b in value):
            raise _bad("control character in a header value")
        headers.append((name, value.strip(b" \t")))
    method, target, version = raw_method.decode(), raw_target.decode(), raw_version.decode()
    if method == "CONNECT":
        host, port = split_authority(target, None)
        path = "/"
    else:
        scheme, sep, rest = target.partition("://")
        if not sep:
            raise _bad("not a proxy request (the target is not an absolute URI)")
        if scheme.lower() != "http":
            raise _bad(f"scheme {scheme!r} is not proxied (use CONNECT for https)")
        slash = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        authority, path = rest[:slash], rest[slash:] or "/"
        if path.startswith("?"):
            path = "/" + path
        host, port = split_authority(authority, 80)
    if host.startswith("[") or ":" in host:
        host = host.strip("[]")
    return HttpRequest(method, target, version, host, port, path, tuple(headers)), used


_STATUS = {
    ReplyCode.GENERAL_FAILURE: (502, "Bad Gateway", "proxy_internal_error"),
    ReplyCode.NOT_ALLOWED: (403, "Forbidden", "destination_ip_prohibited"),
    ReplyCode.NETWORK_UNREACHABLE: (502, "Bad Gateway", "destination_ip_unroutable"),
    ReplyCode.HOST_UNREACHABLE: (502, "Bad Gateway", "destination_unavailable"),
    ReplyCode.CONNECTION_REFUSED: (502, "Bad Gateway", "connection_refused"),
    ReplyCode.TTL_EXPIRED: (504, "Gateway Timeout", "connection_timeout"),
    ReplyCode.COMMAND_NOT_SUPPORTED: (405, "Method Not Allowed", "http_request_denied"),
    ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED: (400, "Bad Request", "http_request_error"),
}


def _response(status: int, reason: str, extra: list[str], body: str) -> bytes:
    data = body.encode("utf-8", "replace") + b"\n"
    head = [f"HTTP/1.1 {status} {reason}", *extra, "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(data)}", "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def http_error(code: ReplyCode, reason: str = "", malformed: bool = False) -> bytes:
    """The error response for a failed proxy request (``malformed``: 400 for a bad request)."""
    if malformed:
        return _response(400, "Bad Request", ['Proxy-Status: vmbusify; error=http_request_error'],
                         f"vmbusify proxy: {reason or 'malformed proxy request'}")
    status, text, error = _STATUS.get(code, _STATUS[ReplyCode.GENERAL_FAILURE])
    return _response(status, text, [f"Proxy-Status: vmbusify; error={error}",
                                    f"X-Vmbusify-Reply: {int(code)}"],
                     f"vmbusify proxy: {reason or code.text}")


def http_auth_required() -> bytes:
    """407 asking for Basic proxy credentials."""
    return _response(407, "Proxy Authentication Required",
                     ['Proxy-Authenticate: Basic realm="vmbusify"'],
                     "vmbusify proxy: credentials required")


def http_established() -> bytes:
    """The answer to a CONNECT whose far side connected."""
    return b"HTTP/1.1 200 Connection established\r\n\r\n"
