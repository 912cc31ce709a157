"""`vmbusifyctl`: the operator's view of the tunnels (through the command listener).

Exit codes: 0 success, 1 the command failed (the reason is printed on one line), 2 usage.
The status of a failure comes from its ErrorCode (vmbusify.errors.OUTCOMES, the one table).
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from typing import Any

import click

from vmbusify.cli.forward import forward
from vmbusify.config import load_config
from vmbusify.control.client import ControlClient, q
from vmbusify.errors import ErrorCode, VMBusifyError, ctl_exit
from vmbusify.logs import printable
from vmbusify.text import for_terminal


def _client(ctx: click.Context) -> ControlClient:
    return ctx.obj["client"]  # type: ignore[no-any-return]


def _fail(message: str, code: ErrorCode = ErrorCode.GENERIC) -> None:
    # The reason may be a guest's text (an ERROR ACK, a BYE): never raw on a terminal.
    click.echo(f"vmbusifyctl: {for_terminal(message)}", err=True)
    sys.exit(ctl_exit(code))


class _Group(click.Group):
    """Turns every VMBusifyError into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VMBusifyError as exc:
            _fail(str(exc), exc.code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="VMBUSIFY_CONFIG", default=None,
              help="Configuration file (default $VMBUSIFY_CONFIG or /etc/vmbusify/vmbusify.toml).")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """Inspect and steer VMBusify tunnels."""
    config = load_config(config_path)
    ctx.obj = {"config": config, "client": ControlClient(config)}


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
@click.pass_context
def list_vms(ctx: click.Context) -> None:
    """One line per VM: vmid, state, addresses."""
    for vm in _client(ctx).request("GET", "/v1/vms"):
        click.echo(f"{vm['vmid']}\t{vm['state']}\t{','.join(vm['ips']) or '-'}")


@main.command()
@click.argument("vmid")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait.")
@click.pass_context
def connect(ctx: click.Context, vmid: str, timeout: float) -> None:
    """Bring the tunnel to VMID up now."""
    vm = _client(ctx).request("POST", f"/v1/vms/{q(vmid)}/connect?timeout={timeout}",
                              timeout=timeout + 5)
    click.echo(f"{vm['vmid']}: {vm['state']}")


@main.command()
@click.argument("vmid")
@click.pass_context
def disconnect(ctx: click.Context, vmid: str) -> None:
    """Drop the tunnel to VMID and keep it down until it is needed again."""
    vm = _client(ctx).request("POST", f"/v1/vms/{q(vmid)}/disconnect")
    click.echo(f"{vm['vmid']}: {vm['state']}")


@main.command()
@click.argument("ip")
@click.pass_context
def vmid(ctx: click.Context, ip: str) -> None:
    """Print the vmid of the VM that reported IP."""
    click.echo(_client(ctx).request("GET", f"/v1/vmid/{q(ip)}")["vmid"])


@main.command()
@click.argument("vmid")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for a PONG.")
@click.pass_context
def ping(ctx: click.Context, vmid: str, timeout: float) -> None:
    """Round-trip time of one PING through the tunnel to VMID."""
    r = _client(ctx).request("POST", f"/v1/vms/{q(vmid)}/ping?timeout={timeout}",
                             timeout=timeout + 5)
    click.echo(f"{r['vmid']}: rtt {r['rtt_ms']:.3f} ms")


@main.command()
@click.pass_context
def reload(ctx: click.Context) -> None:
    """Read the configuration again: add and drop VMs, keeping the others' sessions."""
    r = _client(ctx).request("POST", "/v1/reload", timeout=75)
    click.echo(f"added {', '.join(r['added']) or 'none'}; dropped "
               f"{', '.join(r['dropped']) or 'none'}; kept {len(r['kept'])}")
    if r.get("restart_needed"):
        click.echo("changed, applied at the next restart: " + ", ".join(r["restart_needed"]))


# `forward` is a command of its own module.
main.add_command(forward)
