"""What the command listener's route handlers share, and the key they find it under."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from vmbusify.bus.link import WorkerLink
from vmbusify.config import Config


@dataclass
class ControlContext:
    """What route handlers share."""

    config: Config
    link: WorkerLink
    token: str
    extra: dict[str, Any] = field(default_factory=dict)


CTX_KEY = web.AppKey("ctx", ControlContext)
