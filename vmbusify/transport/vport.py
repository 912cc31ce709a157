"""virtio-serial: the guest's end of a QEMU ``virtserialport``, a byte stream that never accepts.

Every QEMU has virtio-serial (qemu-ga uses it). The guest sees a character device,
``/dev/virtio-ports/NAME`` (or ``/dev/vportNpM``, named in ``/sys/class/virtio-ports/*/name``
where udev does not run); the host sees the Unix socket of a QEMU chardev
(``-chardev socket,server=on,wait=off``) and connects to it like to any ``unix:`` address.

The guest opens the port once and keeps it open. ``listen_vport`` turns it into what the
guest mux expects of a listener, one "connection" per host session:

- the host coming and going shows as POLLHUP on the port (a read gives 0 bytes while no host
  is connected); the port is then only polled, every ``HUP_POLL`` seconds, until the host is
  back, and the session's tunnel sees its connection closed;
- a session starts only at a host HELLO with a fresh nonce, found by ``resync.PortReader``:
  everything an earlier host left in the buffers (half packages, whole ones such as an exec
  START) is skipped, and a HELLO in the middle of a session is a new host;
- each session is handed to the callback as asyncio streams over a socketpair that this
  module pumps to and from the port, so the tunnel code is the same as on vsock; the next
  session's callback starts only once the previous one returned (one host at a time).

A guest cannot hang up on a host here: when the guest ends a session itself (its tunnel
closed, a mux that just started) it writes a BYE into the port, so a host that still thinks
it is connected drops the tunnel and connects again at once instead of after ``dead_after``.

Who may write to the port: only QEMU's side of the chardev, i.e. whoever can connect to its
Unix socket on the host. There is no peer address to check (docs/deploy.md, "virtio-serial").
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import os
import select
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from vmbusify.errors import TransportError
from vmbusify.logs import RateLimitedLog, printable
from vmbusify.protocol.package import MAX_PAYLOAD_LIMIT
from vmbusify.protocol.tunnel import Bye
from vmbusify.transport._streams import STREAM_LIMIT, ClientConnected, transport_error
from vmbusify.transport.address import UnixAddress, VportAddress
from vmbusify.transport.resync import Deliver, Lost, NewHost, PortReader

log = logging.getLogger(__name__)

#: How often a port whose host is away is polled for the host's return (POLLHUP cleared).
HUP_POLL = 0.25
#: Bytes waiting to be written (to the port, or to the session's tunnel) above which the
#: other side is no longer read until they drain.
HIGH_WATER = 1 << 20
#: How long a new session waits for the previous session's callback to return.
HANDOVER_TIMEOUT = 5.0
_READ_SIZE = 64 << 10
#: What a host still connected from before is told when the guest starts or ends a session.
BYE_REASON = "the guest's virtio-serial session ended: connect again"
#: The port name VMBusify uses unless told otherwise (qemu-ga's is org.qemu.guest_agent.0).
DEFAULT_PORT_NAME = "org.vmbusify.0"


# -- what the host (or a lab) gives QEMU -------------------------------------------------------
def qemu_args(chardev_path: str, name: str = DEFAULT_PORT_NAME, chardev_id: str = "vmbusify0",
              bus: str = "vmbusify-vser0") -> list[str]:
    """QEMU options for a virtio-serial port ``name`` whose host side is a listening Unix
    socket at ``chardev_path`` (``server=on,wait=off``: the VM boots without a host). The
    host mux then connects to ``host_address(chardev_path)``. Keep the socket's directory
    root-only: whoever connects drives the guest."""
    VportAddress(name)  # the same rule for the name as the guest's address
    if "," in chardev_path:
        raise TransportError(f"{chardev_path}: QEMU option values cannot hold ','")
    return ["-device", f"virtio-serial-pci,id={bus}",
            "-chardev", f"socket,id={chardev_id},path={chardev_path},server=on,wait=off",
            "-device", f"virtserialport,bus={bus}.0,chardev={chardev_id},name={name}"]


def host_address(chardev_path: str) -> str:
    """The host mux's address (``[[vms]] address``) for a VM whose chardev socket is
    ``chardev_path``: a plain Unix socket."""
    return str(UnixAddress(chardev_path))


def libvirt_channel(chardev_path: str, name: str = DEFAULT_PORT_NAME) -> str:
    """The libvirt ``<channel>`` element for the same port (QEMU listens: mode='bind')."""
    VportAddress(name)
    UnixAddress(chardev_path)
    path = chardev_path.replace("&", "&amp;").replace("'", "&apos;").replace("<", "&lt;")
    return (f"<channel type='unix'>\n  <source mode='bind' path='{path}'/>\n"
            f"  <target type='virtio' name='{name}'/>\n</channel>")


# -- finding the port ----------------------------------------------------------------------
def find_port(name: str, dev_root: str = "/dev", sys_root: str = "/sys") -> str:
    """The character device of the virtio-serial port called ``name``.

    ``/dev/virtio-ports/NAME`` where udev made it; otherwise the ``/dev/vportNpM`` whose
    ``/sys/class/virtio-ports/vportNpM/name`` is NAME. TransportError says what is missing.
    """
    link = Path(dev_root, "virtio-ports", name)
    if link.exists():
        return str(link)
    ports = Path(sys_root, "class", "virtio-ports")
    try:
        entries = sorted(ports.iterdir())
    except OSError:
        entries = []
    for entry in entries:
        try:
            if (entry / "name").read_text().strip() == name:
                return str(Path(dev_root, entry.name))
        except OSError:
            continue
    seen = ", ".join(printable(e.name) for e in entries) or "none"
    raise TransportError(
        f"vport:{name}: no virtio-serial port named {name!r} in this guest (ports: {seen}; "
        "the VM needs a virtserialport with that name, and the virtio_console module)")


def port_path(address: VportAddress, dev_root: str = "/dev", sys_root: str = "/sys") -> str:
    """The device path ``address`` names (a path as is; a name through ``find_port``)."""
    return address.port if address.is_path else find_port(address.port, dev_root, sys_root)


# -- the device ----------------------------------------------------------------------------
class Port(Protocol):
    """What the listener needs of a port (PortDevice; a stand-in in tests)."""

    def fileno(self) -> int: ...
    def read(self, n: int) -> bytes | None: ...
    def write(self, data: bytes | memoryview) -> int: ...
    def host_connected(self) -> bool: ...
    def close(self) -> None: ...


class PortDevice:
    """The guest's end of a port: a non-blocking file descriptor, opened once.

    Anything with these five methods can stand in for it (tests use a socketpair).
    """

    def __init__(self, fd: int, label: str) -> None:
        self.fd = fd
        self.label = label

    @classmethod
    def open(cls, path: str, label: str) -> PortDevice:
        """Open the character device at ``path`` for reading and writing (non-blocking)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            hint = ("another process holds the port (a virtio-serial port opens once)"
                    if exc.errno == errno.EBUSY else "")
            raise transport_error(label, "open", exc, hint) from None
        return cls(fd, label)

    def fileno(self) -> int:
        return self.fd

    def read(self, n: int) -> bytes | None:
        """Up to ``n`` bytes; None if none are there now; b"" if the host is away."""
        try:
            return os.read(self.fd, n)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.ENODEV, errno.EPIPE):
                return b""  # a pty whose other end closed; a port being unplugged
            raise

    def write(self, data: bytes | memoryview) -> int:
        """Write what the port takes now (0 if none); BrokenPipeError if the host is away
        (the port then never takes a byte, and would wake a writer for ever)."""
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            if not self.host_connected():
                raise BrokenPipeError(errno.EPIPE, "no host on the port (POLLHUP)") from None
            return 0

    def host_connected(self) -> bool:
        """False while the port reports POLLHUP (no host on the chardev)."""
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        return not any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL)
                       for _, ev in p.poll(0))

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


# -- buffered non-blocking writes ----------------------------------------------------------
class _Out:
    """Bytes for a non-blocking fd: written at once when it takes them, else when writable."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fileno: Callable[[], int],
                 write: Callable[[bytes | memoryview], int],
                 on_drained: Callable[[], None], on_error: Callable[[OSError], None]) -> None:
        self._loop = loop
        self._fileno = fileno
        self._write = write
        self._on_drained = on_drained
        self._on_error = on_error
        self._buf = bytearray()
        self._fd: int | None = None  # set while a writer is registered

    @property
    def pending(self) -> int:
        return len(self._buf)

    def write(self, data: bytes) -> None:
        if not self._buf:
            try:
                n = self._write(data)
            except OSError as exc:
                self._on_error(exc)
                return
            data = data[n:]
            if not data:
                return
        self._buf += data
        if self._fd is None:
            self._fd = self._fileno()
            self._loop.add_writer(self._fd, self._flush)

    def _flush(self) -> None:
        try:
            n = self._write(memoryview(self._buf)) if self._buf else 0
        except OSError as exc:
            self.clear()
            self._on_error(exc)
            return
        del self._buf[:n]
        if not self._buf:
            self._stop()
        self._on_drained()

    def _stop(self) -> None:
        if self._fd is not None:
            self._loop.remove_writer(self._fd)
            self._fd = None

    def clear(self) -> None:
        """Drop what is waiting."""
        self._buf.clear()
        self._stop()


def _sock_send(sock: socket.socket) -> Callable[[bytes | memoryview], int]:
    def send(data: bytes | memoryview) -> int:
        try:
            return sock.send(data)
        except BlockingIOError:
            return 0
    return send


class _Session:
    """One host's tunnel: our end of a socketpair, pumped to and from the port."""

    def __init__(self, listener: VportListener, hostname: str) -> None:
        self.listener = listener
        self.hostname = hostname
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        self.theirs.setblocking(False)
        self.ended = False
        self.task: asyncio.Task[None] | None = None
        loop = listener.loop
        self.to_tunnel = _Out(loop, self.ours.fileno, _sock_send(self.ours),
                              listener._resume_port, lambda exc: listener._session_over(self))
        self.reading = False
        self.resume_reading()

    def resume_reading(self) -> None:
        if not self.reading and not self.ended:
            self.listener.loop.add_reader(self.ours.fileno(), self._on_readable)
            self.reading = True

    def pause_reading(self) -> None:
        if self.reading:
            self.listener.loop.remove_reader(self.ours.fileno())
            self.reading = False

    def _on_readable(self) -> None:
        """The tunnel wrote: pass it to the port (its end closed: the session is over)."""
        try:
            data = self.ours.recv(_READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.listener._session_over(self)
            return
        self.listener._to_port(data)

    def end(self) -> None:
        """Close our end: the tunnel sees its connection closed."""
        if self.ended:
            return
        self.pause_reading()
        self.ended = True
        self.to_tunnel.clear()
        self.ours.close()


class VportListener(asyncio.AbstractServer):
    """Serves host sessions on one virtio-serial port (see the module docstring)."""

    def __init__(self, device: Port, client_connected_cb: ClientConnected,
                 label: str, hup_poll: float = HUP_POLL) -> None:
        self.loop = asyncio.get_running_loop()
        self.device = device
        self.label = label
        self.hup_poll = hup_poll
        self._cb = client_connected_cb
        self._reader = PortReader(MAX_PAYLOAD_LIMIT)
        self._session: _Session | None = None
        self._last_task: asyncio.Task[None] | None = None
        self._reading = False
        self._reading_fd = -1
        self._poller: asyncio.TimerHandle | None = None
        self._closed = False
        self._away = False  # no host on the chardev: the port is polled, not read
        self._out = _Out(self.loop, device.fileno, device.write, self._resume_tunnel,
                         self._port_error)
        self._warn = RateLimitedLog(log, 10)
        #: Counters for status and tests.
        self.sessions = 0
        self.skipped = 0
        self.host_away_count = 0

    # -- asyncio.AbstractServer ------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pause_port()
        if self._poller is not None:
            self._poller.cancel()
        self._out.clear()
        if self._session is not None:
            self._session.end()
        self.device.close()

    async def wait_closed(self) -> None:
        return None

    def is_serving(self) -> bool:
        return not self._closed

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop

    async def start_serving(self) -> None:
        return None

    async def serve_forever(self) -> None:  # pragma: no cover - not used by the mux
        while not self._closed:  # noqa: ASYNC110 (asyncio.Server's API; nothing waits on it)
            await asyncio.sleep(3600)

    # -- the port ----------------------------------------------------------------------------
    def start(self) -> None:
        """Tell a host still connected from before that its session is over, then listen."""
        if self.device.host_connected():
            self._say_bye()
            self._resume_port()
        else:
            self._host_away(first=True)

    def _say_bye(self) -> None:
        """Queue a BYE for the host (after whatever is still going to it)."""
        self._out.write(Bye(BYE_REASON).package().encode())

    def _resume_port(self) -> None:
        session = self._session
        if self._closed or self._reading or self._away:
            return
        if session is not None and session.to_tunnel.pending > HIGH_WATER:
            return
        self._reading_fd = self.device.fileno()
        self.loop.add_reader(self._reading_fd, self._on_port_readable)
        self._reading = True

    def _pause_port(self) -> None:
        if self._reading:
            self.loop.remove_reader(self._reading_fd)
            self._reading = False

    def _resume_tunnel(self) -> None:
        if self._session is not None and self._out.pending <= HIGH_WATER:
            self._session.resume_reading()

    def _on_port_readable(self) -> None:
        try:
            data = self.device.read(_READ_SIZE)
        except OSError as exc:
            self._port_error(exc)
            return
        if data is None:
            return
        if not data:
            self._host_away()
            return
        for event in self._reader.feed(data):
            if isinstance(event, Deliver):
                session = self._session
                if session is not None and not session.ended:
                    session.to_tunnel.write(event.data)
                    if session.to_tunnel.pending > HIGH_WATER:
                        self._pause_port()
            elif isinstance(event, NewHost):
                self._new_session(event)
            elif isinstance(event, Lost):
                self._warn.warning("lost", "%s: the session's stream broke (%s): telling the "
                                   "host to connect again", self.label, event.reason)
                self._end_session(bye=True)

    def _port_error(self, exc: OSError) -> None:
        self._warn.warning("error", "%s: %s: treating the host as gone", self.label, exc)
        self._host_away()

    def _host_away(self, first: bool = False) -> None:
        """No host on the chardev: end the session, forget the buffers, poll for its return."""
        self._pause_port()
        self._away = True
        self._out.clear()
        self._reader.reset()
        if not first:
            self.host_away_count += 1
            log.info("%s: the host went away (POLLHUP)%s", self.label,
                     f": ending the session with {self._session.hostname}"
                     if self._session is not None else "")
        self._end_session(bye=False)
        self._poll_back()

    def _poll_back(self) -> None:
        self._poller = None
        if self._closed:
            return
        if self.device.host_connected():
            log.info("%s: a host is connected: waiting for its HELLO", self.label)
            self._away = False
            self._resume_port()
        else:
            self._poller = self.loop.call_later(self.hup_poll, self._poll_back)

    def _to_port(self, data: bytes) -> None:
        self._out.write(data)
        if self._out.pending > HIGH_WATER and self._session is not None:
            self._session.pause_reading()

    # -- sessions ----------------------------------------------------------------------------
    def _new_session(self, event: NewHost) -> None:
        hostname = printable(event.hello.hostname)
        self.skipped += event.skipped
        self.sessions += 1
        if self._session is not None:
            log.info("%s: a new host's HELLO in the middle of the session: the host changed",
                     self.label)
            self._end_session(bye=False)
        self._out.clear()  # what the last session's tunnel wrote is not for this host
        log.info("%s: a host's HELLO (%s) starts session %d%s", self.label, hostname,
                 self.sessions, f"; skipped {event.skipped} stale bytes before it"
                 if event.skipped else "")
        session = self._session = _Session(self, hostname)
        session.task = self.loop.create_task(self._serve(session, self._last_task))
        self._last_task = session.task

    def _end_session(self, bye: bool) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.end()
        if bye:  # after what the tunnel still had to say (its own BYE, say)
            self._say_bye()
        self._resume_port()  # it may have waited for that session's tunnel to read

    def _session_over(self, session: _Session) -> None:
        """The tunnel closed its end: the host is told, and the port scans for a HELLO."""
        if session is not self._session:
            session.end()
            return
        log.info("%s: the guest ended the session with %s", self.label, session.hostname)
        self._reader.reset()
        self._end_session(bye=True)

    async def _serve(self, session: _Session, previous: asyncio.Task[None] | None) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait({previous}, timeout=HANDOVER_TIMEOUT)
            if not previous.done():
                log.warning("%s: the previous session did not end within %g s: cancelling it",
                            self.label, HANDOVER_TIMEOUT)
                previous.cancel()
                await asyncio.gather(previous, return_exceptions=True)
        if session.ended:
            session.theirs.close()
            return
        try:
            reader, writer = await asyncio.open_connection(sock=session.theirs,
                                                           limit=STREAM_LIMIT)
        except OSError as exc:
            session.theirs.close()
            log.warning("%s: cannot start the session: %s", self.label, exc)
            return
        try:
            result = self._cb(reader, writer)
            if inspect.isawaitable(result):
                await result
        except Exception:  # a callback bug must not stop the port
            log.exception("%s: the session's handler failed", self.label)
            writer.close()


async def listen_vport(address: VportAddress, client_connected_cb: ClientConnected,
                       device: Port | None = None) -> VportListener:
    """Serve host sessions on the port ``address`` names (or on ``device``, a stand-in)."""
    if device is None:
        device = PortDevice.open(port_path(address), str(address))
    listener = VportListener(device, client_connected_cb, str(address))
    listener.start()
    return listener


async def connect_vport(address: VportAddress, timeout: float) -> tuple[
        asyncio.StreamReader, asyncio.StreamWriter]:
    """A port is the guest's; the host connects to QEMU's chardev socket instead."""
    raise TransportError(f"{address}: vport is the guest's side of virtio-serial; the host "
                         "connects to the QEMU chardev's socket (unix:/path, docs/deploy.md)")


__all__ = ["BYE_REASON", "DEFAULT_PORT_NAME", "HIGH_WATER", "HUP_POLL", "Port", "PortDevice",
           "VportListener", "connect_vport", "find_port", "host_address", "libvirt_channel",
           "listen_vport", "port_path", "qemu_args"]
