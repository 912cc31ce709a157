"""Prometheus ``/metrics`` (docs/metrics.md), served by the command listener on the host at
``[metrics] listen`` (off by default; docs/security.md, "Metrics").

Each scrape asks the mux for its status (VMs, workers, their counters, each guest's own
counters relayed in its STATS), supervisord for the programs, and reads the exec counters of
this process (the host half of exec runs here): nothing is kept between scrapes, so a
restarted program's counters start again at 0, as Prometheus expects of a counter.

Label values a guest chooses (its counter names, its version) are hostile text: they arrive
cleaned and bounded (vmbusify/protocol/tunnel.py, ``Stats``), and are cleaned again here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from vmbusify.control.context import ControlContext
from vmbusify.control.supervisor import program_states
from vmbusify.errors import ConfigError, VMBusifyError
from vmbusify.workers.exec.host import ExecService

try:  # a host extra: a machine without it serves no metrics, and says so in one line
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.exposition import CONTENT_TYPE_LATEST
except ImportError:  # pragma: no cover - exercised on a guest without the extra
    CollectorRegistry = None  # type: ignore[assignment,misc]

log = logging.getLogger("vmbusify.control.metrics")

#: A label value taken from a peer: at most this long, these characters.
LABEL_MAX = 64
_NOT_LABEL = re.compile(r"[^A-Za-z0-9_.:+-]")
#: Worker stats that are maps per VM (exported as their own metrics, or not at all).
_PER_VM = ("vms", "limits", "attached", "leases")
STATES = ("connected", "connecting", "backoff", "disconnected")


def label(text: object) -> str:
    """A label value from text another party chose: at most LABEL_MAX characters of
    ``[A-Za-z0-9_.:+-]``, any other character as ``_``."""
    return _NOT_LABEL.sub("_", str(text)[:LABEL_MAX])


def _num(value: Any) -> float | None:
    if isinstance(value, (int, float)) and math.isfinite(value):  # bool is an int: 0/1
        return float(value)
    return None


class Snapshot:
    """The metric families of one scrape (a prometheus_client custom collector)."""

    def __init__(self, status: dict[str, Any], programs: list[dict[str, Any]],
                 exits: dict[str, int], exec_running: dict[str, int]) -> None:
        self.status = status
        self.programs = programs
        self.exits = exits
        self.exec_running = exec_running

    def collect(self) -> Iterator[Metric]:
        """Every family, built from the snapshot."""
        yield from self._vms()
        yield from self._workers()
        yield from self._programs()
        yield from self._exec()

    def _vms(self) -> Iterator[Metric]:
        vms = self.status.get("vms") or []
        g = GaugeMetricFamily
        c = CounterMetricFamily
        up = g("vmbusify_vm_up", "1 while the VM's tunnel is connected", labels=["vm"])
        state = g("vmbusify_vm_state", "The VM's tunnel state (1 for the current one)",
                  labels=["vm", "state"])
        info = g("vmbusify_vm_info", "Where the VM was found and the release its guest runs",
                 labels=["vm", "source", "peer_version"])
        rtt = g("vmbusify_vm_rtt_seconds", "Last PING round trip", labels=["vm"])
        rx = c("vmbusify_vm_received_bytes", "Bytes received from the VM", labels=["vm"])
        tx = c("vmbusify_vm_sent_bytes", "Bytes sent to the VM", labels=["vm"])
        conns = c("vmbusify_vm_connects", "Tunnels established", labels=["vm"])
        recon = c("vmbusify_vm_reconnects", "Tunnels established after the first",
                  labels=["vm"])
        queued = g("vmbusify_vm_queued_bytes", "Bytes waiting to be written to the VM",
                   labels=["vm"])
        dropped = c("vmbusify_vm_dropped_packages", "Packages from the VM the mux dropped",
                    labels=["vm", "reason"])
        yields = c("vmbusify_vm_read_budget_yields", "Times the VM used up its read budget",
                   labels=["vm"])
        closes = c("vmbusify_vm_backlog_closes", "Tunnels closed: the VM did not read",
                   labels=["vm"])
        gstat = g("vmbusify_guest_stat", "A guest's own counter, relayed in its STATS",
                  labels=["vm", "name"])
        gage = g("vmbusify_guest_stats_age_seconds", "Seconds since the guest's last STATS",
                 labels=["vm"])
        now = time.time()
        for vm in vms:
            vmid = label(vm.get("vmid", ""))
            st = str(vm.get("state", ""))
            up.add_metric([vmid], 1.0 if st == "connected" else 0.0)
            for s in STATES:
                state.add_metric([vmid, s], 1.0 if st == s else 0.0)
            info.add_metric([vmid, label(vm.get("source") or "config"),
                             label(vm.get("peer_version") or "")], 1.0)
            if _num(vm.get("rtt_ms")) is not None:
                rtt.add_metric([vmid], float(vm["rtt_ms"]) / 1000)
            rx.add_metric([vmid], _num(vm.get("bytes_in")) or 0.0)
            tx.add_metric([vmid], _num(vm.get("bytes_out")) or 0.0)
            n = _num(vm.get("connects")) or 0.0
            conns.add_metric([vmid], n)
            recon.add_metric([vmid], max(0.0, n - 1))
            queued.add_metric([vmid], _num(vm.get("queued_bytes")) or 0.0)
            for reason, count in sorted((vm.get("dropped") or {}).items()):
                dropped.add_metric([vmid, label(reason)], _num(count) or 0.0)
            yields.add_metric([vmid], _num(vm.get("read_yields")) or 0.0)
            closes.add_metric([vmid], _num(vm.get("backlog_closes")) or 0.0)
            for name, value in sorted((vm.get("guest_stats") or {}).items()):
                if _num(value) is not None:
                    gstat.add_metric([vmid, label(name)[:100]], float(value))
            if _num(vm.get("guest_stats_at")):
                gage.add_metric([vmid], max(0.0, now - float(vm["guest_stats_at"])))
        yield from (up, state, info, rtt, rx, tx, conns, recon, queued, dropped, yields,
                    closes, gstat, gage)

    def _workers(self) -> Iterator[Metric]:
        workers = self.status.get("workers") or []
        restarts = self.status.get("worker_restarts") or {}
        up = GaugeMetricFamily("vmbusify_worker_up", "1 while the worker is registered with "
                               "the mux", labels=["worker"])
        rst = CounterMetricFamily("vmbusify_worker_restarts", "Times the worker registered "
                                  "again with another pid", labels=["worker"])
        stat = GaugeMetricFamily("vmbusify_worker_stat", "A worker's own counter (as "
                                 "vmbusifyctl status shows it)", labels=["worker", "name"])
        streams = GaugeMetricFamily("vmbusify_vm_streams_open", "Streams open with the VM",
                                    labels=["vm", "worker"])
        limits = CounterMetricFamily("vmbusify_vm_limit_hits", "Opens and requests refused, "
                                     "streams reset, packages dropped at a limit",
                                     labels=["vm", "worker", "limit"])
        names = sorted({str(w.get("name", "")) for w in workers} | set(restarts))
        for name in names:
            up.add_metric([label(name)], 1.0 if any(w.get("name") == name for w in workers)
                          else 0.0)
            rst.add_metric([label(name)], _num(restarts.get(name)) or 0.0)
        for w in workers:
            name = label(w.get("name", ""))
            stats = w.get("stats") or {}
            for key, value in sorted(stats.items()):
                if key not in _PER_VM and _num(value) is not None:
                    stat.add_metric([name, label(key)], float(value))
            for vmid, counters in sorted((stats.get("limits") or {}).items()):
                for counter, n in sorted(counters.items()):
                    limits.add_metric([label(vmid), name, label(counter)], _num(n) or 0.0)
            for vmid, per_vm in sorted((stats.get("vms") or {}).items()):  # the proxy
                if isinstance(per_vm, dict) and _num(per_vm.get("open")) is not None:
                    streams.add_metric([label(vmid), name], float(per_vm["open"]))
            for vmid in sorted(stats.get("attached") or {}):  # the subnet: one bearer
                if isinstance(stats["attached"], dict):
                    streams.add_metric([label(vmid), name], 1.0)
        for vmid, n in sorted(self.exec_running.items()):
            streams.add_metric([label(vmid), "control"], float(n))
        yield from (up, rst, stat, streams, limits)

    def _programs(self) -> Iterator[Metric]:
        running = GaugeMetricFamily("vmbusify_program_running", "1 while supervisord shows "
                                    "the program RUNNING", labels=["program"])
        started = GaugeMetricFamily("vmbusify_program_start_time_seconds", "When the program "
                                    "last started (a change is a restart)", labels=["program"])
        for p in self.programs:
            if "error" in p:
                continue
            running.add_metric([label(p["name"])], 1.0 if p["state"] == "RUNNING" else 0.0)
            if p.get("pid"):  # started (RUNNING or STARTING); uptime is whole seconds
                started.add_metric([label(p["name"])],
                                   float(int(time.time() - float(p.get("uptime") or 0))))
        yield from (running, started)

    def _exec(self) -> Iterator[Metric]:
        ended = CounterMetricFamily("vmbusify_exec", "Attached execs ended, by exit class",
                                    labels=["class"])
        for cls in sorted(set(self.exits) | {"ok", "failed"}):
            ended.add_metric([cls], float(self.exits.get(cls, 0)))
        running = GaugeMetricFamily("vmbusify_exec_running", "Attached execs running")
        running.add_metric([], float(sum(self.exec_running.values())))
        yield from (ended, running)


def render(snapshot: Snapshot) -> bytes:
    """The text exposition of one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(snapshot)  # type: ignore[arg-type]
    return bytes(generate_latest(registry))


METRICS_KEY = web.AppKey("metrics", ControlContext)
SERVICE_KEY = web.AppKey("metrics-exec", ExecService)


async def handle(request: web.Request) -> web.Response:
    """GET /metrics: every metric, gathered now."""
    ctx = request.app[METRICS_KEY]
    service = request.app[SERVICE_KEY]
    try:
        status = await ctx.link.control({"cmd": "status"}, timeout=10.0)
    except VMBusifyError as exc:  # the mux is restarting: the programs and exec still count
        log.info("metrics without the mux's status: %s", exc)
        status = {}
    loop = asyncio.get_running_loop()
    programs = await loop.run_in_executor(None, program_states, ctx.config)
    running: dict[str, int] = {}
    for vmid, _stream in service.relays:
        running[vmid] = running.get(vmid, 0) + 2  # main and side streams
    body = render(Snapshot(status, programs, dict(service.exits), running))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def start(ctx: ControlContext, service: ExecService) -> web.AppRunner | None:
    """Serve /metrics at ``[metrics] listen`` (None when it is off). ConfigError if it
    cannot listen there; a missing prometheus_client is one line in the log."""
    listen = ctx.config.metrics.listen
    if not listen:
        return None
    if CollectorRegistry is None:
        log.warning("[metrics] listen is set but prometheus_client is not installed "
                    "(vmbusify[host]): no /metrics")
        return None
    host, _, port = listen.rpartition(":")
    app = web.Application()
    app[METRICS_KEY] = ctx
    app[SERVICE_KEY] = service
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"metrics: cannot listen on {listen}: {exc.strerror or exc}") from None
    host_ip = host.strip("[]")
    loopback = host_ip in ("127.0.0.1", "::1") or host_ip.startswith("127.")
    (log.info if loopback else log.warning)(
        "metrics on http://%s/metrics%s", listen,
        "" if loopback else " (not loopback: whoever reaches it reads every VM's name, state "
        "and counters; docs/security.md)")
    return runner
