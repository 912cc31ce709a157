"""`vmbusifyctl`: the operator's view of the tunnels (through the command listener).

Exit codes: 0 success, 1 the command failed (the reason is printed on one line), 2 usage.
The status of a failure comes from its ErrorCode (vmbusify.errors.OUTCOMES, the one table).
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from vmbusify import __version__
from vmbusify.cli import locate
from vmbusify.cli.completion import complete_vmids, exec_script
from vmbusify.control.client import ControlClient, q
from vmbusify.errors import ErrorCode, VMBusifyError, ctl_exit
from vmbusify.text import for_terminal, printable

if TYPE_CHECKING:
    from vmbusify.config import Config

PROG = "vmbusifyctl"


class Endpoint:
    """What a command works on, each part loaded when a command first asks for it: the few
    keys a client of the command listener needs (``settings``, read with config_file), the
    whole checked configuration (``config``: vmbusify.config, for ``forward``), the listener's
    client. ``completion`` and ``--help`` need none of them (docs/cli.md "Start-up time")."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._path: tuple[str | None] | None = None
        self._settings: locate.Settings | None = None
        self._config: Config | None = None
        self._client: ControlClient | None = None

    @property
    def path(self) -> str | None:
        """The configuration file (cli/locate.py finds it; None: the defaults)."""
        if self._path is None:
            self._path = (locate.config_path(self.config_path),)
        return self._path[0]

    @property
    def settings(self) -> locate.Settings:
        """The listener's address, its token file, run_dir and the granted group."""
        if self._settings is None:
            self._settings = locate.Settings(self.path)
        return self._settings

    @property
    def config(self) -> Config:
        """This endpoint's whole configuration, checked (vmbusify.config)."""
        if self._config is None:
            from vmbusify.config import load_config  # start-up time: forward's alone
            self._config = load_config(self.path)
        return self._config

    @property
    def client(self) -> ControlClient:
        """The command listener's client."""
        if self._client is None:
            st = self.settings
            self._client = ControlClient.for_listener(st.listen, st.token_path)
        return self._client

    def __getitem__(self, key: str) -> Any:
        """``ctx.obj["config"]``, ``ctx.obj["client"]``: as commands wrote it before."""
        if key not in ("config", "client"):
            raise KeyError(key)
        return getattr(self, key)


def _endpoint(ctx: click.Context) -> Endpoint:
    return ctx.find_root().obj  # type: ignore[no-any-return]


def _client(ctx: click.Context) -> ControlClient:
    return _endpoint(ctx).client


def _fail(message: str, code: ErrorCode = ErrorCode.GENERIC) -> None:
    # The reason may be a guest's text (an ERROR ACK, a BYE): never raw on a terminal.
    click.echo(f"{PROG}: {for_terminal(message)}", err=True)
    sys.exit(ctl_exit(code))


def _emit(as_json: bool, data: Any, text: str) -> None:
    """``data`` as JSON (``--json``: indented, keys as the listener gives them) or ``text``."""
    click.echo(json.dumps(data, indent=2) if as_json else text)


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print the answer as JSON (docs/cli.md lists its keys).")

#: Commands whose module is loaded only when one of them runs (or its help is asked for):
#: name -> (loader, one-line help for the command list). ``forward`` brings asyncio, msgpack
#: (through bus/frames) and the SOCKS code, which no other command needs: loading it for every
#: command cost each start about half its time (docs/cli.md "Start-up time").
LAZY: dict[str, tuple[Callable[[], click.Command], str]] = {}


def lazy(name: str, short_help: str) -> Callable[[Callable[[], click.Command]],
                                                 Callable[[], click.Command]]:
    """Register a command whose module loads only when it runs: decorate a function that
    imports the command (inside the function) and returns it."""
    def register(loader: Callable[[], click.Command]) -> Callable[[], click.Command]:
        LAZY[name] = (loader, short_help)
        return loader
    return register


class _Group(click.Group):
    """Turns every VMBusifyError into one line on stderr and exit code 1, and loads the
    LAZY commands when they are used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in LAZY:
            command = LAZY[cmd_name][0]()
            self.add_command(command, cmd_name)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in LAZY and name not in self.commands:
                rows.append((name, LAZY[name][1]))
                continue
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VMBusifyError as exc:
            # A non-root user is told what access is needed, a listener that is down comes
            # with a command that shows it (cli/locate.py).
            _fail(locate.explain(PROG, exc, _endpoint(ctx).config_path), exc.code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="VMBUSIFY_CONFIG", default=None,
              help="Configuration file (default $VMBUSIFY_CONFIG, /etc/vmbusify/vmbusify.toml, "
                   "or the one lab running here).")
@click.version_option(__version__, "-V", "--version", prog_name=PROG,
                      message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """Inspect and steer VMBusify tunnels."""
    ctx.obj = Endpoint(config_path)


vmid_argument = click.argument("vmid", shell_complete=complete_vmids)


def _age(since: float | None) -> str:
    if not since:
        return "-"
    secs = int(time.time() - since)
    return str(datetime.timedelta(seconds=max(0, secs)))


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f}TiB"


def _counter(key: str, value: Any) -> str:
    if key.startswith("bytes_") and isinstance(value, int):
        return f"{key.removeprefix('bytes_')} {_bytes(value)}"
    return f"{key} {value}"


def _counters(d: dict[str, Any]) -> str:
    return ", ".join(_counter(k, v) for k, v in d.items()
                     if v is not None and not isinstance(v, (dict, list)))


def _render_stats(stats: dict[str, Any]) -> list[str]:
    """The counters a worker publishes, one line for its plain values and one per group:
    ``vms`` (per-VM counters: the proxy's connections, ...) as ``VMID: ...``, any other
    mapping (the subnet's leases, its attached VMs, a guest's lease) as ``NAME ...``."""
    lines: list[str] = []
    plain = _counters({k: v for k, v in stats.items() if k != "role"})
    if plain:
        lines.append(plain)
    for key, value in stats.items():
        if not isinstance(value, dict) or not value:
            continue
        if all(isinstance(v, dict) for v in value.values()):
            prefix = "" if key == "vms" else f"{key} "
            lines += [f"{prefix}{sub}: {_counters(v)}" for sub, v in value.items()]
        else:
            lines.append(f"{key}: {_counters(value)}")
    return lines


def _guard_counters(vm: dict[str, Any]) -> str:
    """What the mux refused or held back from one VM, e.g. ``dropped wrong-type 3,
    foreign-entity 1; read budget used up 12 times; closed for backlog 1 time`` ("" if none)."""
    parts = []
    dropped = {k: v for k, v in (vm.get("dropped") or {}).items() if v}
    if dropped:
        parts.append("dropped " + ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())))
    if vm.get("read_yields"):
        parts.append(f"read budget used up {vm['read_yields']} times")
    if vm.get("backlog_closes"):
        n = vm["backlog_closes"]
        parts.append(f"closed for backlog {n} time{'s' if n != 1 else ''}")
    return "; ".join(parts)


def render_status(st: dict[str, Any]) -> str:
    """The human form of `vmbusifyctl status`."""
    title = (f"{st['role']} {st['name']} (vmbusify {st['version']}, mux pid {st['pid']}, "
             f"up {_age(st['started'])})")
    lines = [title, ""]
    header = f"{'VMID':<20} {'STATE':<13} {'RTT':>9} {'UP':>9} {'IN':>10} {'OUT':>10}  IPS"
    lines.append(header)
    for vm in st["vms"]:
        rtt = f"{vm['rtt_ms']:.2f}ms" if vm.get("rtt_ms") is not None else "-"
        up = _age(vm["connected_since"]) if vm["state"] == "connected" else "-"
        lines.append(f"{vm['vmid']:<20} {vm['state']:<13} {rtt:>9} {up:>9} "
                     f"{_bytes(vm['bytes_in']):>10} {_bytes(vm['bytes_out']):>10}  "
                     f"{', '.join(vm['ips']) or '-'}")
        if vm["state"] != "connected" and vm.get("last_error"):
            lines.append(f"{'':<20} last error: {printable(vm['last_error'], 500)}")
        for refused in vm.get("ips_refused") or []:
            lines.append(f"{'':<20} not held: {printable(refused.get('ip'))} "
                         f"({printable(refused.get('reason'))})")
        guard = _guard_counters(vm)
        if guard:
            lines.append(f"{'':<20} {guard}")
    lines += ["", "workers:"]
    for w in st.get("workers", []):
        lines.append(f"  {w['name']:<10} pid {w['pid']:<8} {', '.join(w['entities'])}")
        lines += [f"    {line}" for line in _render_stats(w.get("stats") or {})]
    if not st.get("workers"):
        lines.append("  (none registered)")
    lines += ["", "programs:"]
    for p in st.get("programs", []):
        if "error" in p:
            lines.append(f"  {p['error']}")
        else:
            lines.append(f"  {p['name']:<10} {p['state']:<10} pid {p['pid']}")
    return "\n".join(lines)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the full status as JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """This endpoint's tunnels, workers and programs."""
    st = _client(ctx).request("GET", "/v1/status")
    click.echo(json.dumps(st, indent=2) if as_json else render_status(st))


@main.command("list")
@json_option
@click.option("-q", "--quiet", is_flag=True, help="Print the VM ids only, one a line.")
@click.pass_context
def list_vms(ctx: click.Context, as_json: bool, quiet: bool) -> None:
    """One line per VM: vmid, state, addresses."""
    vms = _client(ctx).request("GET", "/v1/vms")
    if quiet and not as_json:
        _emit(False, vms, "\n".join(vm["vmid"] for vm in vms))
        return
    _emit(as_json, vms, "\n".join(f"{vm['vmid']}\t{vm['state']}\t{','.join(vm['ips']) or '-'}"
                                   for vm in vms))


@main.command()
@vmid_argument
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait.")
@json_option
@click.pass_context
def connect(ctx: click.Context, vmid: str, timeout: float, as_json: bool) -> None:
    """Bring the tunnel to VMID up now."""
    vm = _client(ctx).request("POST", f"/v1/vms/{q(vmid)}/connect?timeout={timeout}",
                              timeout=timeout + 5)
    _emit(as_json, vm, f"{vm['vmid']}: {vm['state']}")


@main.command()
@vmid_argument
@json_option
@click.pass_context
def disconnect(ctx: click.Context, vmid: str, as_json: bool) -> None:
    """Drop the tunnel to VMID and keep it down until it is needed again."""
    vm = _client(ctx).request("POST", f"/v1/vms/{q(vmid)}/disconnect")
    _emit(as_json, vm, f"{vm['vmid']}: {vm['state']}")


@main.command()
@click.argument("ip")
@json_option
@click.pass_context
def vmid(ctx: click.Context, ip: str, as_json: bool) -> None:
    """Print the vmid of the VM that reported IP."""
    found = _client(ctx).request("GET", f"/v1/vmid/{q(ip)}")["vmid"]
    _emit(as_json, {"ip": ip, "vmid": found}, found)


@main.command()
@vmid_argument
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for a PONG.")
@json_option
@click.pass_context
def ping(ctx: click.Context, vmid: str, timeout: float, as_json: bool) -> None:
    """Round-trip time of one PING through the tunnel to VMID."""
    r = _client(ctx).request("POST", f"/v1/vms/{q(vmid)}/ping?timeout={timeout}",
                             timeout=timeout + 5)
    _emit(as_json, r, f"{r['vmid']}: rtt {r['rtt_ms']:.3f} ms")


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the completion script of vmbusifyctl and vmbusifyexec for SHELL.

    \b
    bash:  source <(vmbusifyctl completion bash)      (in ~/.bashrc)
    zsh:   source <(vmbusifyctl completion zsh)       (after compinit)
    fish:  vmbusifyctl completion fish | source
    """
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    root = ctx.find_root()
    ours = cls(root.command, {}, PROG, "_VMBUSIFYCTL_COMPLETE").source()
    click.echo(ours.rstrip("\n") + "\n\n" + exec_script(shell), nl=False)


@lazy("forward", "Forward a local port to TARGET:TARGET_PORT as seen from VMID (like ssh -L).")
def _forward() -> click.Command:
    # Imported here: asyncio, msgpack and the SOCKS code are forward's alone (start-up time).
    from vmbusify.cli.forward import forward
    return forward


@lazy("cp", "Copy files into or out of a VM (like scp; docs/files.md).")
def _cp() -> click.Command:
    # Imported here: the copy's code (and the configuration model) is cp's alone.
    from vmbusify.cli.cp import cp
    return cp


@main.command()
@json_option
@click.pass_context
def reload(ctx: click.Context, as_json: bool) -> None:
    """Read the configuration again: add and drop VMs, keeping the others' sessions."""
    r = _client(ctx).request("POST", "/v1/reload", timeout=75)
    text = (f"added {', '.join(r['added']) or 'none'}; dropped "
            f"{', '.join(r['dropped']) or 'none'}; kept {len(r['kept'])}")
    if r.get("restart_needed"):
        text += "\nchanged, applied at the next restart: " + ", ".join(r["restart_needed"])
    _emit(as_json, r, text)
