"""`vmbusifyctl forward VMID [BIND:]PORT:TARGET:TARGET_PORT`, as ``ssh -L`` and
``kubectl port-forward`` do, for programs that cannot speak SOCKS.

It listens on BIND:PORT (127.0.0.1 unless given) and carries every connection through this
endpoint's proxy client to TARGET:TARGET_PORT as seen from VMID, with the engine of the
Python API (vmbusify/client/forward.py says what TARGET means and who may connect). Runs in
the foreground until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from vmbusify.cli.completion import complete_vmids
from vmbusify.cli.locate import supervisorctl_hint
from vmbusify.client.forward import socks_target, start_forward
from vmbusify.config import Config, Role
from vmbusify.config_file import split_listen
from vmbusify.errors import ControlError, UnknownVMError
from vmbusify.runtime import stop_on_signals


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


async def run_forward(config: Config, vmid: str, spec: ForwardSpec) -> None:
    """Listen and forward until SIGINT/SIGTERM."""
    server = await start_forward(config, vmid, spec.target, spec.target_port, spec.bind,
                                 spec.port, explain=lambda exc: in_words(exc, config))
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
