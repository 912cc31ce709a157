"""The command listener (docs/exec.md): HTTP for vmbusifyctl and vmbusifyexec on a Unix socket
in a directory of its own (``[control] listen``, default
``unix:/run/vmbusify-control/control.sock``; control/sockdir.py), or for development on TCP.

Every request needs ``Authorization: Bearer <token>``, the token being the file made at
first start beside the socket (Config.token_path): root's, readable by group ``vmbusify``
when that group exists (0640), else by root only (0600). Clients check that the listener is
root's before they send it (control/verify.py). Built-in commands are in control/builtin.py;
the host half of exec (workers/exec/host.py) adds its routes and runs on the listener's link.
Errors are JSON ``{"error": "...", "code": N}`` (N: the ErrorCode, vmbusify/errors.py) with
the HTTP status errors.OUTCOMES gives that code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from vmbusify.bus.link import WorkerLink
from vmbusify.config import Config
from vmbusify.config_file import parse_control_listen
from vmbusify.control import builtin, metrics
from vmbusify.control.context import CTX_KEY, ControlContext
from vmbusify.control.sockdir import group_id, prepare_dir, secure_socket
from vmbusify.control.token import ensure_token, token_matches
from vmbusify.errors import ControlError, VMBusifyError, http_status
from vmbusify.logs import printable
from vmbusify.protocol.entities import Entity
from vmbusify.runtime import stop_on_signals
from vmbusify.system import ensure_private_dir
from vmbusify.users.peer import unix_peer_uid
from vmbusify.workers.base import Worker
from vmbusify.workers.exec import host as exec_host

log = logging.getLogger("vmbusify.control")


def error_response(status: int, message: str, code: int | None = None) -> web.Response:
    """A JSON error body, as every failing request gets (with the ErrorCode, if any)."""
    body: dict[str, Any] = {"error": message}
    if code is not None:
        body["code"] = int(code)
    return web.json_response(body, status=status)


def status_for(exc: VMBusifyError) -> int:
    """The HTTP status that fits an error: by its code, from the one table (errors.OUTCOMES)."""
    return http_status(exc.code)


@web.middleware
async def auth_and_errors(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
    """Refuse requests without the token (401); turn errors into JSON, never a traceback."""
    ctx = request.app[CTX_KEY]
    auth = request.headers.get("Authorization", "")
    scheme, _, presented = auth.partition(" ")
    if scheme.lower() != "bearer" or not token_matches(presented.strip(), ctx.token):
        log.warning("refused %s %s from %s: missing or wrong token", request.method,
                    printable(request.path), _origin(request))
        resp = error_response(401, "missing or wrong bearer token")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="vmbusify"'
        return resp
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            resp = error_response(exc.status, exc.reason)
            if "Allow" in exc.headers:  # a 405 must say which methods are (RFC 9110)
                resp.headers["Allow"] = exc.headers["Allow"]
            return resp
        raise
    except VMBusifyError as exc:
        return error_response(status_for(exc), str(exc), exc.code)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal error in the command listener (see its log)")


def _origin(request: web.Request) -> str:
    """Who sent a request: the peer's uid on a Unix socket, its address on TCP."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            return f"uid {unix_peer_uid(sock)}"
        except OSError:
            return "a local process"
    return str(request.remote)


class OneLineBadRequests(logging.Filter):
    """aiohttp logs every malformed request (bad request line, header, length...) as an
    ERROR with a traceback; a client's garbage is worth one warning line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            origin = record.getMessage().rsplit(" ", 1)[-1]
            reason = " ".join(str(exc.message or exc).split())[:200]
            record.msg, record.args = "refused a malformed HTTP request from %s: %s", (
                origin, reason)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


def build_app(ctx: ControlContext) -> tuple[web.Application, list[Worker]]:
    """The aiohttp application with every route set up, and the workers that run on the
    listener's link (to be started before it)."""
    app = web.Application(middlewares=[auth_and_errors], client_max_size=1 << 20)
    app[CTX_KEY] = ctx
    builtin.setup(app, ctx)
    return app, [exec_host.setup(app, ctx.config, ctx.link)]


def _prepare(config: Config) -> tuple[str, str, int, int | None]:
    """Parse the listen address and, for a Unix socket, make its directory; the token's
    group (None: root only)."""
    kind, where, port = parse_control_listen(config.control.listen)
    gid = group_id(config.control.group)
    if kind == "unix":
        gid = prepare_dir(os.path.dirname(where), gid)
    else:
        gid = None  # the state directory is root's alone: a group could not reach the token
        ensure_private_dir(config.token_path.parent)
        log.warning("the command listener is on TCP %s:%d: for development only (any local "
                    "user may bind it while it is down; clients check its owner)", where, port)
    return kind, where, port, gid


async def run_control(config: Config, stop: asyncio.Event | None = None) -> None:
    """Run the command listener until SIGTERM."""
    stop = stop_on_signals(stop)
    kind, where, port, gid = _prepare(config)
    token = ensure_token(config.token_path, gid)
    link = WorkerLink(config, "control", [Entity.CMD_LISTENER])
    ctx = ControlContext(config, link, token)
    app, parts = build_app(ctx)
    logging.getLogger("aiohttp.server").addFilter(OneLineBadRequests())
    for part in parts:
        await part.start()  # their routes go into the link's first registration
    await link.start()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site: web.BaseSite
    if kind == "unix":
        site = web.UnixSite(runner, where, backlog=1024)  # bursts of clients
    else:
        site = web.TCPSite(runner, where, port, reuse_address=True, backlog=1024)
    try:
        await site.start()
        if kind == "unix":
            secure_socket(where, gid)
    except OSError as exc:
        await runner.cleanup()
        await link.close()
        raise ControlError(f"cannot listen on {config.control.listen}: "
                           f"{exc.strerror or exc}") from None
    try:
        metrics_runner = await metrics.start(ctx, app[exec_host.EXEC_KEY])
    except VMBusifyError as exc:  # the listener matters more: it goes on without /metrics
        log.error("%s: no /metrics until the listener restarts", exc)
        metrics_runner = None
    log.info("command listener on %s (token in %s, %s)", config.control.listen,
             config.token_path, f"group {config.control.group}" if gid is not None
             else "root only")
    try:
        await stop.wait()
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
        await link.close()
        if kind == "unix":
            try:
                os.unlink(where)
            except OSError:
                pass
