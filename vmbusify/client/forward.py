"""Port forwarding through this endpoint's proxy client, as ``ssh -L`` does: the engine of
``vmbusifyctl forward`` and of ``Client.forward`` (docs/api.md, "Forward").

Every connection to the local listener is carried through the proxy (``[proxy] listen``) to
TARGET:TARGET_PORT as seen from the VM: on the host, ``localhost``/``127.0.0.1``/``::1``
mean the VM's own loopback (``VMID.vmbusify``) and any other TARGET is resolved inside the
VM (``TARGET.VMID.vmbusify``); on a guest the VM is ``host`` and TARGET is reached from the
host. On the host the listener follows the host proxy's rule (users/access.py): it serves
root, the user running it and members of group ``vmbusify``, and closes connections from
any other local user at once.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

from vmbusify.bus.frames import HOST_VMID
from vmbusify.config import Config, Role
from vmbusify.config_file import split_listen
from vmbusify.errors import ControlError, VMBusifyError
from vmbusify.protocol.proxy import ReplyCode
from vmbusify.protocol.socks import encode_addr
from vmbusify.users.access import LocalUsers
from vmbusify.users.peer import tcp_peer_uid

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

#: Where a forward reports what it refused or could not open: one line each.
Report = Callable[[str], None]
#: How a failure to open a connection through the proxy is put in words.
Explain = Callable[[BaseException], str]


def plain_reason(exc: BaseException) -> str:
    """The default explanation: the error's own text."""
    return str(exc) or "the proxy closed the connection"


def say_on_stderr(line: str) -> None:
    """The default report: ``vmbusifyctl forward: LINE`` on stderr."""
    print(f"vmbusifyctl forward: {line}", file=sys.stderr, flush=True)


def socks_target(config: Config, vmid: str, target: str) -> str:
    """The host name to ask this endpoint's proxy client for."""
    if config.role is Role.GUEST:
        if vmid != HOST_VMID:
            raise ControlError(f"forward: on a guest the only peer is {HOST_VMID!r}")
        return target
    if target.lower() in LOOPBACK_NAMES:
        return f"{vmid}.vmbusify"
    return f"{target}.{vmid}.vmbusify"


async def socks_open(config: Config, host: str, port: int
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection through the proxy to ``host:port`` (SOCKS5, with the configured
    credentials if any); ControlError with the proxy's reply if it refuses."""
    phost, pport = split_listen(config.proxy.listen)
    reader, writer = await asyncio.open_connection(phost, pport)
    cfg = config.proxy
    writer.write(b"\x05\x02\x00\x02" if cfg.username else b"\x05\x01\x00")
    method = await reader.readexactly(2)
    if cfg.username and method == b"\x05\x02":
        u, p = cfg.username.encode(), cfg.password.encode()
        writer.write(b"\x01" + bytes([len(u)]) + u + bytes([len(p)]) + p)
        if (await reader.readexactly(2))[1] != 0:
            raise ControlError("forward: the proxy refused the configured credentials")
    elif method != b"\x05\x00":
        raise ControlError("forward: the proxy wants credentials (set [proxy] username)")
    writer.write(b"\x05\x01\x00" + encode_addr(host, port))
    head = await reader.readexactly(4)
    if head[3] == 3:
        await reader.readexactly((await reader.readexactly(1))[0] + 2)
    else:
        await reader.readexactly({1: 4, 4: 16}.get(head[3], 0) + 2)
    if head[1] == ReplyCode.NOT_ALLOWED and config.role is Role.HOST:
        raise ControlError("forward: the host proxy refused: run as root or as a member of "
                           f"group {cfg.group or 'vmbusify'} (or set [proxy] username)")
    if head[1] != 0:
        code = ReplyCode(head[1]) if head[1] in ReplyCode._value2member_map_ else None
        raise ControlError(f"forward: {host}:{port}: reply {head[1]}"
                           + (f" ({code.text})" if code else ""))
    return reader, writer


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 18):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


@dataclass
class Gate:
    """Who may use a forward's listener (on the host: root, its own user, the group)."""

    users: LocalUsers | None
    report: Report = say_on_stderr
    #: When each refused uid was last reported (one line a minute per uid).
    said: dict[int | None, float] = field(default_factory=dict)

    @classmethod
    def for_config(cls, config: Config, report: Report = say_on_stderr) -> Gate:
        """The gate for this endpoint: none on a guest."""
        return cls(LocalUsers(config.proxy.group) if config.role is Role.HOST else None,
                   report)

    def admit(self, writer: asyncio.StreamWriter) -> bool:
        """Whether the user at the other end of this connection may use the forward."""
        if self.users is None:
            return True
        sock = writer.get_extra_info("socket")
        uid = tcp_peer_uid(sock) if sock is not None else None
        if self.users.privileged(uid):
            return True
        now = time.monotonic()
        if now - self.said.get(uid, -60.0) >= 60.0:
            self.said[uid] = now
            who = f"uid {uid}" if uid is not None else "an unknown (non-local?) user"
            self.report(f"refused a connection from {who}: not root, "
                        "this user or a member of group "
                        f"{self.users.group or '(none)'}")
        return False


async def serve_one(config: Config, host: str, port: int, c_reader: asyncio.StreamReader,
                    c_writer: asyncio.StreamWriter, gate: Gate | None = None,
                    report: Report = say_on_stderr, explain: Explain = plain_reason) -> None:
    """Carry one local connection to ``host:port`` through the proxy."""
    if gate is not None and not gate.admit(c_writer):
        c_writer.transport.abort()
        return
    try:
        p_reader, p_writer = await socks_open(config, host, port)
    except (VMBusifyError, OSError, asyncio.IncompleteReadError) as exc:
        report(explain(exc))
        c_writer.close()
        return
    try:
        await asyncio.gather(_pipe(c_reader, p_writer), _pipe(p_reader, c_writer))
    finally:  # also when the forward stops (cancelled): both ends are closed
        p_writer.close()
        c_writer.close()


async def start_forward(config: Config, vmid: str, target: str, target_port: int,
                        bind: str = "127.0.0.1", port: int = 0,
                        report: Report = say_on_stderr,
                        explain: Explain = plain_reason) -> asyncio.Server:
    """Listen on ``bind:port`` (0: any free port) and forward each connection; ControlError
    when the VM, the proxy address or the listening address is bad."""
    host = socks_target(config, vmid, target)
    split_listen(config.proxy.listen)  # a bad proxy address fails here, not per connection
    gate = Gate.for_config(config, report)
    try:
        return await asyncio.start_server(
            lambda r, w: serve_one(config, host, target_port, r, w, gate, report, explain),
            bind, port)
    except OSError as exc:
        raise ControlError(f"forward: cannot listen on {bind}:{port}: "
                           f"{exc.strerror or exc}") from None


class Forward:
    """A forward running on a thread of its own (``Client.forward``): ``port`` is the local
    port it listens on; ``close()`` (or leaving the ``with`` block) stops it and drops its
    connections."""

    def __init__(self, config: Config, vmid: str, target: str, target_port: int,
                 bind: str = "127.0.0.1", port: int = 0,
                 report: Report = say_on_stderr) -> None:
        self.vmid, self.target, self.target_port, self.bind = vmid, target, target_port, bind
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        started: list[asyncio.Server | VMBusifyError | OSError] = []
        ready = threading.Event()

        async def serve() -> None:
            try:
                server = await start_forward(config, vmid, target, target_port, bind, port,
                                             report)
            except (VMBusifyError, OSError) as exc:  # handed to the caller's thread
                started.append(exc)
                ready.set()
                return
            started.append(server)
            ready.set()
            async with server:
                await self._stop.wait()
            # The connections still open: cancelled, which closes both their ends.
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(serve(),),
                                        daemon=True, name=f"forward-{vmid}")
        self._thread.start()
        ready.wait()
        if not isinstance(started[0], asyncio.Server):
            self._thread.join()
            self._loop.close()
            raise started[0]
        sockets = started[0].sockets
        self.port: int = sockets[0].getsockname()[1] if sockets else port

    def close(self) -> None:
        """Stop listening and close every forwarded connection."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        if not self._loop.is_closed() and not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
