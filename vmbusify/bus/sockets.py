"""ZeroMQ socket set-up: endpoints inside a root-only directory, no silent drops, no linger."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import zmq
import zmq.asyncio


def shared_context() -> zmq.asyncio.Context:
    """The process's one ZeroMQ context (linger 0), for worker links.

    One context per process, never terminated while the process lives: a context terminated
    by the garbage collector while a forgotten socket is still open blocks for ever
    (zmq_ctx_term waits for every socket), which a per-link context invites.
    """
    ctx = zmq.asyncio.Context.instance()
    ctx.linger = 0
    return ctx


#: Received frames at least this large are used in place (a view of the ZeroMQ message);
#: smaller ones are copied out, which is cheaper than keeping a message alive for them.
RECV_IN_PLACE = 64 << 10


def frame_payloads(frames: list[zmq.Frame]) -> list[bytes | memoryview]:
    """The contents of frames received with ``copy=False``: big ones as views, small as bytes.

    Sends, by contrast, always copy: a zero-copy send has pyzmq's garbage-collector thread
    take the GIL for every message to learn when libzmq let go of it, which cost more than
    the copy (measured with bench/tunnel.py).
    """
    return [f.buffer if len(f) >= RECV_IN_PLACE else f.bytes for f in frames]


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) if needed and make it 0700, so only root reaches inside."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(p, 0o700)
    return p


def bind_router(ctx: zmq.asyncio.Context, endpoint: str) -> zmq.asyncio.Socket:
    """The mux's ROUTER: raises on unroutable peers (ROUTER_MANDATORY) instead of dropping.

    High-water marks are off: every byte that can queue here is bounded by a stream's
    flow-control window, and a full queue must never drop a package silently.
    """
    if endpoint.startswith("ipc://"):
        ensure_private_dir(Path(endpoint[len("ipc://"):]).parent)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    old = os.umask(0o177)
    try:
        sock.bind(endpoint)
    finally:
        os.umask(old)
    return sock


def connect_dealer(ctx: zmq.asyncio.Context, endpoint: str, name: str) -> zmq.asyncio.Socket:
    """A worker's DEALER with a unique identity (name + random suffix, as circus does)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.IDENTITY, f"{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}".encode())
    sock.connect(endpoint)
    return sock
