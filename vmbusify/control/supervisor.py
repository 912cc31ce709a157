"""Read program states from the supervisord that runs this endpoint (for status)."""

from __future__ import annotations

import os
import xmlrpc.client
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from vmbusify.config import Config


def supervisor_url(config: Config) -> str:
    """supervisord's own URL: given to its children in SUPERVISOR_SERVER_URL."""
    return os.environ.get("SUPERVISOR_SERVER_URL") or f"unix://{config.run_dir}/supervisor.sock"


def program_states(config: Config) -> list[dict[str, Any]]:
    """Each program's name, state and pid; one entry with an "error" if supervisord is away."""
    url = supervisor_url(config)
    transport = SupervisorTransport(None, None, url)
    proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
    try:
        infos: list[dict[str, Any]] = proxy.supervisor.getAllProcessInfo()  # type: ignore[assignment]
    except (OSError, xmlrpc.client.Error) as exc:
        return [{"error": f"supervisord at {url}: {exc}"}]
    finally:
        transport.close()
    return [{"name": i["name"], "group": i["group"], "state": i["statename"], "pid": i["pid"],
             "uptime": i["now"] - i["start"] if i["start"] else 0} for i in infos]
