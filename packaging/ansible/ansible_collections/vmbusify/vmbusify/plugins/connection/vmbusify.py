# VMBusify's connection plugin for Ansible (docs/ansible.md).
"""Run Ansible's commands in a VM over the hypervisor's host-guest socket, with vmbusifyexec."""

from __future__ import annotations

DOCUMENTATION = r"""
    name: vmbusify
    short_description: Reach VMs over the hypervisor socket with VMBusify (no network in the VM)
    description:
        - Runs each command in the VM with C(vmbusifyexec) on its hypervisor, which reaches
          the VM over vsock, hv_sock or virtio-serial, so the VM needs no network, no sshd
          and no keys.
        - The hypervisor is this machine, or a host reached over ssh
          (C(ansible_vmbusify_hypervisor)); one control node then drives the VMs of many
          hypervisors. On a remote hypervisor one ssh master connection is kept per
          hypervisor and every command goes through it.
        - Files are copied through the same exec (the file on the program's stdin, or its
          stdout into the file), so C(copy), C(template) and C(fetch) work as usual.
        - Become works as with ssh (C(sudo), C(su)... in the VM, passwords included);
          C(remote_user) is the user the commands run as (C(vmbusifyexec -u)), root when
          unset.
    author: VMBusify
    version_added: "0.2.0"
    options:
      pipelining:
        description:
          - Send each module on the command's stdin (one exec per task) instead of as a file
            (temporary directory, file, run, clean-up).
          - On by default, unlike Ansible's other connections, whose default is off because
            sudo's C(requiretty) breaks it; commands through VMBusify have no terminal either
            way, so C(requiretty) would break both.
        type: boolean
        default: true
        env:
          - name: ANSIBLE_PIPELINING
        ini:
          - section: defaults
            key: pipelining
          - section: connection
            key: pipelining
        vars:
          - name: ansible_pipelining
          - name: ansible_vmbusify_pipelining
      remote_addr:
        description: The VM's vmid (or any address it reported), as the hypervisor knows it.
        default: inventory_hostname
        type: str
        vars:
          - name: inventory_hostname
          - name: ansible_host
          - name: ansible_vmbusify_vmid
      remote_user:
        description: The user to run commands as in the VM (root when unset).
        type: str
        vars:
          - name: ansible_user
          - name: ansible_vmbusify_user
      hypervisor:
        description:
          - The hypervisor running the VM, as an ssh destination (C([user@]host)); empty
            for this machine.
        type: str
        default: ""
        vars:
          - name: ansible_vmbusify_hypervisor
      config:
        description: VMBusify's configuration file on the hypervisor (its default when empty).
        type: str
        default: ""
        vars:
          - name: ansible_vmbusify_config
      exec_path:
        description: The vmbusifyexec program on the hypervisor.
        type: str
        default: vmbusifyexec
        vars:
          - name: ansible_vmbusify_exec
      use_api:
        description:
          - On this machine as the hypervisor, run commands in-process through VMBusify's
            Python API (C(vmbusify.client)) when Ansible's Python can import it, saving a
            vmbusifyexec process per command; C(false) always runs vmbusifyexec.
        type: bool
        default: true
        vars:
          - name: ansible_vmbusify_use_api
      ssh_executable:
        description: The ssh client used to reach a remote hypervisor.
        type: str
        default: ssh
        vars:
          - name: ansible_vmbusify_ssh_executable
      ssh_args:
        description:
          - Extra arguments for ssh to a remote hypervisor (C(-p PORT), C(-i KEY), C(-o ...)).
        type: str
        default: ""
        vars:
          - name: ansible_vmbusify_ssh_args
      control_persist:
        description:
          - Seconds the ssh master connection to a remote hypervisor stays up once idle.
        type: int
        default: 60
        vars:
          - name: ansible_vmbusify_control_persist
      control_dir:
        description: Where the ssh master connections' sockets go.
        type: str
        default: ~/.ansible/cp
        vars:
          - name: ansible_vmbusify_control_dir
"""

import fcntl
import os
import selectors
import shlex
import subprocess
import tempfile
import typing as t

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_bytes, to_native, to_text
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

try:  # VMBusify's Python API, when Ansible runs where VMBusify is installed
    from vmbusify.client.execution import ExecProcess, ExecRequest, Stream
    from vmbusify.client.wire import find_listener
    from vmbusify.errors import VMBusifyError
    HAVE_API = True
except ImportError:
    HAVE_API = False

display = Display()

#: vmbusifyexec's exit status when it (not the program) failed: the VM is unknown or
#: unreachable, the tunnel was lost, the command listener is not there (docs/exec.md).
EXEC_FAILURE = 255
#: How long an ssh master connection may take to come up.
MASTER_TIMEOUT = 30


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Connection(ConnectionBase):
    """Commands, files and become in a VM, through vmbusifyexec on its hypervisor."""

    transport = "vmbusify.vmbusify.vmbusify"
    has_pipelining = True

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self._control_path = ""
        self._listener: t.Any = None

    # -- in-process, through the Python API ---------------------------------------------------
    def _api(self) -> bool:
        """Whether this connection runs commands through vmbusify.client in-process."""
        return HAVE_API and not self._hypervisor() and bool(self.get_option("use_api"))

    def _start(self, argv: list[str], stdin: bool = True) -> t.Any:
        """An ExecProcess running ``argv`` in the VM (its stdin open with ``stdin``)."""
        vmid = self.get_option("remote_addr")
        try:
            if self._listener is None:
                self._listener = find_listener(self.get_option("config") or None)
            request = ExecRequest(argv, user=self.get_option("remote_user") or "",
                                  stdin=stdin)
            return ExecProcess(self._listener, vmid, request)
        except (VMBusifyError, OSError) as exc:
            raise AnsibleConnectionFailure(f"{vmid}: {to_native(exc)}") from None

    def _api_exec(self, cmd: str, in_data: bytes | None, prompt: bool
                  ) -> tuple[int, bytes, bytes]:
        vmid = self.get_option("remote_addr")
        try:
            with self._start(["/bin/sh", "-c", cmd]) as proc:
                if prompt:
                    self._api_answer_prompt(proc)
                result = proc.communicate(in_data or b"")
        except (VMBusifyError, OSError) as exc:
            raise AnsibleConnectionFailure(f"{vmid}: {to_native(exc)}") from None
        return result.exit_code, result.stdout, result.stderr

    def _api_answer_prompt(self, proc: t.Any) -> None:
        """Become with a password, in-process: read until the prompt and send it."""
        become = self.become
        assert become is not None
        output = b""
        while not become.check_success(output) and not become.check_password_prompt(output):
            try:
                chunk = proc.read(self._play_context.timeout)
            except TimeoutError:
                raise AnsibleError("timeout waiting for the privilege escalation prompt: "
                                   + to_native(output)) from None
            if chunk is None:
                raise AnsibleError("privilege escalation ended before its prompt: "
                                   + to_native(output))
            output += chunk[1]
        if not become.check_success(output):
            password = become.get_option("become_pass", playcontext=self._play_context)
            proc.write(to_bytes(password or "", errors="surrogate_or_strict") + b"\n")

    def _api_put(self, source: t.BinaryIO, out_path: str) -> tuple[int, bytes]:
        with self._start(["/bin/sh", "-c", 'cat > "$1"', "sh", out_path]) as proc:
            while chunk := source.read(1 << 20):
                proc.write(chunk)
            result = proc.communicate(b"")
        return result.exit_code, result.stderr

    def _api_fetch(self, in_path: str, target: t.BinaryIO) -> tuple[int, bytes]:
        errors = b""
        with self._start(["cat", "--", in_path], stdin=False) as proc:
            for stream, chunk in proc:
                if stream is Stream.STDOUT:
                    target.write(chunk)
                elif len(errors) < 65536:
                    errors += chunk
        return proc.result.exit_code, errors

    # -- the way to the hypervisor -----------------------------------------------------------
    def _hypervisor(self) -> str:
        return str(self.get_option("hypervisor") or "")

    def _ssh_base(self) -> list[str]:
        """ssh's argv up to the destination, through this hypervisor's master connection."""
        return [self.get_option("ssh_executable"), *shlex.split(self.get_option("ssh_args")),
                "-o", f"ControlPath={self._control_path}", "-o", "BatchMode=yes"]

    def _connect(self) -> Connection:
        if self._connected:
            return self
        hypervisor = self._hypervisor()
        display.vvv(f"ESTABLISH VMBUSIFY CONNECTION TO {self.get_option('remote_addr')} ON "
                    f"{hypervisor or 'this machine'}", host=self.get_option("remote_addr"))
        if hypervisor:
            self._start_master(hypervisor)
        self._connected = True
        return self

    def _control_directory(self) -> str:
        """The ssh masters' directory; sets the ControlPath ``_ssh_base`` uses."""
        directory = os.path.expanduser(self.get_option("control_dir"))
        self._control_path = os.path.join(directory, "vmbusify-%C")
        return directory

    def _start_master(self, hypervisor: str) -> None:
        """Make sure an ssh master connection to the hypervisor is up (one per hypervisor,
        shared by every fork: a lock file keeps two forks from starting two)."""
        directory = self._control_directory()
        os.makedirs(directory, mode=0o700, exist_ok=True)
        base = self._ssh_base()
        with open(os.path.join(directory, ".vmbusify-master.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            check = subprocess.run([*base, "-O", "check", hypervisor], stdin=subprocess.DEVNULL,
                                   capture_output=True, check=False)
            if check.returncode == 0:
                return
            # -f: ssh goes to the background once connected; its stdio must not be ours
            # (a pipe it held would keep a caller waiting for EOF until it exits).
            master = subprocess.run(
                [*base, "-o", "ControlMaster=yes",
                 "-o", f"ControlPersist={int(self.get_option('control_persist'))}",
                 "-f", "-N", hypervisor],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                check=False, timeout=MASTER_TIMEOUT)
            if master.returncode != 0:
                raise AnsibleConnectionFailure(
                    f"cannot reach the hypervisor {hypervisor} over ssh: "
                    f"{to_native(master.stderr.strip()) or f'ssh exited {master.returncode}'}")

    def _exec_argv(self, argv: list[str], stdin: bool) -> list[str]:
        """The argv that runs ``argv`` in the VM: vmbusifyexec here, or through ssh."""
        command = [self.get_option("exec_path")]
        if self.get_option("config"):
            command += ["--config", self.get_option("config")]
        if stdin:
            command.append("-i")
        user = self.get_option("remote_user")
        if user:
            command += ["-u", user]
        command += [self.get_option("remote_addr"), "--", *argv]
        hypervisor = self._hypervisor()
        if not hypervisor:
            return command
        # ssh hands the remote shell one string: each word quoted.
        return [*self._ssh_base(), "-o", "ControlMaster=no", hypervisor, "--",
                shlex.join(command)]

    def _failed(self, what: str, returncode: int, stderr: bytes) -> AnsibleError:
        reason = to_native(stderr.strip()) or f"status {returncode}"
        if returncode == EXEC_FAILURE:
            return AnsibleConnectionFailure(f"{what}: {reason}")
        return AnsibleError(f"{what}: {reason}")

    # -- Ansible's four operations ------------------------------------------------------------
    def exec_command(self, cmd: str, in_data: bytes | None = None,
                     sudoable: bool = True) -> tuple[int, bytes, bytes]:
        """Run ``cmd`` (a shell command line) in the VM; ``in_data`` is its stdin
        (pipelining). vmbusifyexec's own failure (255 with its one line) is a connection
        failure, so Ansible marks the host unreachable."""
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        prompt = bool(sudoable and self.become and self.become.expect_prompt())
        if self._api():
            display.vvv(f"EXEC (vmbusify.client) {cmd}", host=self.get_option("remote_addr"))
            return self._api_exec(cmd, in_data, prompt)
        argv = self._exec_argv(["/bin/sh", "-c", cmd], stdin=in_data is not None or prompt)
        display.vvv(f"EXEC {shlex.join(argv)}", host=self.get_option("remote_addr"))
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        if prompt:
            self._answer_prompt(proc)
        stdout, stderr = proc.communicate(in_data)
        last = stderr.rstrip().rsplit(b"\n", 1)[-1]
        # vmbusifyexec's own failure (its one line, last), or ssh's on the way to the
        # hypervisor; a program's own 255 is its status.
        if proc.returncode == EXEC_FAILURE and last.startswith((b"vmbusifyexec: ", b"ssh: ")):
            raise AnsibleConnectionFailure(
                f"{self.get_option('remote_addr')}: {to_native(last)}")
        return proc.returncode, stdout, stderr

    def _answer_prompt(self, proc: subprocess.Popen[bytes]) -> None:
        """Become with a password: read until the prompt (or success) and send it."""
        assert proc.stdout is not None and proc.stderr is not None and proc.stdin is not None
        become = self.become
        assert become is not None
        for stream in (proc.stdout, proc.stderr):
            fcntl.fcntl(stream, fcntl.F_SETFL, fcntl.fcntl(stream, fcntl.F_GETFL) | os.O_NONBLOCK)
        output = b""
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            selector.register(proc.stderr, selectors.EVENT_READ)
            while not become.check_success(output) and not become.check_password_prompt(output):
                events = selector.select(self._play_context.timeout)
                if not events:
                    proc.kill()
                    raise AnsibleError("timeout waiting for the privilege escalation prompt: "
                                       + to_native(output))
                for key, _ in events:
                    chunk = key.fileobj.read()  # type: ignore[union-attr]
                    if not chunk:
                        proc.communicate()
                        raise AnsibleError("privilege escalation ended before its prompt: "
                                           + to_native(output))
                    output += chunk
        if not become.check_success(output):
            password = become.get_option("become_pass", playcontext=self._play_context)
            proc.stdin.write(to_bytes(password or "", errors="surrogate_or_strict") + b"\n")
            proc.stdin.flush()
        for stream in (proc.stdout, proc.stderr):
            fcntl.fcntl(stream, fcntl.F_SETFL,
                        fcntl.fcntl(stream, fcntl.F_GETFL) & ~os.O_NONBLOCK)

    def put_file(self, in_path: str, out_path: str) -> None:
        """Copy a local file to ``out_path`` in the VM (written by the connection's user)."""
        super().put_file(in_path, out_path)
        display.vvv(f"PUT {in_path} TO {out_path}", host=self.get_option("remote_addr"))
        if not os.path.isfile(to_bytes(in_path, errors="surrogate_or_strict")):
            raise AnsibleFileNotFound(f"file or module does not exist: {to_native(in_path)}")
        argv = self._exec_argv(["/bin/sh", "-c", 'cat > "$1"', "sh", out_path], stdin=True)
        with open(to_bytes(in_path, errors="surrogate_or_strict"), "rb") as source:
            if self._api():
                try:
                    returncode, stderr = self._api_put(source, out_path)
                except (VMBusifyError, OSError) as exc:
                    raise AnsibleConnectionFailure(f"failed to transfer {to_text(in_path)}: "
                                                   f"{to_native(exc)}") from None
            else:
                proc = subprocess.run(argv, stdin=source, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, check=False)
                returncode, stderr = proc.returncode, proc.stderr
        if returncode != 0:
            raise self._failed(f"failed to transfer {to_text(in_path)} to {out_path}",
                               returncode, stderr)

    def fetch_file(self, in_path: str, out_path: str) -> None:
        """Copy ``in_path`` in the VM to a local file."""
        super().fetch_file(in_path, out_path)
        display.vvv(f"FETCH {in_path} TO {out_path}", host=self.get_option("remote_addr"))
        argv = self._exec_argv(["cat", "--", in_path], stdin=False)
        b_out = to_bytes(out_path, errors="surrogate_or_strict")
        # A partial file of its own beside the target, renamed over it once complete.
        fd, partial = tempfile.mkstemp(prefix=os.path.basename(b_out) + b".",
                                       suffix=b".part", dir=os.path.dirname(b_out) or b".")
        with os.fdopen(fd, "wb") as target:
            if self._api():
                try:
                    returncode, stderr = self._api_fetch(in_path, target)
                except (VMBusifyError, OSError) as exc:
                    os.unlink(partial)
                    raise AnsibleConnectionFailure(f"failed to fetch {in_path}: "
                                                   f"{to_native(exc)}") from None
            else:
                proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=target,
                                      stderr=subprocess.PIPE, check=False)
                returncode, stderr = proc.returncode, proc.stderr
        if returncode != 0:
            os.unlink(partial)
            raise self._failed(f"failed to fetch {in_path}", returncode, stderr)
        os.chmod(partial, 0o644 & ~_umask())
        os.replace(partial, b_out)

    def reset(self) -> None:
        """``meta: reset_connection``: the next command reads the configuration and token
        again (after VMBusify was reconfigured or its token replaced) and verifies the
        listener again; a remote hypervisor's ssh master stops taking new commands (those
        running go on), so the next command starts a new one, as Ansible's ssh does."""
        self._listener = None
        hypervisor = self._hypervisor()
        if hypervisor:
            self._control_directory()
            display.vvv(f"STOP THE SSH MASTER TO {hypervisor}",
                        host=self.get_option("remote_addr"))
            subprocess.run([*self._ssh_base(), "-O", "stop", hypervisor],
                           stdin=subprocess.DEVNULL, capture_output=True, check=False)
        self.close()

    def close(self) -> None:
        """Nothing to close: the ssh master outlives the connection (ControlPersist)."""
        self._connected = False
