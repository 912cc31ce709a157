"""A hostile guest for tests: it speaks the wire protocol by hand (not the project's classes)
and floods its host's mux with tiny packages while reading and discarding the answers.

    python -m tests.integration.flood_guest SOCKET GO_FILE

It listens on the Unix socket SOCKET for the host mux, answers its HELLO, and once GO_FILE
exists sends, as fast as the socket takes them, PINGs (each costs the host a PONG) and
one-way messages nobody routes (each costs a drop). It serves one host connection after
another until killed.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time

SIG, VERSION = 0x564D4255, 1
MESSAGE = 1
HELLO, PING = 1, 2
PROXY_CLIENT = 3


def package(ptype: int, entity: int, message_id: int, payload: bytes, pid: int = 0) -> bytes:
    """One vmbus package: the 24-byte header (docs/protocol.md) and the payload."""
    return struct.pack(">IBBHHIHII", SIG, VERSION, ptype, 0, entity, pid, message_id, 0,
                       len(payload)) + payload


def msgpack_map(items: dict[str, object]) -> bytes:
    """A tiny msgpack encoder: a map of short strings, small ints and lists of strings."""
    out = bytearray([0x80 | len(items)])
    for key, value in items.items():
        out += _str(key)
        if isinstance(value, int):
            out += b"\xce" + value.to_bytes(4, "big")
        elif isinstance(value, list):
            out += bytes([0x90 | len(value)]) + b"".join(_str(str(v)) for v in value)
        else:
            out += _str(str(value))
    return bytes(out)


def _str(s: str) -> bytes:
    data = s.encode()
    return bytes([0xA0 | len(data)]) + data


def flood_burst() -> bytes:
    """About 64 KiB of PINGs and unrouted one-way messages, alternating."""
    parts = []
    for n in range(1, 1000):
        parts.append(package(MESSAGE, 0, PING, msgpack_map({"nonce": n})))
        parts.append(package(MESSAGE, PROXY_CLIENT, 999, b"\xc0"))
    return b"".join(parts)


def serve(conn: socket.socket, go_file: str) -> None:
    # the host speaks first: read its HELLO (header + payload), then answer ours
    header = _read_exactly(conn, 24)
    _read_exactly(conn, struct.unpack(">I", header[20:24])[0])
    hello = msgpack_map({"role": "guest", "hostname": "flooder", "software_version": "0",
                         "protocol_version": 1, "ips": []})
    conn.sendall(package(MESSAGE, 0, HELLO, hello))
    stop = threading.Event()

    def drain() -> None:
        try:
            while conn.recv(1 << 16):
                pass
        except OSError:
            pass
        stop.set()

    threading.Thread(target=drain, daemon=True).start()
    while not os.path.exists(go_file) and not stop.is_set():
        time.sleep(0.02)
    burst = flood_burst()
    try:
        while not stop.is_set():
            conn.sendall(burst)
    except OSError:
        pass
    conn.close()


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


def main() -> None:
    path, go_file = sys.argv[1], sys.argv[2]
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    while True:
        conn, _ = srv.accept()
        try:
            serve(conn, go_file)
        except OSError:
            conn.close()


if __name__ == "__main__":
    main()
