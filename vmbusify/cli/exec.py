"""`vmbusifyexec`: run a program on a VM through the command listener (docs/exec.md).

    vmbusifyexec [OPTIONS] VMID [OPTIONS] [--] PROGRAM [ARGS...]

It is started once per command and its start is most of its latency, so it imports only light
standard modules and VMBusify's light ones: no asyncio, aiohttp, ZeroMQ or msgpack, and no
dataclasses, urllib, hashlib, queue or pathlib either (their imports cost more CPU than the
rest of the client; test_no_heavy_imports_in_the_client keeps it so). The configuration is read
by vmbusify.config_file, not the dataclass model; tomllib brings typing with it. It makes one
connection: a WebSocket to the listener whose opening request carries the exec right behind the
handshake.

Threads: the main thread reads the socket and writes stdout/stderr (a slow local reader
stops it, and with it the whole chain back to the remote program). A stdin thread (``-i``)
sends stdin. The forwarded signals are blocked in every thread and taken by a signal thread
(``sigwait``), which only queues a frame; a sender thread sends queued frames. Both sending
threads share one lock, so frames never interleave. (Not a Python signal handler: it runs in
the main thread only, between bytecodes, so a signal that came just before the main thread
entered ``recv`` waited there, unforwarded, until the remote program wrote again.)
"""

from __future__ import annotations

import os
import sys
import time

# The C modules under socket, signal and threading, queue.SimpleQueue itself: the Python
# modules around them load enum classes, selectors, functools and more (~5 ms of the start;
# docs/performance.md, "`vmbusifyexec true` against ssh").
from _queue import SimpleQueue
from _signal import (
    SIG_BLOCK,
    SIGHUP,
    SIGINT,
    SIGPIPE,
    SIGTERM,
    SIGWINCH,
    pthread_sigmask,
    sigwait,
)
from _socket import SHUT_RDWR
from _socket import socket as raw_socket
from _thread import allocate_lock, start_new_thread

from vmbusify import __version__
from vmbusify.cli.escape import EscapeFilter
from vmbusify.client.wire import post_detached, request_body
from vmbusify.control.exec_wire import (
    Failure,
    Listener,
    find_listener,
    open_exec_as,
    parse_status,
)
from vmbusify.control.json_light import dumps
from vmbusify.errors import VMBusifyError, exec_exit
from vmbusify.protocol.exec_api import EXIT_FAILURE, SIGNAL_BASE, Channel, ExitReason
from vmbusify.protocol.websocket import FrameDecoder, Opcode, close_payload, encode_frame
from vmbusify.text import for_terminal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

PROG = "vmbusifyexec"
USAGE = f"""\
Usage: {PROG} [OPTIONS] VMID [OPTIONS] [--] PROGRAM [ARGS...]
       {PROG} -i [-t] [OPTIONS] VMID

Run PROGRAM on the VM VMID (its vmid, or any IP address it reported) and relay its
stdout, stderr and exit status; with -i also stdin. With -i and no PROGRAM, the user's
login shell (as ssh does), on a pseudo-terminal when the local terminal is one.

Options:
  -i, --interactive      send stdin to the program (EOF closes its stdin)
  -t, --tty              run it on a pseudo-terminal (local terminal in raw mode)
      --tty=WHEN         always (-t), never, or auto: when stdin and stdout are
                         terminals (the default without PROGRAM, else never)
  -e, --env KEY=VAL      set an environment variable (repeatable; KEY alone: local value)
  -w, --workdir DIR      working directory (default: the user's home)
  -u, --user USER        run as USER (name or uid)
      --timeout SECONDS  kill the whole remote process tree after SECONDS (exit 124)
  -d, --detach           start it in the background, print its pid and return
      --config FILE      configuration file (default $VMBUSIFY_CONFIG,
                         /etc/vmbusify/vmbusify.toml, or the one lab running here)
      --completion SHELL
                         print the completion script for bash, zsh or fish
  -V, --version          print the version
  -h, --help             show this help

Exit status: the program's own; 128+N if it died of signal N; 124 --timeout expired;
126 it could not be started; 127 not found; 255 {PROG} failed (usage, command listener,
unknown, unreachable or lost VM). Ctrl-C, SIGTERM and SIGHUP are forwarded; three Ctrl-C
within 3 seconds give up (the remote process tree is killed). With -it on a terminal,
Ctrl-C is a key for the remote program; there ~. at the start of a line disconnects (the
remote process tree is killed) and ~~ types a ~.
"""
_SHORT = "ite:w:u:dhV"
_LONG = ["interactive", "tty", "tty-mode=", "env=", "workdir=", "user=", "timeout=", "detach",
         "config=", "completion=", "version", "help"]
#: Short options that take a value (the rest of the word, or the next word).
_SHORT_VALUES = "ewu"
#: Long options that take a value in the next word when not given with '='.
_LONG_VALUES = ("--env", "--workdir", "--user", "--timeout", "--config", "--completion")
#: --tty=WHEN.
TTY_MODES = ("always", "never", "auto")
#: What runs when -i is given without PROGRAM: the user's login shell, which the guest's exec
#: worker puts in SHELL (from the account, as sshd does); ``-l`` makes it a login shell in
#: every common shell (bash, zsh, dash, ash, fish).
LOGIN_SHELL = ["/bin/sh", "-c", 'exec "${SHELL:-/bin/sh}" -l']
FORWARDED = (SIGINT, SIGTERM, SIGHUP)
#: Their names as the SIGNAL message carries them (signal.Signals' without "SIG").
_SIGNAL_NAMES = {SIGINT: "INT", SIGTERM: "TERM", SIGHUP: "HUP"}
READ_SIZE = 1 << 20
STDIN_CHUNK = 256 << 10
#: Ctrl-C this many times within GIVE_UP_WINDOW seconds: stop waiting for the program.
GIVE_UP_AFTER = 3
GIVE_UP_WINDOW = 3.0
#: The remote terminal's size (rows, columns) for -t when no local terminal tells one.
DEFAULT_TTY_SIZE = (24, 80)


#: Endings that are the program's own: its status says it all, no message on stderr.
_QUIET = (ExitReason.EXITED.value, ExitReason.SIGNALED.value)


class UsageError(Exception):
    """A bad command line."""


class Options:
    """The parsed command line (a plain class: see the module's note on imports)."""

    def __init__(self, vmid: str = "", argv: list[str] | None = None, interactive: bool = False,
                 tty: bool = False, env: dict[str, str] | None = None, workdir: str = "",
                 user: str = "", timeout: float | None = None, detach: bool = False,
                 config: str | None = None, help: bool = False) -> None:
        #: --tty=WHEN as given ("" = not given); -t is "always".
        self.tty_mode = ""
        #: --version, --completion SHELL: print and exit.
        self.version = False
        self.completion = ""
        self.vmid = vmid
        self.argv = argv or []
        self.interactive = interactive
        self.tty = tty
        self.env = env or {}
        self.workdir = workdir
        self.user = user
        self.timeout = timeout
        self.detach = detach
        self.config = config
        self.help = help

    def request(self, rows: int = 0, cols: int = 0) -> dict[str, object]:
        """The exec request as JSON-ready data (the listener checks it: ExecSpec.from_body).

        Fields left at their defaults are left out, as ExecSpec.to_body does.
        """
        body = {"argv": self.argv, "env": self.env, "cwd": self.workdir, "user": self.user,
                "tty": self.tty, "stdin": self.interactive, "timeout": self.timeout,
                "detach": self.detach, "rows": rows, "cols": cols,
                "term": os.environ.get("TERM", "") if self.tty else ""}
        return {key: value for key, value in body.items() if value}


def _apply(opts: Options, pairs: list[tuple[str, str]]) -> None:
    for name, value in pairs:
        if name in ("-i", "--interactive"):
            opts.interactive = True
        elif name in ("-t", "--tty"):
            opts.tty_mode = "always"
        elif name == "--tty-mode":
            if value not in TTY_MODES:
                raise UsageError(f"--tty wants one of {', '.join(TTY_MODES)}, not {value!r}")
            opts.tty_mode = value
        elif name in ("-V", "--version"):
            opts.version = True
        elif name == "--completion":
            if value not in ("bash", "zsh", "fish"):
                raise UsageError(f"--completion wants bash, zsh or fish, not {value!r}")
            opts.completion = value
        elif name in ("-d", "--detach"):
            opts.detach = True
        elif name in ("-h", "--help"):
            opts.help = True
        elif name in ("-e", "--env"):
            key, eq, val = value.partition("=")
            if not key:
                raise UsageError(f"bad environment assignment {value!r} (expected KEY=VAL)")
            if eq:
                opts.env[key] = val
            elif key in os.environ:
                opts.env[key] = os.environ[key]
        elif name in ("-w", "--workdir"):
            opts.workdir = value
        elif name in ("-u", "--user"):
            opts.user = value
        elif name == "--config":
            opts.config = value
        elif name == "--timeout":
            try:
                opts.timeout = float(value)
            except ValueError:
                raise UsageError(f"--timeout wants a number of seconds, not {value!r}") from None
            if not 0 < opts.timeout < float("inf"):
                raise UsageError("--timeout must be more than 0 seconds")


def _spell_tty(args: list[str]) -> list[str]:
    """``--tty=WHEN`` as getopt takes it (``--tty-mode=WHEN``: getopt has no optional
    values), in the options before the first word that is not one; the rest as it is."""
    out = list(args)
    i = 0
    while i < len(out):
        word = out[i]
        if word == "--" or not word.startswith("-") or word == "-":
            break
        if word.startswith("--tty="):
            out[i] = "--tty-mode=" + word[len("--tty="):]
        elif word in _LONG_VALUES:
            i += 1
        elif not word.startswith("--"):
            for j, ch in enumerate(word[1:], 1):
                if ch in _SHORT_VALUES:
                    i += j == len(word) - 1  # the value is the next word
                    break
        i += 1
    return out


class _GetoptError(Exception):
    """getopt.GetoptError's message."""


def _getopt(args: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """``getopt.getopt(args, _SHORT, _LONG)``, the same pairs, rest and messages (a unit
    test compares them), without getopt's import of gettext and with it re (~1 ms)."""
    pairs: list[tuple[str, str]] = []
    while args and args[0].startswith("-") and args[0] != "-":
        word, args = args[0], args[1:]
        if word == "--":
            break
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            matches = [o for o in _LONG if o.startswith(name)]
            if not matches:
                raise _GetoptError(f"option --{name} not recognized")
            if name in matches or name + "=" in matches:
                takes = name not in matches
            elif len(matches) > 1:
                raise _GetoptError(f"option --{name} not a unique prefix")
            else:
                takes, name = matches[0].endswith("="), matches[0].rstrip("=")
            if takes and not eq:
                if not args:
                    raise _GetoptError(f"option --{name} requires argument")
                value, args = args[0], args[1:]
            elif not takes and eq:
                raise _GetoptError(f"option --{name} must not have an argument")
            pairs.append(("--" + name, value))
            continue
        letters = word[1:]
        while letters:
            letter, letters = letters[0], letters[1:]
            at = _SHORT.find(letter)
            if letter == ":" or at < 0:
                raise _GetoptError(f"option -{letter} not recognized")
            value = ""
            if _SHORT.startswith(":", at + 1):
                if not letters:
                    if not args:
                        raise _GetoptError(f"option -{letter} requires argument")
                    letters, args = args[0], args[1:]
                value, letters = letters, ""
            pairs.append(("-" + letter, value))
    return pairs, args


def parse_args(args: list[str]) -> Options:
    """Options may come before and after VMID; the first word after them is the program."""
    opts = Options()
    try:
        pairs, rest = _getopt(_spell_tty(args))
        _apply(opts, pairs)
        if opts.help or opts.version or opts.completion:
            return opts
        if not rest:
            raise UsageError("missing VMID and PROGRAM")
        opts.vmid = rest[0]
        pairs, rest = _getopt(_spell_tty(rest[1:]))
        _apply(opts, pairs)
    except _GetoptError as exc:
        raise UsageError(str(exc)) from None
    if opts.help or opts.version or opts.completion:
        return opts
    if not opts.vmid:
        raise UsageError("VMID is empty")
    if not rest:
        if not opts.interactive:
            raise UsageError("missing PROGRAM (or -i, or -it, for a login shell)")
        rest = LOGIN_SHELL
        opts.tty_mode = opts.tty_mode or "auto"
    mode = opts.tty_mode or "never"
    opts.tty = mode == "always" or (mode == "auto" and os.isatty(0) and os.isatty(1))
    opts.argv = rest
    if opts.detach and (opts.interactive or opts.tty):
        raise UsageError("-d cannot be combined with -i or -t")
    if opts.detach and opts.timeout is not None:
        raise UsageError("-d cannot be combined with --timeout (a detached program is not "
                         "watched)")
    return opts


# -- connection --------------------------------------------------------------------------------

def _listener(config_path: str | None) -> Listener:
    """This machine's command listener, read from the configuration (the lab's when one
    runs here and no configuration is given: cli/locate.py)."""
    # Imported here: vmbusifyexec's start is its latency, and a usage error needs none of
    # this (docs/exec.md, "A light client").
    from vmbusify.cli.locate import config_path as find_config

    return find_listener(find_config(config_path))


def _request_body(opts: Options, rows: int = 0, cols: int = 0) -> bytes:
    """The JSON request, or Failure when the listener would refuse it for its size."""
    return request_body(opts.request(rows, cols))


def run_detached(opts: Options) -> int:
    """-d: POST the request, print the pid."""
    answer = post_detached(_listener(opts.config), opts.vmid, _request_body(opts))
    _write_all(1, memoryview(f"{answer['pid']}\n".encode()))
    return 0


# -- the attached session -----------------------------------------------------------------------

class Session:
    """One attached exec over one WebSocket."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.sock: raw_socket | None = None
        self.decoder = FrameDecoder()
        self._send_lock = allocate_lock()
        self._control: SimpleQueue[tuple[Opcode, bytes] | None] = SimpleQueue()
        self._interrupts: list[float] = []
        self._saved_tty: list | None = None  # type: ignore[type-arg]
        self.gave_up = False
        #: The typed keys' escape filter (``~.``), on a terminal in raw mode only.
        self._escape: EscapeFilter | None = None
        self.escaped = False

    # -- sending (stdin thread and control thread) -------------------------------------------
    def send(self, payload: bytes, opcode: Opcode = Opcode.BINARY) -> None:
        frame = encode_frame(opcode, payload)
        with self._send_lock:
            assert self.sock is not None
            self.sock.sendall(frame)

    def _control_loop(self) -> None:
        while (item := self._control.get()) is not None:
            try:
                self.send(item[1], item[0])
            except OSError:
                return

    def _stdin_loop(self) -> None:
        try:
            while chunk := os.read(0, STDIN_CHUNK):
                if self._escape is not None:
                    chunk, disconnect = self._escape.feed(chunk)
                    if disconnect:
                        if chunk:
                            self.send(bytes([Channel.STDIN]) + chunk)
                        self._hang_up(escaped=True)
                        return
                    if not chunk:
                        continue
                self.send(bytes([Channel.STDIN]) + chunk)
            self.send(bytes([Channel.CLOSE, Channel.STDIN]))
        except OSError:
            pass  # the connection is gone: the main thread reports it

    # -- signals ---------------------------------------------------------------------------
    def _signal_loop(self, watched: list[int]) -> None:
        """Take the watched signals as they come (every thread blocks them)."""
        while True:
            self._on_signal(sigwait(watched))

    def _on_signal(self, signum: int) -> None:
        if signum == SIGWINCH:
            size = _term_size()
            if size:
                self._control.put((Opcode.BINARY, bytes([Channel.RESIZE]) + dumps(
                    {"rows": size[0], "cols": size[1]}).encode()))
            return
        if signum == SIGINT:
            now = time.monotonic()
            self._interrupts = [t for t in self._interrupts if now - t < GIVE_UP_WINDOW] + [now]
            if len(self._interrupts) >= GIVE_UP_AFTER:
                self._hang_up(escaped=False)
                return
        self._control.put((Opcode.BINARY, bytes([Channel.SIGNAL]) + dumps(
            {"signal": _SIGNAL_NAMES[signum]}).encode()))

    # -- life ------------------------------------------------------------------------------
    def open(self) -> None:
        """Connect, upgrade and send the request (one write, no wait in between)."""
        # A pty of 0x0 upsets full-screen programs: without a local terminal, the classic size.
        size = (_term_size() or DEFAULT_TTY_SIZE) if self.opts.tty else (0, 0)
        request = _request_body(self.opts, *size)
        self.sock = open_exec_as(raw_socket, _listener(self.opts.config), self.opts.vmid,
                                 request, self.decoder)

    def _hang_up(self, escaped: bool) -> None:
        """Stop from this end (three Ctrl-C, or ``~.``): the listener sees the connection
        end and the remote process tree is killed; the receive loop says why."""
        if escaped:
            self.escaped = True
        else:
            self.gave_up = True
        if self.sock is not None:
            self.sock.shutdown(SHUT_RDWR)

    def run(self) -> int:
        """Relay until the STATUS message; returns the exit status."""
        self.open()
        watched = [*FORWARDED, *([SIGWINCH] if self.opts.tty else [])]
        # Blocked before any thread starts (each inherits the mask): only sigwait takes them.
        # Plain threads (no threading module): main() ends with os._exit, nothing joins them.
        pthread_sigmask(SIG_BLOCK, watched)
        start_new_thread(self._signal_loop, (watched,))
        start_new_thread(self._control_loop, ())
        if self.opts.interactive:
            if self.opts.tty and os.isatty(0):
                self._raw_mode()
                self._escape = EscapeFilter()
            start_new_thread(self._stdin_loop, ())
        try:
            return self._receive_loop()
        finally:
            self._restore_tty()

    def _receive_loop(self) -> int:
        sock = self.sock
        assert sock is not None
        decoder = self.decoder
        while True:
            while (frame := decoder.next_frame()) is not None:
                status = self._on_frame(frame.opcode, frame.payload)
                if status is not None:
                    return status
            try:
                data = sock.recv(READ_SIZE)
            except OSError:
                data = b""
            if not data:
                if self.gave_up:
                    raise Failure("interrupted: gave up waiting; the remote process tree is "
                                  "killed", SIGNAL_BASE + SIGINT)
                if self.escaped:
                    raise Failure("disconnected (~.); the remote process tree is killed")
                raise Failure("lost the connection to the command listener")
            decoder.receive_data(data)

    def _on_frame(self, opcode: Opcode, payload: bytes) -> int | None:
        if opcode is Opcode.BINARY and payload:
            channel = payload[0]
            if channel == Channel.STDOUT:
                _write_all(1, memoryview(payload)[1:])
            elif channel == Channel.STDERR:
                _write_all(2, memoryview(payload)[1:])
            elif channel == Channel.STATUS:
                code, reason, message = parse_status(payload[1:])
                if reason not in _QUIET and message:
                    self._restore_tty()
                    _err(message)
                return code
        elif opcode is Opcode.PING:
            self._control.put((Opcode.PONG, payload))
        elif opcode is Opcode.CLOSE:
            code, reason = close_payload(payload)
            raise Failure(f"the command listener closed the exec ({code}"
                          f"{': ' + reason if reason else ''})")
        return None

    def _raw_mode(self) -> None:
        import termios
        import tty
        global _mid_line
        self._saved_tty = termios.tcgetattr(0)
        tty.setraw(0, termios.TCSANOW)
        _mid_line = True  # the remote program may leave the cursor anywhere (after a prompt)

    def _restore_tty(self) -> None:
        if self._saved_tty is not None:
            import termios
            termios.tcsetattr(0, termios.TCSADRAIN, self._saved_tty)
            self._saved_tty = None


def _term_size() -> tuple[int, int] | None:
    for fd in (0, 1, 2):
        try:
            size = os.get_terminal_size(fd)
            return size.lines, size.columns
        except OSError:
            continue
    return None


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


def _open_standard_fds() -> None:
    """Put /dev/null on whichever of fds 0, 1 and 2 is closed (as ssh does).

    Otherwise the listener's socket would become one of them: started with stdin closed,
    ``-i`` would read the socket as stdin and hang; with stdout or stderr closed, output
    would be written into the WebSocket and break it.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free fd: ``fd`` itself
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


#: Whether the terminal was in raw mode: a message then starts on a line of its own.
_mid_line = False


def _err(message: str) -> None:
    """One line on stderr; the reasons it carries may come from the guest, so control
    characters but newlines in them are escaped (they must not drive the operator's terminal)."""
    try:
        prefix = "\n" if _mid_line else ""
        os.write(2, f"{prefix}{PROG}: {for_terminal(message)}\n".encode(errors="replace"))
    except OSError:
        pass


def _print_and_exit(opts: Options) -> NoReturn:
    """--help, --version, --completion SHELL."""
    if opts.completion:
        from vmbusify.cli.completion import exec_script  # start-up time: only when asked
        text = exec_script(opts.completion)
    elif opts.version:
        text = f"{PROG} {__version__}\n"
    else:
        text = USAGE
    try:
        _write_all(1, memoryview(text.encode()))
    except OSError:
        pass
    sys.exit(0)


def _explain(exc: VMBusifyError, config: str | None) -> str:
    """What access a non-root user needs, or how to see a listener that is down, else the
    error's own text (cli/locate.py)."""
    # Imported here: only a failure needs it (start-up time: docs/exec.md "A light client").
    from vmbusify.cli.locate import explain
    return explain(PROG, exc, config)


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of the console script."""
    _open_standard_fds()
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        _err(f"{exc}\nTry '{PROG} --help'.")
        sys.exit(EXIT_FAILURE)
    if opts.help or opts.version or opts.completion:
        _print_and_exit(opts)
    try:
        code = run_detached(opts) if opts.detach else Session(opts).run()
    except Failure as exc:
        _err(str(exc))
        code = exc.exit_status
    except BrokenPipeError:
        code = SIGNAL_BASE + SIGPIPE  # our stdout went away: stop, as a shell pipe does
    except VMBusifyError as exc:
        _err(_explain(exc, opts.config))
        code = exec_exit(exc.code)
    except KeyboardInterrupt:
        code = SIGNAL_BASE + SIGINT
    except OSError as exc:
        _err(f"{exc.strerror or exc}")
        code = EXIT_FAILURE
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: the fd was closed when Python started
                stream.flush()
        except OSError:
            pass
    os._exit(code)  # daemon threads may sit in read(0): no interpreter teardown to wait for
