"""The one error hierarchy of VMBusify, and the numeric code each error has across processes.

Every error a user can meet derives from VMBusifyError and carries a message fit to print
on one line. Protocol errors say whose fault it was: LocalProtocolError (we misused the
codec) or RemoteProtocolError (the peer sent something invalid), as h11 does.

An error that crosses a process (an ERROR ACK over the bus and the tunnel, a CTL reply of
the mux, the command listener's JSON) travels as its ``ErrorCode`` and its text: never as a
class name or a text prefix to parse back. ``error_from(code, reason)`` makes the error again
(an unknown code gives the base class, VMBusifyError), and ``OUTCOMES`` is the one table
that turns a code into what a user sees: the listener's HTTP status and the exit status of
vmbusifyctl and vmbusifyexec.

Light on purpose: vmbusifyexec imports this module at every start (enum only).
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """The number an error travels as (in ERROR ACKs, CTL replies, the listener's JSON).

    Codes are never reused; a receiver that does not know one takes it as GENERIC.
    """

    #: VMBusifyError itself, or an error whose code the receiver does not know, or a plain
    #: text reason from a peer of 0.1.0 (it sends no code).
    GENERIC = 1
    CONFIG = 2
    PROTOCOL = 3
    LOCAL_PROTOCOL = 4
    REMOTE_PROTOCOL = 5
    FLOW_CONTROL = 6
    TRANSPORT = 7
    ADDRESS = 8
    TUNNEL = 9
    UNKNOWN_VM = 10
    NOT_CONNECTED = 11
    TIMEOUT = 12
    #: No worker on the far side handles the request.
    NO_HANDLER = 13
    CONTROL = 14
    SUBNET = 15
    LAB = 16
    LIMIT = 17
    #: A message could not be handed to ZeroMQ (the process at the other end is gone).
    BUS = 18
    #: A worker's core loop (accept or attach loop) ended; the worker exits to be restarted.
    CORE_LOOP_ENDED = 19
    #: A file copy (vmbusifyctl cp, vmbusify.files) failed: no such file, permission denied,
    #: disk full, target is (not) a directory, an unsafe stream from the guest...
    FILES = 20


class VMBusifyError(Exception):
    """Base of every VMBusify error; ``str(err)`` is a one-line reason for the user.

    ``code`` is the class's ErrorCode; an error made from a peer's reply may carry the peer's
    code instead (set on the instance), so what the user sees follows what happened there.
    """

    code: ErrorCode = ErrorCode.GENERIC


class ConfigError(VMBusifyError):
    """The configuration file is missing, unreadable or invalid."""

    code = ErrorCode.CONFIG


class ProtocolError(VMBusifyError):
    """A vmbus package or application message broke the protocol."""

    code = ErrorCode.PROTOCOL


class LocalProtocolError(ProtocolError):
    """This endpoint tried to encode something the protocol does not allow."""

    code = ErrorCode.LOCAL_PROTOCOL


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid vmbus package or message."""

    code = ErrorCode.REMOTE_PROTOCOL


class TransportError(VMBusifyError):
    """A hypervisor socket could not be opened, or an address could not be parsed."""

    code = ErrorCode.TRANSPORT


class AddressError(TransportError):
    """A transport address string is malformed."""

    code = ErrorCode.ADDRESS


class TunnelError(VMBusifyError):
    """The tunnel to a VM is not there, or went away; also: a request failed on the far
    side (its ``code`` then says why)."""

    code = ErrorCode.TUNNEL


class UnknownVMError(TunnelError):
    """No VM with that id (or address) is known to the host."""

    code = ErrorCode.UNKNOWN_VM


class NotConnectedError(TunnelError):
    """The VM is known but its tunnel is down and could not be brought up."""

    code = ErrorCode.NOT_CONNECTED


class RequestTimeout(TunnelError):
    """A sync_send got no acknowledgement in time."""

    code = ErrorCode.TIMEOUT


class NoHandlerError(TunnelError):
    """Nothing on the far side handles the request (no worker registered it)."""

    code = ErrorCode.NO_HANDLER


class BusError(TunnelError):
    """A bus message could not be handed to ZeroMQ: the worker (or mux) it was for is gone."""

    code = ErrorCode.BUS


class FlowControlError(ProtocolError):
    """A peer sent more stream data than the window it was granted."""

    code = ErrorCode.FLOW_CONTROL


class ControlError(VMBusifyError):
    """The command listener refused or failed a request."""

    code = ErrorCode.CONTROL


class SubnetError(VMBusifyError):
    """The virtual subnet could not set up (or tear down) its interface, routes or NAT."""

    code = ErrorCode.SUBNET


class LabError(VMBusifyError):
    """The lab could not be brought up or down."""

    code = ErrorCode.LAB


class LimitReached(VMBusifyError):
    """A cap of ``[limits]`` was reached (streams, buffered bytes, requests); the text says
    which, and goes to the peer so its user sees why."""

    code = ErrorCode.LIMIT


class CoreLoopEnded(VMBusifyError):
    """A core loop of a worker (its accept or attach loop) raised or returned: the worker
    stops and its program exits non-zero, so that it is restarted (workers/base.py)."""

    code = ErrorCode.CORE_LOOP_ENDED


class FileCopyError(VMBusifyError):
    """A copy into or out of a VM failed; ``kind`` says why in a word (vmbusify/files/tree.py
    KINDS: "not-found", "permission", "no-space", "is-dir", "not-dir", "unsafe", ...)."""

    code = ErrorCode.FILES

    def __init__(self, message: str, kind: str = "io", path: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.path = path


#: The class of each code (each error class has its own code).
CLASS_OF: dict[ErrorCode, type[VMBusifyError]] = {
    cls.code: cls for cls in (
        VMBusifyError, ConfigError, ProtocolError, LocalProtocolError, RemoteProtocolError,
        FlowControlError, TransportError, AddressError, TunnelError, UnknownVMError,
        NotConnectedError, RequestTimeout, NoHandlerError, BusError, ControlError, SubnetError,
        LabError, LimitReached, CoreLoopEnded, FileCopyError)}

#: Exit status of vmbusifyctl when a command failed, and of vmbusifyexec when it (not the
#: program) failed: usage, the command listener, an unknown, unreachable or lost VM.
CTL_FAILURE = 1
EXEC_FAILURE = 255

#: The one table from an error's code to what a user sees: (HTTP status of the command
#: listener, exit status of vmbusifyctl, exit status of vmbusifyexec). A code not listed
#: (GENERIC, or one this release does not know) is a 500 and the usual failure statuses.
OUTCOMES: dict[ErrorCode, tuple[int, int, int]] = {
    ErrorCode.CONTROL: (400, CTL_FAILURE, EXEC_FAILURE),
    ErrorCode.UNKNOWN_VM: (404, CTL_FAILURE, EXEC_FAILURE),
    ErrorCode.TIMEOUT: (504, CTL_FAILURE, EXEC_FAILURE),
    ErrorCode.TUNNEL: (503, CTL_FAILURE, EXEC_FAILURE),
    ErrorCode.NOT_CONNECTED: (503, CTL_FAILURE, EXEC_FAILURE),
    ErrorCode.NO_HANDLER: (503, CTL_FAILURE, EXEC_FAILURE),
    ErrorCode.LIMIT: (503, CTL_FAILURE, EXEC_FAILURE),
    ErrorCode.BUS: (503, CTL_FAILURE, EXEC_FAILURE),
}
_DEFAULT_OUTCOME = (500, CTL_FAILURE, EXEC_FAILURE)


def code_of(value: int | None) -> ErrorCode:
    """The ErrorCode of a number from elsewhere; GENERIC for one this release does not know."""
    try:
        return ErrorCode(value)  # type: ignore[arg-type]
    except ValueError:
        return ErrorCode.GENERIC


def error_from(code: int | None, reason: str) -> VMBusifyError:
    """The error a code and reason from another process stand for (its class by the code;
    an unknown code gives VMBusifyError, carrying GENERIC)."""
    return CLASS_OF[code_of(code)](reason)


def http_status(code: ErrorCode) -> int:
    """The command listener's HTTP status for an error of ``code``."""
    return OUTCOMES.get(code, _DEFAULT_OUTCOME)[0]


def ctl_exit(code: ErrorCode) -> int:
    """vmbusifyctl's exit status for an error of ``code``."""
    return OUTCOMES.get(code, _DEFAULT_OUTCOME)[1]


def exec_exit(code: ErrorCode) -> int:
    """vmbusifyexec's exit status for an error of ``code`` (vmbusifyexec's own failure)."""
    return OUTCOMES.get(code, _DEFAULT_OUTCOME)[2]
