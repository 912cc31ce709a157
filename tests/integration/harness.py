"""A host mux and a guest mux as real processes joined by a Unix socket (no root needed).

The test process plays the workers, with the real WorkerLink over the real ZeroMQ bus.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from vmbusify.bus.frames import RouteKind
from vmbusify.bus.link import WorkerLink
from vmbusify.config import Config, load_config
from vmbusify.errors import VMBusifyError
from vmbusify.protocol.entities import Entity
from vmbusify.protocol.package import Package, PackageDecoder

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MuxProc:
    """One mux process and its config file."""

    name: str
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> Config:
        return load_config(self.config_path)

    def start(self) -> None:
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(
                [str(BIN / "vmbusify"), "mux", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.extra_env})
        log.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:  # a stuck mux must not outlive the test
                    self.proc.kill()
                    self.proc.wait(10)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@dataclass
class Pair:
    """A connected host/guest mux pair in a temporary directory."""

    root: Path
    host: MuxProc
    guest: MuxProc
    tunnel_path: Path

    def stop(self) -> None:
        for m in (self.host, self.guest):
            if m.proc and m.proc.poll() is None:
                m.kill(signal.SIGCONT)  # a test may have frozen it
                m.kill(signal.SIGTERM)


def make_pair(root: Path, ping_interval: float = 0.5, dead_after: float = 3.0,
              keep_connected: bool = True, control_listen: str = "",
              control_extra: str = "") -> Pair:
    """A guest and a host mux under ``root``; each machine's command listener (when a test
    starts one) on a Unix socket in a directory of its own under ``root``, unless
    ``control_listen`` says otherwise; ``control_extra`` goes into the host's [control]."""
    tunnel = root / "vm1.sock"
    host_control = f"unix:{root}/host-control/control.sock"
    tun = (f"ping_interval = {ping_interval}\ndead_after = {dead_after}\n"
           f"backoff_initial = 0.1\nbackoff_max = 1.0\n")
    g = write_config(root / "guest.toml", (
        f'role = "guest"\nname = "guest1"\nrun_dir = "{root}/guest-run"\n'
        f'state_dir = "{root}/guest-state"\n'
        f'[tunnel]\nlisten = "unix:{tunnel}"\n{tun}'
        f'[control]\nlisten = "unix:{root}/guest-control/control.sock"\n'))
    h = write_config(root / "host.toml", (
        f'role = "host"\nname = "host"\nrun_dir = "{root}/host-run"\n'
        f'state_dir = "{root}/host-state"\n'
        f'[tunnel]\n{tun}'
        f'[host]\nkeep_connected = {"true" if keep_connected else "false"}\n'
        f'[[vms]]\nvmid = "vm1"\naddress = "unix:{tunnel}"\n'
        f'[control]\nlisten = "{control_listen or host_control}"\n{control_extra}'))
    pair = Pair(root, MuxProc("host", h, root / "host.log"),
                MuxProc("guest", g, root / "guest.log"), tunnel)
    pair.guest.start()
    pair.host.start()
    return pair


async def link_for(mux: MuxProc, name: str, entities: list[Entity],
                   routes: list[tuple[Any, ...]] | None = None, **kwargs: Any) -> WorkerLink:
    """A started WorkerLink on ``mux``'s bus with the given routes.

    A route is ``(source, message id, handler[, kind])``; without a kind, a handler takes
    REQUESTs and None takes stream packages. ``kwargs`` go to WorkerLink."""
    link = WorkerLink(mux.config, name, list(entities), **kwargs)
    for source, message_id, handler, *kind in routes or []:
        default = RouteKind.STREAM if handler is None else RouteKind.REQUEST
        link.route(source, message_id, handler, kind[0] if kind else default)
    await link.start(wait=15)
    return link


async def wait_state(link: WorkerLink, vmid: str, state: str, timeout: float = 20.0
                     ) -> dict[str, Any]:
    """Poll the mux status until ``vmid`` is in ``state``; returns its record."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            st = await link.control({"cmd": "status"}, timeout=2)
            last = next(v for v in st["vms"] if v["vmid"] == vmid)
            if last["state"] == state:
                return last
        except (VMBusifyError, StopIteration):  # the mux may be restarting, the VM not listed
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"{vmid} not {state} after {timeout}s; last: {last}")


def read_packages_until_closed(s: socket.socket) -> list[Package]:
    """Every package a raw peer socket receives until it is closed, reset or times out."""
    dec = PackageDecoder()
    out: list[Package] = []
    while True:
        try:
            data = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not data:
            break
        dec.receive_data(data)
        out.extend(dec.packages())
    return out
