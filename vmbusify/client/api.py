"""``Client``: this machine's VMBusify from Python (docs/api.md): status, exec, files and
forwards, through the command listener that ``vmbusifyctl`` and ``vmbusifyexec`` use, with the
same checks (the listener must be root's before the token goes out) and the same rights."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from vmbusify.client.execution import ExecProcess, ExecRequest, ExecResult, argv_of
from vmbusify.client.status import Status, VMStatus
from vmbusify.client.wire import post_detached, request_body
from vmbusify.control.client import ControlClient, q
from vmbusify.control.exec_wire import Listener, find_listener
from vmbusify.control.verify import describe

if TYPE_CHECKING:  # loaded on first use: status and exec need none of them (an Ansible
    # inventory or connection pays ~40 ms for forward's, files' and config's imports)
    from vmbusify.client.forward import Forward, Report
    from vmbusify.config import Config
    from vmbusify.files import CopyResult, Progress

#: A local path, as the file functions take it.
LocalPath = str | os.PathLike[str]

#: The size of a remote terminal when ``tty=True`` and none is given (rows, columns).
DEFAULT_TTY_SIZE = (24, 80)


class Client:
    """This machine's VMBusify endpoint (a host; on a guest the one VM is ``host``).

    ``config`` is the configuration file (default ``$VMBUSIFY_CONFIG``, then
    ``/etc/vmbusify/vmbusify.toml``); ``timeout`` bounds each request to the command listener
    (an exec's run time is bounded by its own ``timeout``). Errors are VMBusifyErrors
    (vmbusify.errors) with one-line reasons: UnknownVMError, NotConnectedError,
    RequestTimeout, ControlError... A Client holds no connection between calls, and may be
    used from several threads.
    """

    def __init__(self, config: str | os.PathLike[str] | None = None,
                 timeout: float = 30.0) -> None:
        self.config_path = None if config is None else os.fspath(config)
        self.timeout = timeout
        self._config: Config | None = None
        self._control: ControlClient | None = None
        self._listener: Listener | None = None

    # -- what the listener needs ---------------------------------------------------------------
    @property
    def config(self) -> Config:
        """The configuration, loaded and checked at first use."""
        if self._config is None:
            from vmbusify.config import load_config  # see the imports above

            self._config = load_config(self.config_path)
        return self._config

    def _ctl(self) -> ControlClient:
        """The listener's client, from the two keys it needs (as ``vmbusifyctl`` does): the
        whole configuration is loaded and checked only by the calls that use it."""
        if self._control is None:
            if self._config is not None:
                self._control = ControlClient(self._config, self.timeout)
            else:
                from vmbusify.config_file import listener_of

                kind, where, port, token_file = listener_of(self.config_path)
                self._control = ControlClient.for_listener(describe(kind, where, port),
                                                           token_file, self.timeout)
        return self._control

    def _exec_listener(self) -> Listener:
        if self._listener is None:
            self._listener = find_listener(self.config_path)
        return self._listener

    # -- status ---------------------------------------------------------------------------
    def status(self) -> Status:
        """This endpoint's mux, VMs, workers and programs (``vmbusifyctl status``)."""
        return Status.from_json(self._ctl().request("GET", "/v1/status"))

    def vms(self) -> list[VMStatus]:
        """Every VM with its state and addresses (``vmbusifyctl list``: fewer fields than
        ``status().vms``, and cheaper)."""
        answer = self._ctl().request("GET", "/v1/vms")
        return [VMStatus.from_json(vm) for vm in answer if isinstance(vm, dict)]

    def ping(self, vmid: str, timeout: float = 5.0) -> float:
        """The round trip of one PING through the VM's tunnel, in milliseconds."""
        answer = self._ctl().request("POST", f"/v1/vms/{q(vmid)}/ping?timeout={timeout}",
                                     timeout=timeout + 5)
        return float(answer["rtt_ms"])

    def connect(self, vmid: str, timeout: float = 10.0) -> str:
        """Bring the VM's tunnel up now; its state after."""
        answer = self._ctl().request("POST", f"/v1/vms/{q(vmid)}/connect?timeout={timeout}",
                                     timeout=timeout + 5)
        return str(answer["state"])

    def disconnect(self, vmid: str) -> str:
        """Drop the VM's tunnel and keep it down until it is needed again; its state after."""
        return str(self._ctl().request("POST", f"/v1/vms/{q(vmid)}/disconnect")["state"])

    def vmid_of(self, ip: str) -> str:
        """The vmid of the VM holding this address (UnknownVMError if none does)."""
        return str(self._ctl().request("GET", f"/v1/vmid/{q(ip)}")["vmid"])

    # -- exec -----------------------------------------------------------------------------
    def start(self, vmid: str, command: str | Sequence[str], *, stdin: bool = False,
              env: Mapping[str, str] | None = None, cwd: str = "", user: str = "",
              timeout: float | None = None, tty: bool = False,
              size: tuple[int, int] | None = None, term: str = "") -> ExecProcess:
        """Start a program on the VM and return it running (its streams, signals, status).

        ``command`` is an argv, or a string for ``/bin/sh -c``. ``stdin=True`` lets you write
        its stdin (``close_stdin()`` for EOF); without it the program's stdin is empty.
        ``timeout`` kills the whole remote process tree after that many seconds (status
        124). ``tty=True`` runs it on a pseudo-terminal of ``size`` (rows, columns).
        """
        rows, cols = (size or DEFAULT_TTY_SIZE) if tty else (0, 0)
        request = ExecRequest(argv_of(command), dict(env or {}), cwd, user, timeout, stdin,
                              tty, rows, cols, term or ("xterm" if tty else ""))
        return ExecProcess(self._exec_listener(), vmid, request, self.timeout)

    def run(self, vmid: str, command: str | Sequence[str], *, input: bytes | None = None,
            env: Mapping[str, str] | None = None, cwd: str = "", user: str = "",
            timeout: float | None = None, check: bool = False) -> ExecResult:
        """Run a program on the VM to its end and return its status with its stdout and
        stderr (as ``subprocess.run(capture_output=True)``). ``input`` is its stdin;
        ``timeout`` kills the remote process tree after that many seconds (status 124,
        reason ``timeout``); ``check=True`` raises ExecFailed unless it exited with 0."""
        with self.start(vmid, command, stdin=input is not None, env=env, cwd=cwd, user=user,
                        timeout=timeout) as proc:
            result = proc.communicate(input)
        return result.check() if check else result

    def spawn(self, vmid: str, command: str | Sequence[str], *,
              env: Mapping[str, str] | None = None, cwd: str = "", user: str = "") -> int:
        """Start a program detached (stdio on /dev/null, outliving the call) and return its
        pid in the VM (``vmbusifyexec -d``)."""
        body = {**ExecRequest(argv_of(command), dict(env or {}), cwd, user).body(),
                "detach": True}
        answer: dict[str, Any] = post_detached(self._exec_listener(), vmid, request_body(body),
                                               self.timeout)
        return int(answer["pid"])

    # -- files ----------------------------------------------------------------------------
    def push(self, vmid: str, sources: LocalPath | Sequence[LocalPath], dest: str, *,
             recursive: bool = False, preserve: bool = False, user: str = "",
             resume: bool = False, checksum: bool = False,
             progress: Callable[[Progress], None] | None = None,
             stdin: BinaryIO | None = None, fsync: bool = False) -> CopyResult:
        """Copy local files (or trees, with ``recursive``) to ``dest`` in the VM, as
        ``vmbusifyctl cp`` does (vmbusify.files.push has every option); a source ``"-"``
        copies ``stdin``. FileCopyError says why a copy failed; ``CopyResult.warnings``
        lists entries of a tree that were left out."""
        from vmbusify.files import push  # see the imports above

        paths = [sources] if isinstance(sources, str | os.PathLike) else list(sources)
        return push(vmid, paths, dest, recursive=recursive, preserve=preserve, user=user,
                    resume=resume, checksum=checksum, config=self.config, progress=progress,
                    stdin=stdin, fsync=fsync)

    def pull(self, vmid: str, sources: str | Sequence[str], dest: LocalPath, *,
             recursive: bool = False, preserve: bool = False, user: str = "",
             resume: bool = False, checksum: bool = False,
             progress: Callable[[Progress], None] | None = None,
             stdout: BinaryIO | None = None, fsync: bool = False) -> CopyResult:
        """Copy files (or trees) of the VM to the local ``dest``, checked as coming from a
        hostile guest (vmbusify.files.pull); ``dest`` ``"-"`` writes the one file to
        ``stdout``."""
        from vmbusify.files import pull  # see the imports above

        paths = [sources] if isinstance(sources, str) else list(sources)
        return pull(vmid, paths, dest, recursive=recursive, preserve=preserve, user=user,
                    resume=resume, checksum=checksum, config=self.config, progress=progress,
                    stdout=stdout, fsync=fsync)

    # -- forward --------------------------------------------------------------------------
    def forward(self, vmid: str, target_port: int, *, target: str = "localhost",
                bind: str = "127.0.0.1", port: int = 0,
                report: Report | None = None) -> Forward:
        """Listen on ``bind:port`` (0: a free port, see ``.port``) and carry each connection
        to ``target:target_port`` as seen from the VM (``vmbusifyctl forward``), until
        ``close()``. ``report`` gets one line for each connection refused or not opened
        (default: said on stderr)."""
        from vmbusify.client.forward import Forward, say_on_stderr  # see the imports above

        return Forward(self.config, vmid, target, target_port, bind, port,
                       report or say_on_stderr)
