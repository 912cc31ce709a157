"""The command listener (spec 4.2.2): HTTP on 127.0.0.1:6543 for vmbusifyctl and vmbusifyexec.

Every request needs ``Authorization: Bearer <token>``, the token being the root-only file
made at first start (Config.token_path). Built-in commands are in control/builtin.py;
application commands (exec, forward, ...) add their routes through ``ROUTE_MODULES``.
Errors are JSON ``{"error": "..."}`` with a status that says whose fault it was.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from vmbusify.bus.link import WorkerLink
from vmbusify.config import Config
from vmbusify.config_file import split_listen
from vmbusify.control.token import ensure_token, token_matches
from vmbusify.errors import (
    ControlError,
    NotConnectedError,
    RequestTimeout,
    TunnelError,
    UnknownVMError,
    VMBusifyError,
)
from vmbusify.protocol.entities import Entity
from vmbusify.runtime import stop_on_signals

log = logging.getLogger("vmbusify.control")

#: Modules with a ``setup(app: web.Application, ctx: ControlContext) -> None`` adding routes.
ROUTE_MODULES = ["vmbusify.control.builtin", "vmbusify.control.exec"]


@dataclass
class ControlContext:
    """What route handlers share."""

    config: Config
    link: WorkerLink
    token: str
    extra: dict[str, Any] = field(default_factory=dict)


CTX_KEY = web.AppKey("ctx", ControlContext)


def error_response(status: int, message: str) -> web.Response:
    """A JSON error body, as every failing request gets."""
    return web.json_response({"error": message}, status=status)


def status_for(exc: VMBusifyError) -> int:
    """The HTTP status that fits an error."""
    if isinstance(exc, UnknownVMError):
        return 404
    if isinstance(exc, RequestTimeout):
        return 504
    if isinstance(exc, (NotConnectedError, TunnelError)):
        return 503
    if isinstance(exc, ControlError):
        return 400
    return 500


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
                    request.path, request.remote)
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
        return error_response(status_for(exc), str(exc))
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal error in the command listener (see its log)")


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


def build_app(ctx: ControlContext) -> web.Application:
    """The aiohttp application with every route module set up."""
    app = web.Application(middlewares=[auth_and_errors], client_max_size=1 << 20)
    app[CTX_KEY] = ctx
    for name in ROUTE_MODULES:
        importlib.import_module(name).setup(app, ctx)
    return app


async def run_control(config: Config, stop: asyncio.Event | None = None) -> None:
    """Run the command listener until SIGTERM."""
    stop = stop_on_signals(stop)
    token = ensure_token(config.token_path)
    link = WorkerLink(config, "control", [Entity.CMD_LISTENER])
    ctx = ControlContext(config, link, token)
    app = build_app(ctx)
    logging.getLogger("aiohttp.server").addFilter(OneLineBadRequests())
    await link.start()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = split_listen(config.control.listen)
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await link.close()
        raise ControlError(f"cannot listen on {config.control.listen}: {exc.strerror}") from None
    log.info("command listener on http://%s:%d (token in %s)", host, port, config.token_path)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await link.close()
