"""The command line that runs the guest's half of a copy (vmbusify/files/agent.py).

``python3 -I -S -c BOOTSTRAP REQUEST WIRE TREE AGENT``: the three modules travel as arguments
(each far below Linux's 128 KiB limit for one argument), ``-I`` keeps the guest's
``PYTHON*`` variables and user site out, ``-S`` the site module (the helper needs the
standard library alone; ~2 ms of its start, spent before each copy).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from vmbusify.files import agent, tree, wire

#: The guest's interpreter, found on the exec's PATH.
PYTHON = "python3"


@functools.cache
def _sources() -> tuple[str, str, str]:
    return tuple(_read(m.__file__ or "") for m in (wire, tree, agent))  # type: ignore[return-value]


def _read(path: str) -> str:
    """A module's source (open, not pathlib: pathlib costs ~2 ms of the client's start)."""
    with open(path, encoding="utf-8") as f:
        return f.read()


def agent_argv(request: dict[str, Any]) -> list[str]:
    """The exec's argv for one request (see agent.py for its fields)."""
    body = json.dumps({"v": wire.VERSION, **request})
    return [PYTHON, "-I", "-S", "-c", agent.BOOTSTRAP, body, *_sources()]
