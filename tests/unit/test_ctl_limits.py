"""`vmbusifyctl status` shows what each worker's link refused, reset or dropped per VM."""

from __future__ import annotations

import time
from typing import Any

from vmbusify.cli.ctl import render_status


def _status(workers: list[dict[str, Any]]) -> dict[str, Any]:
    return {"role": "host", "name": "h1", "version": "1", "pid": 10, "started": time.time(),
            "vms": [], "workers": workers, "programs": []}


def test_limit_counters_per_vm_are_shown() -> None:
    proxy = {"name": "proxy", "pid": 11, "entities": ["proxy-server"],
             "stats": {"open": 0, "limits": {"vm1": {"streams_refused": 3, "buffer_resets": 1},
                                             "vm2": {"bad_packages": 7}}}}
    lines = [line.strip() for line in render_status(_status([proxy])).splitlines()]
    assert "limits vm1: streams_refused 3, buffer_resets 1" in lines
    assert "limits vm2: bad_packages 7" in lines
