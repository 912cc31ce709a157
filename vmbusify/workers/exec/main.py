"""The command executor (docs/exec.md): the `exec` program, which runs programs for the host.

On a guest it registers Entity.CMD_EXECUTOR and serves START, SIGNAL and RESIZE from the
command listener (a Worker, vmbusify.workers.base). On the host the same program set runs,
but execs start from the command listener (the `control` program, which runs the host half,
workers/exec/host.py), so here the program only waits for SIGTERM: it stays RUNNING under
supervisord and holds no socket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from vmbusify.bus.frames import RouteKind, TunnelEvent
from vmbusify.bus.link import Inbound, WorkerLink
from vmbusify.config import Config, Role
from vmbusify.errors import ProtocolError, RemoteProtocolError
from vmbusify.protocol.entities import Entity
from vmbusify.protocol.exec import (
    ExecMessage,
    ExecSpec,
    ExitStatus,
    Kill,
    Resize,
    SendSignal,
    StartReply,
)
from vmbusify.workers.base import Worker, run_worker
from vmbusify.workers.exec.ledger import Ledger
from vmbusify.workers.exec.process import CannotStart, Program, default_signal_actions, spawn
from vmbusify.workers.exec.session import ExecSession

log = logging.getLogger("vmbusify.exec")


class Executor(Worker):
    """Every exec running on this guest, keyed by (vmid, main stream id)."""

    name = "exec"
    entities = (Entity.CMD_EXECUTOR,)
    stop_grace = 5.0  # aborted execs send their EXIT

    def __init__(self, config: Config, link: WorkerLink | None = None) -> None:
        super().__init__(config, link)
        self.sessions: dict[tuple[str, int], ExecSession] = {}
        self.started = 0
        self.failed = 0
        #: Attached execs written down, so the next executor can end them if this one dies.
        self.ledger = Ledger(config.run_dir)

    def install(self) -> None:
        """Declare the routes (before link.start())."""
        link = self.link
        link.route(Entity.CMD_LISTENER, ExecMessage.START, self.on_start, RouteKind.REQUEST)
        link.route(Entity.CMD_LISTENER, ExecMessage.DATA, None, RouteKind.STREAM)
        link.route(Entity.CMD_LISTENER, ExecMessage.SIGNAL, self.on_signal, RouteKind.MESSAGE)
        link.route(Entity.CMD_LISTENER, ExecMessage.RESIZE, self.on_resize, RouteKind.MESSAGE)
        link.route(Entity.CMD_LISTENER, ExecMessage.KILL, self.on_kill, RouteKind.MESSAGE)
        link.on_event(self.on_event)

    async def open(self) -> None:
        """End what an executor killed with SIGKILL left running."""
        self.ledger.sweep()

    async def ready(self) -> None:
        log.info("command executor ready")

    def stats(self) -> dict[str, int]:
        """Execs running, started and failed to start."""
        return {"running": len(self.sessions), "started": self.started, "failed": self.failed}

    # -- handlers --------------------------------------------------------------------------
    async def on_start(self, msg: Inbound) -> dict[str, Any]:
        """START: accept the streams, start the program, answer with its pid or the failure."""
        spec = ExecSpec.from_body(msg.body, "START")
        ctx = f"vm={msg.vmid} stream={msg.stream}"
        main = side = None
        if not spec.detach:
            if not spec.side_stream:
                raise RemoteProtocolError("START: an attached exec needs a side stream")
            main = self.link.streams.accept(msg.vmid, Entity.CMD_EXECUTOR, msg.package,
                                            ExecMessage.DATA)
            side = self.link.streams.accept(
                msg.vmid, Entity.CMD_EXECUTOR,
                dataclasses.replace(msg.package, stream=spec.side_stream), ExecMessage.DATA)
        try:
            child = await spawn(spec)
        except CannotStart as exc:
            self.failed += 1
            log.info("%s: %s: %s", ctx, spec.argv[0], exc)
            for s in (main, side):
                if s is not None:
                    self.link.streams.forget(s)
            return StartReply(exit_code=exc.exit_code, message=str(exc)).to_body()
        self.started += 1
        log.info("%s pid=%d: started %s%s%s", ctx, child.pid, spec.argv[0],
                 " (tty)" if spec.tty else "", " (detached)" if spec.detach else "")
        if main is None or side is None:
            self.spawn(self._reap(child.proc, ctx), msg.vmid, "reaping a detached program")
        else:
            self.ledger.add(child.tag, child.pid)
            session = ExecSession(spec, child, main, side, self._send_exit)
            self.sessions[(msg.vmid, main.id)] = session
            self.spawn(self._run(session), msg.vmid, "an exec")
        return StartReply(pid=child.pid).to_body()

    async def on_signal(self, msg: Inbound) -> None:
        session = self._session(msg)
        if session is not None:
            try:
                sig = SendSignal.from_body(msg.body)
                session.signal(sig.signum, sig.after)
            except ProtocolError as exc:
                log.warning("%s: %s", session.ctx, exc)

    async def on_resize(self, msg: Inbound) -> None:
        session = self._session(msg)
        if session is not None:
            try:
                r = Resize.from_body(msg.body)
            except ProtocolError as exc:
                log.warning("%s: %s", session.ctx, exc)
                return
            session.resize(r.rows, r.cols, r.after)

    async def on_kill(self, msg: Inbound) -> None:
        session = self._session(msg)
        if session is not None:
            try:
                reason = Kill.from_body(msg.body).reason
            except ProtocolError as exc:  # a malformed KILL still kills
                reason = f"killed by the listener ({exc})"
            session.abort(reason)

    async def on_event(self, event: TunnelEvent, vmid: str, info: dict[str, Any]) -> None:
        """The tunnel went down: kill every exec it carried."""
        if event is TunnelEvent.DOWN:
            for (v, _), session in list(self.sessions.items()):
                if v == vmid:
                    session.abort(f"tunnel lost ({info.get('reason', 'down')})")

    def _session(self, msg: Inbound) -> ExecSession | None:
        exec_id = msg.body.get("id") if isinstance(msg.body, dict) else None
        session = self.sessions.get((msg.vmid, exec_id)) if isinstance(exec_id, int) else None
        if session is None:
            log.debug("vm=%s: message %d for no running exec %r", msg.vmid, msg.message_id,
                      exec_id)
        return session

    # -- life ------------------------------------------------------------------------------
    async def _send_exit(self, status: ExitStatus) -> None:
        await self.link.async_send(None, status)

    async def _run(self, session: ExecSession) -> None:
        try:
            await session.run()
        finally:
            self.sessions.pop((session.vmid, session.id), None)
            self.ledger.remove(session.child.tag)

    async def _reap(self, proc: Program, ctx: str) -> None:
        code = await proc.wait()
        log.info("%s pid=%d: detached program ended (%d)", ctx, proc.pid, code)

    async def close(self) -> None:
        """SIGTERM: kill every attached exec's tree (detached ones live on)."""
        for session in list(self.sessions.values()):
            session.abort("the command executor is stopping")


def make(config: Config) -> Executor | None:
    """The command executor of a guest; on the host, none (execs start from the command
    listener, workers/exec/host.py): the program just waits for SIGTERM."""
    if config.role is Role.HOST:
        log.info("host: execs start from the command listener; nothing to serve here")
        return None
    default_signal_actions()  # programs must not inherit a signal ignored by our starter
    return Executor(config)


async def run(config: Config, stop: asyncio.Event | None = None) -> None:
    """Run the command executor until SIGTERM (on the host: just wait)."""
    await run_worker(make, config, stop)
