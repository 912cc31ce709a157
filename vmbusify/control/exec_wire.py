"""The client side of the command listener's exec API (docs/exec.md): the one exec wire of
``vmbusifyexec``, the Python API (``vmbusify.client``) and file copies (``vmbusify.files``).

Light on purpose: ``vmbusifyexec`` imports this module at every start, and its start is its
latency (docs/exec.md, "A light client"). Standard library only, no dataclasses, urllib,
http.client or asyncio; the configuration is read by vmbusify.config_file. Each function does
one step of the one connection an exec makes: find the listener, connect to it (checked to be
root's before the token is sent), send the WebSocket upgrade with the request right behind it,
read the answer's head (and, for a refusal, the listener's reason), and read the STATUS
message. What is each caller's own stays with it: the request's size limit and the POST of a
detached exec (client/wire.py), the session (cli/exec.py, client/execution.py,
files/channel.py).
"""

from __future__ import annotations

from vmbusify.control.json_light import loads
from vmbusify.errors import ControlError, ErrorCode, code_of, exec_exit
from vmbusify.protocol.exec_api import EXIT_FAILURE
from vmbusify.protocol.websocket import (
    FrameDecoder,
    Opcode,
    encode_frame,
    expected_accept,
    handshake_key,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    import socket

    from vmbusify.control.verify import S

#: The most of an answer's head (status line and headers), or of a refusal's body, a client
#: reads.
MAX_HEAD = 65536


class Failure(ControlError):
    """An exec could not go on: the listener refused it or went away. ``str()`` is the
    one-line reason, ``exit_status`` what vmbusifyexec exits with (255, or the status the
    listener gave: 127 for a detached program that was not found). A refusal that carried the
    listener's ErrorCode has it as its ``code`` (an unknown VM: UNKNOWN_VM), else CONTROL."""

    def __init__(self, message: str, exit_status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class Listener:
    """This machine's command listener: where it is and the token for it."""

    def __init__(self, kind: str, where: str, port: int, token: str, owner: int) -> None:
        self.kind, self.where, self.port = kind, where, port
        self.token, self.owner = token, owner

    @property
    def host(self) -> str:
        """The Host header's value."""
        return "localhost" if self.kind == "unix" else f"{self.where}:{self.port}"


def find_listener(config_path: str | None) -> Listener:
    """This machine's command listener, read from the configuration (``None``: the default
    file, ``$VMBUSIFY_CONFIG`` first)."""
    # Imported here: vmbusifyexec's start is its latency, and a usage error needs none of
    # this (docs/exec.md, "A light client").
    from vmbusify.config_file import listener_of
    from vmbusify.control.token import read_token_owned

    kind, where, port, token_file = listener_of(config_path)
    return Listener(kind, where, port, *read_token_owned(token_file))


#: What may stand in a URL path segment as it is (RFC 3986 unreserved, plus ':' for IPv6).
_SEGMENT_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~:")


def exec_path(vmid: str) -> str:
    """``/v1/vms/{vmid}/exec`` with the vmid percent-encoded (urllib.parse costs ~2 ms)."""
    segment = "".join(chr(b) if b in _SEGMENT_SAFE else f"%{b:02X}" for b in vmid.encode())
    return f"/v1/vms/{segment}/exec"


def parse_status(payload: bytes) -> tuple[int, str, str]:
    """(exit code, reason, message) of the listener's STATUS message."""
    try:
        doc = loads(payload)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise Failure("the command listener sent a malformed exit status")
    code = doc.get("exit_code")
    if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= 255:
        raise Failure("the command listener sent a malformed exit status")
    return code, str(doc.get("reason", "")), str(doc.get("message", ""))[:2000]


def connect(listener: Listener, timeout: float | None = None) -> socket.socket:
    """A connection to the listener, checked to be root's before the token is sent."""
    import socket

    return connect_as(socket.socket, listener, timeout)


def connect_as(new: type[S], listener: Listener, timeout: float | None = None) -> S:
    """``connect`` with a socket of class ``new``: socket.socket, or ``_socket.socket``, the
    C type under it, which vmbusifyexec uses (the socket module's import is ~3 ms of its
    start)."""
    # Imported here: vmbusifyexec's start is its latency, and a usage error needs none of
    # this (docs/exec.md, "A light client").
    from vmbusify.control.verify import connect_verified_as

    return connect_verified_as(new, listener.kind, listener.where, listener.port,
                               listener.owner, 10.0 if timeout is None else timeout)


def read_head(sock: _socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and the bytes after them."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(MAX_HEAD)
        if not chunk:
            raise Failure("the command listener closed the connection")
        buf += chunk
        if len(buf) > MAX_HEAD:
            raise Failure("the command listener sent an oversized answer")
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        raise Failure(f"the command listener sent a bad status line {lines[0][:80]!r}") from None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def read_body(sock: _socket.socket, headers: dict[str, str], rest: bytes) -> object:
    """The JSON body behind a head (at most MAX_HEAD bytes of it), or None when there is
    none, it is cut short or it is not JSON."""
    try:
        length = min(int(headers.get("content-length", "0") or 0), MAX_HEAD)
    except ValueError:
        return None
    try:
        while len(rest) < length:
            chunk = sock.recv(MAX_HEAD)
            if not chunk:
                break
            rest += chunk
    except OSError:
        pass
    try:
        return loads(rest[:length])
    except ValueError:
        return None


def http_error(sock: _socket.socket, status: int, headers: dict[str, str], rest: bytes
               ) -> Failure:
    """The Failure for a refusal (an answer other than the one asked for), with the
    listener's own reason, its ErrorCode as ``code`` and the exit status it means."""
    sock.settimeout(5)
    doc = read_body(sock, headers, rest)
    reason = doc.get("error") if isinstance(doc, dict) else None
    error = doc.get("code") if isinstance(doc, dict) else None
    code = code_of(error) if isinstance(error, int) else None
    exit_code = doc.get("exit_code") if isinstance(doc, dict) else None
    if not isinstance(exit_code, int) or not 0 < exit_code < 256:
        # Not the program's status (a detached start that failed): the listener's error,
        # whose ErrorCode gives the exit status (vmbusify.errors.OUTCOMES).
        exit_code = exec_exit(ErrorCode.GENERIC if code is None else code)
    failure = Failure(str(reason or f"HTTP {status}"), exit_code)
    if code is not None:
        failure.code = code
    return failure


def http_request(listener: Listener, method: str, path: str, extra: str = "",
                 body: bytes = b"") -> bytes:
    """The bytes of one HTTP request to the listener, with the token."""
    head = (f"{method} {path} HTTP/1.1\r\nHost: {listener.host}\r\n"
            f"Authorization: Bearer {listener.token}\r\n{extra}")
    if method == "POST":
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    return f"{head}\r\n".encode()


def open_exec(listener: Listener, vmid: str, body: bytes, decoder: FrameDecoder,
              timeout: float | None = None) -> socket.socket:
    """Connect, upgrade to a WebSocket and send the request (one write, no wait in between).

    Returns the socket (blocking, no timeout) once the listener accepted the upgrade; the
    bytes that came behind the answer are fed to ``decoder``. Raises Failure (a refusal:
    ``http_error``'s), ControlError (a listener not to trust) or OSError.
    """
    import socket

    return open_exec_as(socket.socket, listener, vmid, body, decoder, timeout)


def open_exec_as(new: type[S], listener: Listener, vmid: str, body: bytes,
                 decoder: FrameDecoder, timeout: float | None = None) -> S:
    """``open_exec`` with a socket of class ``new`` (``connect_as``)."""
    sock = connect_as(new, listener, timeout)
    try:
        key = handshake_key()
        hello = http_request(listener, "GET", exec_path(vmid),
                             f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                             f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n")
        sock.sendall(hello + encode_frame(Opcode.TEXT, body))
        sock.settimeout(timeout)
        status, headers, rest = read_head(sock)
        if status != 101:
            raise http_error(sock, status, headers, rest)
        if headers.get("sec-websocket-accept") != expected_accept(key):
            raise Failure("the command listener answered the upgrade wrongly")
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    decoder.receive_data(rest)
    return sock
