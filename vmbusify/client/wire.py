"""What is the client's own in speaking to the command listener's exec API (docs/exec.md):
the request's size limit and the POST of a detached exec, for ``vmbusifyexec`` and the Python
API (``vmbusify.client``). The wire they share with file copies (find and check the listener,
the upgrade, the head of an answer, a refusal's reason, the STATUS message) is
vmbusify/control/exec_wire.py.

Light on purpose, as exec_wire is: ``vmbusifyexec`` imports this module at every start, and its
start is its latency (docs/exec.md, "A light client").
"""

from __future__ import annotations

from _socket import socket as raw_socket  # socket's own import costs ~3 ms (exec_wire.connect_as)

from vmbusify.control.exec_wire import (
    Failure,
    Listener,
    connect_as,
    exec_path,
    http_error,
    http_request,
    read_body,
    read_head,
)
from vmbusify.control.json_light import dumps

#: The largest exec request (JSON) the listener takes: its WebSocket message and POST body
#: limits (workers/exec/host.py, control/server.py), in round figures.
MAX_REQUEST = 1 << 20


def request_body(request: dict[str, object]) -> bytes:
    """The JSON request, or Failure when the listener would refuse it for its size."""
    body = dumps(request).encode()
    if len(body) > MAX_REQUEST:
        raise Failure(f"the exec request is too large ({len(body)} bytes of arguments and "
                      f"environment; the limit is {MAX_REQUEST >> 20} MiB)")
    return body


def post_detached(listener: Listener, vmid: str, body: bytes,
                  timeout: float | None = None) -> dict[str, object]:
    """A detached exec (``POST``): the listener's answer, ``{"vmid": ..., "pid": N}``."""
    sock = connect_as(raw_socket, listener, timeout)
    try:
        sock.sendall(http_request(listener, "POST", exec_path(vmid),
                                  "Content-Type: application/json\r\nConnection: close\r\n",
                                  body))
        status, headers, rest = read_head(sock)
        if status != 200:
            raise http_error(sock, status, headers, rest)
        doc = read_body(sock, headers, rest)
    finally:
        sock.close()
    if not isinstance(doc, dict) or not isinstance(doc.get("pid"), int):
        raise Failure("the command listener sent a malformed answer to a detached exec")
    return doc
