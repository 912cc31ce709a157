"""Built-in commands of the command listener: status, list, connect, disconnect, vmid, ping,
reload."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from aiohttp import web

from vmbusify.control.context import CTX_KEY, ControlContext
from vmbusify.control.supervisor import program_states
from vmbusify.errors import ControlError


async def _mux(request: web.Request, cmd: str, **args: Any) -> Any:
    ctx = request.app[CTX_KEY]
    timeout = float(args.get("timeout", 10.0)) + 2.0
    return await ctx.link.control({"cmd": cmd, **args}, timeout=timeout)


async def status(request: web.Request) -> web.Response:
    """GET /v1/status: the mux's status, every program's state and the listener's own."""
    ctx = request.app[CTX_KEY]
    result = await _mux(request, "status")
    loop = asyncio.get_running_loop()
    result["programs"] = await loop.run_in_executor(None, program_states, ctx.config)
    result["listener"] = {"listen": ctx.config.control.listen, **ctx.extra.get("status", {})}
    return web.json_response(result)


async def vms(request: web.Request) -> web.Response:
    """GET /v1/vms: the VMs the mux knows and their state."""
    return web.json_response(await _mux(request, "list"))


#: The longest ``?timeout=`` a command takes (seconds).
MAX_TIMEOUT = 300.0


def query_timeout(request: web.Request, default: float) -> float:
    """``?timeout=S`` of ``request`` (``default`` if absent); ControlError (400) unless a
    number of seconds in (0, MAX_TIMEOUT]."""
    raw = request.query.get("timeout")
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_TIMEOUT:  # also refuses nan and inf
        raise ControlError(f"timeout must be a number of seconds in (0, {MAX_TIMEOUT:g}], "
                           f"not {raw[:40]!r}")
    return value


async def connect(request: web.Request) -> web.Response:
    """POST /v1/vms/{vmid}/connect: connect to the VM now (``?timeout=S``, default 10)."""
    timeout = query_timeout(request, 10.0)
    return web.json_response(
        await _mux(request, "connect", vmid=request.match_info["vmid"], timeout=timeout))


async def disconnect(request: web.Request) -> web.Response:
    """POST /v1/vms/{vmid}/disconnect: close the VM's tunnel."""
    return web.json_response(await _mux(request, "disconnect", vmid=request.match_info["vmid"]))


async def ping(request: web.Request) -> web.Response:
    """POST /v1/vms/{vmid}/ping: the round trip through the VM's tunnel (``?timeout=S``,
    default 5)."""
    timeout = query_timeout(request, 5.0)
    return web.json_response(
        await _mux(request, "ping", vmid=request.match_info["vmid"], timeout=timeout))


async def vmid(request: web.Request) -> web.Response:
    """GET /v1/vmid/{ip}: the vmid holding an IP address (docs/proxy.md, "Who holds an address")."""
    return web.json_response({"vmid": await _mux(request, "vmid", ip=request.match_info["ip"])})


async def reload(request: web.Request) -> web.Response:
    """POST /v1/reload: the mux reads its configuration file again and adds or drops VMs
    (docs/discovery.md, "Reload"); sessions of VMs that stay go on."""
    return web.json_response(await _mux(request, "reload", timeout=60.0))


def setup(app: web.Application, ctx: ControlContext) -> None:
    """Add the built-in routes."""
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/vms", vms)
    app.router.add_post("/v1/vms/{vmid}/connect", connect)
    app.router.add_post("/v1/vms/{vmid}/disconnect", disconnect)
    app.router.add_post("/v1/vms/{vmid}/ping", ping)
    app.router.add_get("/v1/vmid/{ip}", vmid)
    app.router.add_post("/v1/reload", reload)
