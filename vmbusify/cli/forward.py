"""`vmbusifyctl forward VMID [BIND:]PORT:TARGET:TARGET_PORT`, as ``ssh -L`` and
``kubectl port-forward`` do, for programs that cannot speak SOCKS.

It listens on BIND:PORT (127.0.0.1 unless given) and carries every connection through this
endpoint's proxy client (``[proxy] listen``) to TARGET:TARGET_PORT as seen from VMID: on the
host, ``localhost``/``127.0.0.1``/``::1`` mean the VM's own loopback (``VMID.vmbusify``) and
any other TARGET is resolved inside the VM (``TARGET.VMID.vmbusify``); on a guest VMID is
``host`` and TARGET is reached from the host. Runs in the foreground until Ctrl-C.

On the host the listener follows the host proxy's rule (users/access.py): it serves root,
the user running it and members of group ``vmbusify``, and closes connections from any
other local user at once (a forward run by root would otherwise lend root's view into the
VM to everyone on the machine). The user is the owner of the client's socket.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click

from vmbusify.bus.frames import HOST_VMID
from vmbusify.cli.completion import complete_vmids
from vmbusify.cli.locate import supervisorctl_hint
from vmbusify.config import Config, Role
from vmbusify.config_file import split_listen
from vmbusify.errors import ControlError, UnknownVMError, VMBusifyError
from vmbusify.protocol.proxy import ReplyCode
from vmbusify.protocol.socks import encode_addr
from vmbusify.runtime import stop_on_signals
from vmbusify.users.access import LocalUsers
from vmbusify.users.peer import tcp_peer_uid

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ForwardSpec:
    """A parsed ``[BIND:]PORT:TARGET:TARGET_PORT``."""

    bind: str
    port: int
    target: str
    target_port: int


def _fields(text: str) -> list[str]:
    """Split on ':' outside brackets (``[::1]:80`` style IPv6)."""
    out, cur, depth = [], "", 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == ":" and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [f[1:-1] if f.startswith("[") and f.endswith("]") else f for f in out]


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise ControlError(f"forward: {what} {text!r} is not a port (1-65535)")
    return int(text)


def parse_spec(text: str) -> ForwardSpec:
    """Parse the forwarding spec; ControlError with a one-line reason if malformed."""
    parts = _fields(text)
    if len(parts) == 3:
        parts.insert(0, "127.0.0.1")
    if len(parts) != 4 or not parts[0] or not parts[2] or len(parts[2]) > 200:
        raise ControlError(f"forward: expected [BIND:]PORT:TARGET:TARGET_PORT, not {text!r}")
    return ForwardSpec(parts[0], _port(parts[1], "PORT"), parts[2],
                       _port(parts[3], "TARGET_PORT"))


def socks_target(config: Config, vmid: str, target: str) -> str:
    """The host name to ask this endpoint's proxy client for."""
    if config.role is Role.GUEST:
        if vmid != HOST_VMID:
            raise ControlError(f"forward: on a guest the only peer is {HOST_VMID!r}")
        return target
    if target.lower() in LOOPBACK_NAMES:
        return f"{vmid}.vmbusify"
    return f"{target}.{vmid}.vmbusify"


async def _socks_open(config: Config, host: str, port: int
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
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
    #: When each refused uid was last reported (one line a minute per uid).
    said: dict[int | None, float] = field(default_factory=dict)

    @classmethod
    def for_config(cls, config: Config) -> Gate:
        return cls(LocalUsers(config.proxy.group) if config.role is Role.HOST else None)

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
            click.echo(f"vmbusifyctl forward: refused a connection from {who}: not root, "
                       "this user or a member of group "
                       f"{self.users.group or '(none)'}", err=True)
        return False


async def _serve_one(config: Config, host: str, port: int, c_reader: asyncio.StreamReader,
                     c_writer: asyncio.StreamWriter, gate: Gate | None = None) -> None:
    if gate is not None and not gate.admit(c_writer):
        c_writer.transport.abort()
        return
    try:
        p_reader, p_writer = await _socks_open(config, host, port)
    except (VMBusifyError, OSError, asyncio.IncompleteReadError) as exc:
        click.echo(f"vmbusifyctl forward: {in_words(exc, config)}", err=True)
        c_writer.close()
        return
    await asyncio.gather(_pipe(c_reader, p_writer), _pipe(p_reader, c_writer))
    p_writer.close()
    c_writer.close()


async def run_forward(config: Config, vmid: str, spec: ForwardSpec) -> None:
    """Listen and forward until SIGINT/SIGTERM."""
    host = socks_target(config, vmid, spec.target)
    gate = Gate.for_config(config)
    try:
        server = await asyncio.start_server(
            lambda r, w: _serve_one(config, host, spec.target_port, r, w, gate), spec.bind,
            spec.port)
    except OSError as exc:
        raise ControlError(f"forward: cannot listen on {spec.bind}:{spec.port}: "
                           f"{exc.strerror or exc}") from None
    stop = stop_on_signals()
    click.echo(f"forwarding {spec.bind}:{spec.port} -> {spec.target}:{spec.target_port} "
               f"in {vmid} (Ctrl-C to stop)", err=True)
    async with server:
        await stop.wait()


def in_words(exc: BaseException, config: Config) -> str:
    """A failure to reach TARGET through the proxy, in words (no raw errno)."""
    where = config.proxy.listen
    if isinstance(exc, ConnectionRefusedError):
        return (f"the proxy at {where} is not running (connection refused): see "
                f"{supervisorctl_hint(config.run_dir, 'status', 'proxy')}")
    if isinstance(exc, asyncio.IncompleteReadError | ConnectionResetError | BrokenPipeError):
        return f"the proxy at {where} closed the connection"
    if isinstance(exc, TimeoutError):
        return f"the proxy at {where} did not answer in time"
    if isinstance(exc, OSError):
        return f"cannot reach the proxy at {where}: {exc.strerror or 'error ' + str(exc.errno)}"
    return str(exc)


def preflight(config: Config, vmid: str, known_vms: Callable[[], list[dict[str, Any]]]
              ) -> None:
    """Before listening: VMID is a VM this host knows (``known_vms``: the listener's
    ``/v1/vms``) and the proxy answers at ``[proxy] listen``; ControlError in words if not."""
    if config.role is Role.HOST:
        vms = known_vms()
        ids = [str(vm.get("vmid")) for vm in vms]
        if vmid not in ids and not any(vmid in vm.get("ips", ()) for vm in vms):
            raise UnknownVMError(f"forward: unknown VM {vmid!r} (this host knows "
                                 f"{', '.join(ids) or 'no VM'})")
    host, port = split_listen(config.proxy.listen)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise ControlError(f"forward: {in_words(exc, config)}") from None


@click.command()
@click.argument("vmid", shell_complete=complete_vmids)
@click.argument("spec", metavar="[BIND:]PORT:TARGET:TARGET_PORT")
@click.pass_context
def forward(ctx: click.Context, vmid: str, spec: str) -> None:
    """Forward a local port to TARGET:TARGET_PORT as seen from VMID (like ssh -L)."""
    config: Config = ctx.obj["config"]
    parsed = parse_spec(spec)
    socks_target(config, vmid, parsed.target)  # refuse a bad VMID before listening
    # and a VM the host does not know, or a proxy that is not there
    preflight(config, vmid, lambda: ctx.obj["client"].request("GET", "/v1/vms"))
    asyncio.run(run_forward(config, vmid, parsed))
    sys.exit(0)
