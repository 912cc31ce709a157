"""The Python API of VMBusify (docs/api.md)::

    from vmbusify.client import Client

    vm = Client().run("vm1", ["uname", "-r"], check=True)

Its names are loaded on first use (PEP 562): ``vmbusifyexec`` imports the light
``vmbusify.client.wire`` and ``vmbusify.control.exec_wire`` at every start and must not pay for
the rest of the API (docs/exec.md, "A light client").
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vmbusify.client.api import Client
    from vmbusify.client.execution import (
        ExecFailed,
        ExecProcess,
        ExecRequest,
        ExecResult,
        Stream,
    )
    from vmbusify.client.forward import Forward
    from vmbusify.client.status import Status, VMStatus
    from vmbusify.control.exec_wire import Failure
    from vmbusify.files import CopyResult
    from vmbusify.protocol.exec_api import ExitReason

#: Public name -> the module that defines it.
_WHERE = {
    "Client": "vmbusify.client.api",
    "ExecFailed": "vmbusify.client.execution",
    "ExecProcess": "vmbusify.client.execution",
    "ExecRequest": "vmbusify.client.execution",
    "ExecResult": "vmbusify.client.execution",
    "Stream": "vmbusify.client.execution",
    "Forward": "vmbusify.client.forward",
    "Status": "vmbusify.client.status",
    "VMStatus": "vmbusify.client.status",
    "Failure": "vmbusify.control.exec_wire",
    "ExitReason": "vmbusify.protocol.exec_api",
    "CopyResult": "vmbusify.files",
}
__all__ = ["Client", "CopyResult", "ExecFailed", "ExecProcess", "ExecRequest", "ExecResult",
           "ExitReason", "Failure", "Forward", "Status", "Stream", "VMStatus"]


def __getattr__(name: str) -> object:
    """Load a public name's module when the name is first used."""
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'vmbusify.client' has no attribute {name!r}")
    from importlib import import_module  # here: see the module's docstring

    return getattr(import_module(where), name)
