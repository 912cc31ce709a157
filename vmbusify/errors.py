"""The one error hierarchy of VMBusify.

Every error a user can meet derives from VMBusifyError and carries a message fit to print
on one line. Protocol errors say whose fault it was: LocalProtocolError (we misused the
codec) or RemoteProtocolError (the peer sent something invalid), as h11 does.
"""

from __future__ import annotations


class VMBusifyError(Exception):
    """Base of every VMBusify error; ``str(err)`` is a one-line reason for the user."""


class ConfigError(VMBusifyError):
    """The configuration file is missing, unreadable or invalid."""


class ProtocolError(VMBusifyError):
    """A vmbus package or application message broke the protocol."""


class LocalProtocolError(ProtocolError):
    """This endpoint tried to encode something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid vmbus package or message."""


class TransportError(VMBusifyError):
    """A hypervisor socket could not be opened, or an address could not be parsed."""


class AddressError(TransportError):
    """A transport address string is malformed."""


class TunnelError(VMBusifyError):
    """The tunnel to a VM is not there, or went away."""


class UnknownVMError(TunnelError):
    """No VM with that id (or address) is known to the host."""


class NotConnectedError(TunnelError):
    """The VM is known but its tunnel is down and could not be brought up."""


class RequestTimeout(TunnelError):
    """A sync_send got no acknowledgement in time."""


class FlowControlError(ProtocolError):
    """A peer sent more stream data than the window it was granted."""


class ControlError(VMBusifyError):
    """The command listener refused or failed a request."""


class SubnetError(VMBusifyError):
    """The virtual subnet could not set up (or tear down) its interface, routes or NAT."""


class LabError(VMBusifyError):
    """The lab could not be brought up or down."""


class LimitReached(VMBusifyError):
    """A cap of ``[limits]`` was reached (streams, buffered bytes, requests); the text says
    which, and goes to the peer so its user sees why."""


class CoreLoopEnded(VMBusifyError):
    """A core loop of a worker (its accept or attach loop) raised or returned: the worker
    stops and its program exits non-zero, so that it is restarted (workers/base.py)."""
