"""The long-running programs supervisord starts: `vmbusify mux`, `control`, `worker NAME`.

Each runs in the foreground, logs to stdout, exits 0 on SIGTERM and non-zero on a fault
(so supervisord's ``autorestart=unexpected`` restarts it only when it crashed).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import click

from vmbusify.config import Config, Role, load_config
from vmbusify.errors import VMBusifyError
from vmbusify.logs import setup_logging
from vmbusify.runtime import run_async, stop_on_signals

#: Worker programs: `vmbusify worker NAME` runs ``vmbusify.workers.NAME.main:run(config)``,
#: which fills in vmbusify.workers.base.Worker and runs it with run_worker.
WORKERS = ("exec", "proxy", "subnet")

config_option = click.option(
    "--config", "config_path", envvar="VMBUSIFY_CONFIG", default=None,
    help="Configuration file (default $VMBUSIFY_CONFIG or /etc/vmbusify/vmbusify.toml).")


def run_program(program: str, config_path: str | None,
                main: Callable[[Config], Coroutine[Any, Any, None]]) -> None:
    """Load the config, set up logging and run ``main`` until it returns or is stopped."""
    try:
        config = load_config(config_path)
    except VMBusifyError as exc:
        click.echo(f"vmbusify {program}: {exc}", err=True)
        sys.exit(2)
    setup_logging(program, config.log_level)
    try:
        run_async(main(config))
    except VMBusifyError as exc:
        click.echo(f"vmbusify {program}: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:  # e.g. a run_dir that cannot be made: one line, not a traceback
        where = f" {exc.filename}" if exc.filename else ""
        click.echo(f"vmbusify {program}:{where}: {exc.strerror or exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


@click.command()
@config_option
def mux(config_path: str | None) -> None:
    """Run the tunnel-mux (owns the hypervisor connections)."""
    # Imported here: each program's process loads its own code only (one CLI, many programs).
    from vmbusify.mux.main import run_mux
    run_program("mux", config_path, run_mux)


@click.command()
@config_option
def control(config_path: str | None) -> None:
    """Run the command listener (HTTP on the Unix socket of [control] listen)."""
    missing = listener_missing()
    if missing is not None:
        run_program("control", config_path, functools.partial(run_without_listener, missing))
        return
    # Imported here: each program's process loads its own code only (one CLI, many programs),
    # and a guest may have no aiohttp.
    from vmbusify.control.server import run_control
    run_program("control", config_path, run_control)


def listener_missing() -> str | None:
    """Why this machine cannot run the command listener, or None: it is aiohttp's (3.9 or
    later, for web.AppKey), a host extra that a guest installed from Debian's packages may
    lack (Debian 12 has no aiohttp that new)."""
    try:
        import aiohttp
        from aiohttp import web
    except ImportError:
        return "aiohttp is not installed"
    if not hasattr(web, "AppKey"):
        return f"aiohttp {getattr(aiohttp, '__version__', '?')} is older than 3.9"
    return None


async def run_without_listener(reason: str, config: Config) -> None:
    """Say once why there is no command listener, then wait for SIGTERM: exiting would have
    supervisord start the program again and again, each time with the same line."""
    level = logging.ERROR if config.role is Role.HOST else logging.WARNING
    logging.getLogger("vmbusify.control").log(
        level, "the command listener is off: %s (it needs aiohttp 3.9 or later: "
        "pip install 'vmbusify[host]', or a python3-aiohttp that new); vmbusifyctl and "
        "vmbusifyexec on this machine get no answer, the tunnel and the workers run without it",
        reason)
    await stop_on_signals().wait()


@click.command()
@click.argument("name")
@config_option
def worker(name: str, config_path: str | None) -> None:
    """Run one worker process (exec, proxy or subnet)."""
    import importlib
    if name not in WORKERS:
        raise click.UsageError(f"unknown worker {name!r} (known: {', '.join(WORKERS)})")
    try:
        module = importlib.import_module(f"vmbusify.workers.{name}.main")
    except ModuleNotFoundError:
        raise click.ClickException(f"the {name} worker is not installed") from None
    run_program(name, config_path, module.run)
