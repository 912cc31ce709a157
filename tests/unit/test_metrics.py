"""/metrics (docs/metrics.md): a guest's STATS is cleaned and bounded before it is kept, and
the exposition, parsed back with prometheus_client's own text parser, says what the status
says, with label values from a guest made harmless."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vmbusify.control.metrics import LABEL_MAX, Snapshot, label, render
from vmbusify.errors import RemoteProtocolError
from vmbusify.protocol.entities import Entity, TunnelMessage
from vmbusify.protocol.package import PackageDecoder, PackageType
from vmbusify.protocol.tunnel import MAX_STATS, STAT_NAME_MAX, Stats, flatten_stats


def _stats_payload(counters: Any) -> bytes:
    return bytes(msgpack.packb({"counters": counters}))


def test_a_hostile_stats_is_cleaned_and_bounded() -> None:
    hostile: dict[str, Any] = {f"n{i}": i for i in range(MAX_STATS * 4)}
    hostile.update({'x"} 1\nvmbusify_vm_up{vm="vm9': 5, "A" * 5000: 1, "nan": math.nan,
                    "inf": math.inf, "text": "12", "flag": True, "neg": -3})
    got = Stats.from_payload(_stats_payload(hostile)).counters
    assert len(got) == MAX_STATS
    assert all(len(k) <= STAT_NAME_MAX and "\n" not in k and '"' not in k for k in got)
    only = Stats.from_payload(_stats_payload({'x"} 1\nup{': 5, "nan": math.nan, "ok": 2,
                                              "flag": True})).counters
    assert only == {"x___1_up_": 5.0, "ok": 2.0}


def test_a_stats_package_round_trips_and_flatten_keeps_numbers_only() -> None:
    tree = {"mux": {"bytes_in": 10, "last_error": "boom", "dropped": {"no-route": 2}},
            "subnet": {"attached": True, "lease": None}}
    flat = flatten_stats(tree)
    assert flat == {"mux.bytes_in": 10.0, "mux.dropped.no-route": 2.0, "subnet.attached": 1.0}
    pkg = Stats(flat).package()
    assert (pkg.entity, pkg.message_id, pkg.type) == (
        Entity.TUNNEL, TunnelMessage.STATS, PackageType.MESSAGE)
    dec = PackageDecoder()
    dec.receive_data(pkg.encode())
    assert Stats.from_payload(next(iter(dec.packages())).payload).counters == flat
    with pytest.raises(RemoteProtocolError):  # not a map of counters: the peer's error
        Stats.from_payload(bytes(msgpack.packb({"counters": [1, 2]})))


def test_label_values_are_bounded_and_plain() -> None:
    assert label('a"b\nc\\d') == "a_b_c_d"
    assert len(label("x" * 1000)) == LABEL_MAX


def _families(text: bytes) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def _value(fams: dict[str, Any], sample: str, **labels: str) -> float:
    for fam in fams.values():
        for s in fam.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {sample} {labels}")


def test_the_exposition_says_what_the_status_says() -> None:
    status = {
        "vms": [
            {"vmid": "vm1", "state": "connected", "rtt_ms": 1.5, "bytes_in": 100,
             "bytes_out": 50, "connects": 3, "dropped": {"no-route": 2}, "read_yields": 1,
             "backlog_closes": 0, "queued_bytes": 0, "source": "libvirt",
             "peer_version": 'evil"}\n', "guest_stats": {"proxy.open": 4, 'q"\n': 1},
             "guest_stats_at": 1.0},
            {"vmid": "vm2", "state": "backoff", "rtt_ms": None, "bytes_in": 0,
             "bytes_out": 0, "connects": 0},
        ],
        "workers": [{"name": "proxy", "stats": {"open": 2, "vms": {"vm1": {"open": 2}},
                                                "limits": {"vm1": {"streams_refused": 7}}}},
                    {"name": "subnet", "stats": {"attached": {"vm1": {}}, "spoofed": 3}}],
        "worker_restarts": {"proxy": 2, "gone": 1},
    }
    programs = [{"name": "mux", "state": "RUNNING", "pid": 1, "uptime": 10},
                {"name": "proxy", "state": "BACKOFF", "pid": 0, "uptime": 0}]
    text = render(Snapshot(status, programs, {"ok": 5, "signaled": 1}, {"vm1": 2}))
    fams = _families(text)
    assert _value(fams, "vmbusify_vm_up", vm="vm1") == 1
    assert _value(fams, "vmbusify_vm_up", vm="vm2") == 0
    assert _value(fams, "vmbusify_vm_state", vm="vm2", state="backoff") == 1
    assert _value(fams, "vmbusify_vm_rtt_seconds", vm="vm1") == 0.0015
    assert _value(fams, "vmbusify_vm_received_bytes_total", vm="vm1") == 100
    assert _value(fams, "vmbusify_vm_sent_bytes_total", vm="vm1") == 50
    assert _value(fams, "vmbusify_vm_reconnects_total", vm="vm1") == 2
    assert _value(fams, "vmbusify_vm_dropped_packages_total", vm="vm1", reason="no-route") == 2
    assert _value(fams, "vmbusify_vm_streams_open", vm="vm1", worker="proxy") == 2
    assert _value(fams, "vmbusify_vm_streams_open", vm="vm1", worker="subnet") == 1
    assert _value(fams, "vmbusify_vm_streams_open", vm="vm1", worker="control") == 2
    assert _value(fams, "vmbusify_vm_limit_hits_total", vm="vm1", worker="proxy",
                  limit="streams_refused") == 7
    assert _value(fams, "vmbusify_worker_restarts_total", worker="proxy") == 2
    assert _value(fams, "vmbusify_worker_up", worker="gone") == 0
    assert _value(fams, "vmbusify_worker_stat", worker="subnet", name="spoofed") == 3
    assert _value(fams, "vmbusify_program_running", program="proxy") == 0
    assert _value(fams, "vmbusify_exec_total", **{"class": "ok"}) == 5
    assert _value(fams, "vmbusify_exec_total", **{"class": "failed"}) == 0
    assert _value(fams, "vmbusify_guest_stat", vm="vm1", name="proxy.open") == 4
    # A guest's text never makes a sample of its own or breaks the exposition.
    assert _value(fams, "vmbusify_vm_info", vm="vm1", peer_version="evil___") == 1
    assert _value(fams, "vmbusify_guest_stat", vm="vm1", name="q__") == 1
    assert sum(len(f.samples) for n, f in fams.items() if n == "vmbusify_vm_up") == 2


def test_without_the_mux_the_programs_and_exec_still_show() -> None:
    fams = _families(render(Snapshot({}, [{"error": "supervisord away"}], {}, {})))
    assert _value(fams, "vmbusify_exec_running") == 0
    assert not fams["vmbusify_vm_up"].samples


def test_the_grafana_dashboard_queries_only_metrics_the_page_has() -> None:
    """packaging/grafana/vmbusify.json parses, and every vmbusify_* name in its queries is a
    sample name /metrics renders (a renamed metric would leave a panel empty)."""
    path = Path(__file__).resolve().parents[2] / "packaging" / "grafana" / "vmbusify.json"
    dash = json.loads(path.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    used = {m for e in exprs for m in re.findall(r"vmbusify_[a-z_]+", e)}
    status = {"vms": [{"vmid": "vm1", "state": "connected", "rtt_ms": 1.0, "connects": 1,
                       "dropped": {"x": 1}, "guest_stats": {"a": 1}, "guest_stats_at": 1.0}],
              "workers": [{"name": "proxy", "stats": {"open": 1, "vms": {"vm1": {"open": 1}},
                                                      "limits": {"vm1": {"x": 1}}}}],
              "worker_restarts": {"proxy": 1}}
    programs = [{"name": "mux", "state": "RUNNING", "pid": 1, "uptime": 5}]
    page = _families(render(Snapshot(status, programs, {"ok": 1}, {"vm1": 2})))
    rendered = {s.name for f in page.values() for s in f.samples}
    assert used and used <= rendered, used - rendered
