"""One running exec on the guest: the program, its streams, its end.

Output is read in chunks of up to MAX_CHUNK and written to the stream, which waits for
credit: a slow reader on the host stops our reads, the pipe fills and the program blocks.
Nothing here buffers more than one chunk per direction.

The end: the program exits (or ``--timeout`` kills the tree, 124); its output is drained to
EOF, allowing ``DRAIN_GRACE`` seconds for background processes that still hold the pipes,
after which whatever is left of the tree is killed. Then EOF on both streams and one EXIT
message. A reset stream or a lost tunnel kills the tree at once: no orphans.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import termios
from collections.abc import Awaitable, Callable

from vmbusify.bus.streams import Stream, StreamReset, StreamState
from vmbusify.protocol.exec import ExecSpec, ExitStatus, status_from_returncode
from vmbusify.protocol.exec_api import EXIT_TIMEOUT, ExitReason
from vmbusify.protocol.window import MAX_CHUNK
from vmbusify.workers.exec.process import Child, FdIO, kill_tree, set_winsize, signal_group

log = logging.getLogger(__name__)

#: Seconds the output may stay open after the program exited (background children).
DRAIN_GRACE = 1.0
#: Seconds to wait, after the exit, for the listener to end the stdin stream (it does so once
#: the client has read all output; a slow client may take long, a vanished one is a reset).
STDIN_LINGER = 3600.0

#: Signals and resizes held at most, waiting for the stdin bytes sent before them; past it
#: the oldest is applied at once (a listener sends them as the client's user makes them).
MAX_HELD = 64

SendExit = Callable[[ExitStatus], Awaitable[None]]


class ExecSession:
    """Runs one started program to its end."""

    def __init__(self, spec: ExecSpec, child: Child, main: Stream, side: Stream,
                 send_exit: SendExit) -> None:
        self.spec = spec
        self.child = child
        self.main = main
        self.side = side
        self.send_exit = send_exit
        self.vmid = main.vmid
        self.id = main.id
        self._pty = FdIO(child.master) if child.master is not None else None
        self._aborted: str = ""
        self._abort_event = asyncio.Event()
        self._exited = False
        #: Bytes of stdin taken from the main stream (into the program, or discarded).
        self._stdin_taken = 0
        #: Stdin is over (EOF, reset): nothing waits for its bytes any more.
        self._stdin_over = False
        #: The program's stdin is full (it reads no more for now): nothing waits either.
        self._stdin_full = False
        #: Signals and resizes waiting for the stdin bytes sent before them, in the order
        #: they came: (bytes of stdin they follow, what, how to apply it).
        self._held: collections.deque[tuple[int, str, Callable[[], None]]] = (
            collections.deque())

    @property
    def ctx(self) -> str:
        return f"vm={self.vmid} stream={self.id} pid={self.child.pid}"

    # -- control ---------------------------------------------------------------------------
    def signal(self, sig: int, after: int = 0) -> None:
        """Deliver a signal the client forwarded, once the ``after`` bytes of stdin the
        listener sent before it are in the program's stdin (SendSignal.after)."""
        name = signal.Signals(sig).name
        self._in_order(after, name, lambda: self._deliver(sig))

    def _deliver(self, sig: int) -> None:
        log.info("%s: forwarding %s", self.ctx, signal.Signals(sig).name)
        signal_group(self.child, sig)

    def resize(self, rows: int, cols: int, after: int = 0) -> None:
        """The client's terminal changed size (applied in stdin's order, as a signal)."""
        master = self.child.master
        if master is not None:
            self._in_order(after, f"resize to {rows}x{cols}",
                           lambda: set_winsize(master, rows, cols))

    def _in_order(self, after: int, what: str, apply: Callable[[], None]) -> None:
        """Apply ``apply`` now if the ``after`` bytes of stdin before it were taken (and
        nothing is held before it), else hold it until they are."""
        if not self._held and (self._stdin_over or self._stdin_full
                               or after <= self._stdin_taken):
            self._apply(what, apply)
            return
        if len(self._held) >= MAX_HELD:
            _, old_what, old_apply = self._held.popleft()
            self._apply(old_what, old_apply)
        self._held.append((after, what, apply))
        log.debug("%s: %s held until %d bytes of stdin are in (%d so far)", self.ctx, what,
                  after, self._stdin_taken)

    def _release(self) -> None:
        """Apply the held signals and resizes whose stdin bytes were taken (all of them once
        stdin is over, or full: the program reads no more of it for now)."""
        while self._held and (self._stdin_over or self._stdin_full
                              or self._held[0][0] <= self._stdin_taken):
            _, what, apply = self._held.popleft()
            self._apply(what, apply)

    def _apply(self, what: str, apply: Callable[[], None]) -> None:
        try:
            apply()
        except OSError as exc:  # the pty went away with the program
            log.info("%s: %s not applied: %s", self.ctx, what, exc)

    def abort(self, reason: str) -> None:
        """The client, the listener or the tunnel went away: kill the tree now."""
        if self._aborted or self._exited:
            return
        self._aborted = reason
        self._held.clear()
        n = kill_tree(self.child)
        log.warning("%s: %s; killed %d processes", self.ctx, reason, n)
        self._abort_event.set()

    # -- life ------------------------------------------------------------------------------
    async def run(self) -> ExitStatus:
        """Pump streams until the program ended; returns (and has sent) its status."""
        pumps = [asyncio.ensure_future(self._pump_out(self._stdout_reader(), self.main))]
        if self.child.stderr is not None:
            pumps.append(asyncio.ensure_future(
                self._pump_out(FdIO(self.child.stderr).read_batch, self.side)))
        else:  # a TTY: nothing goes up the side stream
            await self.side.write_eof()
        stdin_task = asyncio.ensure_future(self._pump_in())
        lifeline = asyncio.ensure_future(self._watch_side())
        status = await self._wait_exit()
        try:
            _, pending = await asyncio.wait(pumps, timeout=DRAIN_GRACE)
            if pending:
                n = kill_tree(self.child)
                log.info("%s: output still open %.1fs after the exit; killed %d leftover "
                         "processes", self.ctx, DRAIN_GRACE, n)
                await asyncio.wait(pending, timeout=5)
            for p in pumps:
                p.cancel()
            for stream in (self.main, self.side):
                if stream.state is not StreamState.RESET:
                    await stream.write_eof()  # idempotent; a cancelled pump may not have
            if not self._aborted:
                await self.send_exit(status)
                # The listener ends both streams once the client has all the output.
                await asyncio.wait([stdin_task, lifeline], timeout=STDIN_LINGER)
        finally:
            stdin_task.cancel()
            lifeline.cancel()
            # Let them end first: a write still waiting on the stdin pipe must stop watching
            # its fd before the fd is closed (and its number perhaps reused).
            await asyncio.gather(stdin_task, lifeline, return_exceptions=True)
            self._held.clear()
            self._close_fds()
            for stream in (self.main, self.side):
                if stream.state is not StreamState.CLOSED:
                    await stream.reset(self._aborted or "exec finished")
        return status

    async def _wait_exit(self) -> ExitStatus:
        wait = asyncio.ensure_future(self.child.proc.wait())
        aborted = asyncio.ensure_future(self._abort_event.wait())
        try:
            done, _ = await asyncio.wait({wait, aborted}, timeout=self.spec.timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if wait in done:
                self._exited = True
                status = status_from_returncode(wait.result(), self.id)
                log.info("%s: %s (exit %d)", self.ctx, status.message or "exited",
                         status.exit_code)
                return status
            if aborted in done:
                await wait
                return ExitStatus(255, ExitReason.LOST, self._aborted, self.id)
            n = kill_tree(self.child)
            await wait
            self._exited = True
            log.info("%s: timeout after %gs; killed %d processes", self.ctx,
                     self.spec.timeout, n)
            return ExitStatus(EXIT_TIMEOUT, ExitReason.TIMEOUT,
                              f"timed out after {self.spec.timeout:g}s; process tree killed",
                              self.id, signal.SIGKILL)
        finally:
            aborted.cancel()

    def _stdout_reader(self) -> Callable[[int], Awaitable[bytes]]:
        if self._pty is not None:
            return self._pty.read_batch
        assert self.child.stdout is not None
        return FdIO(self.child.stdout).read_batch

    async def _pump_out(self, read: Callable[[int], Awaitable[bytes]],
                        stream: Stream | None) -> None:
        try:
            while True:
                chunk = await read(MAX_CHUNK)
                if not chunk:
                    break
                if stream is not None:
                    await stream.write(chunk)
        except StreamReset as exc:
            self.abort(f"output stream reset: {exc}")
            return
        except OSError as exc:
            log.warning("%s: reading output failed: %s", self.ctx, exc)
        if stream is not None:
            try:
                await stream.write_eof()
            except StreamReset:
                pass

    async def _watch_side(self) -> None:
        """The side stream's down direction carries only the final EOF: a reset means abort."""
        try:
            while await self.side.read():
                pass
        except StreamReset as exc:
            self.abort(f"exec aborted: {exc}")

    async def _pump_in(self) -> None:
        """Client stdin to the program; after the exit, drain to EOF and discard. Held
        signals and resizes go as soon as the bytes sent before them are in (or when the
        program's stdin is full: it reads no more for now, and a Ctrl-C must still reach
        it), and all of them once stdin is over."""
        try:
            await self._pump_stdin()
        finally:
            self._stdin_over = True
            self._release()

    async def _pump_stdin(self) -> None:
        target = self._pty if self._pty is not None else (
            FdIO(self.child.stdin) if self.child.stdin is not None else None)
        try:
            while True:
                chunk = await self.main.read()
                if not chunk:
                    break
                if target is not None and not (self._pty is not None and self._exited):
                    try:
                        await target.write(chunk, self._on_stdin_full)
                    except BrokenPipeError:  # the program closed its stdin: discard the rest
                        target = None
                        self._close_stdin()
                    finally:
                        self._stdin_full = False
                self._stdin_taken += len(chunk)
                self._release()
        except StreamReset as exc:
            self.abort(f"stream reset: {exc}")
            return
        except OSError as exc:
            log.info("%s: writing stdin failed: %s", self.ctx, exc)
        if self._pty is not None and not self._exited:
            try:  # a pty cannot be half-closed: type the EOF character, as a terminal would
                await self._pty.write(bytes([termios.tcgetattr(self._pty.fd)[6][termios.VEOF]
                                             [0]]))
            except (OSError, termios.error, IndexError, TypeError):
                pass
        self._close_stdin()

    def _on_stdin_full(self) -> None:
        """The program's stdin is full: what is held goes, and so does what comes while
        the writer waits for room."""
        self._stdin_full = True
        self._release()

    def _close_stdin(self) -> None:
        """EOF on the program's stdin pipe (idempotent; nothing to do with a TTY)."""
        if self.child.stdin is not None:
            os.close(self.child.stdin)
            self.child.stdin = None

    def _close_fds(self) -> None:
        self.child.close()
