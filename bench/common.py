"""What bench/run shares: the machine's description, one row of the results table, running
an area's benchmark script and reading its figures from what it prints."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
PY = sys.executable


@dataclass(frozen=True)
class Machine:
    """Where and when the figures were measured."""

    date: str
    cores: int
    mem_total_gib: float
    mem_available_gib: float
    kernel: str
    python: str
    load_average: float
    #: Processes of other lab stacks running at the same time (the machine is shared).
    other_supervisords: int

    @staticmethod
    def now(own_run_dir_prefix: str) -> Machine:
        mem = psutil.virtual_memory()
        others = 0
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "supervisord" in cmd and own_run_dir_prefix not in cmd:
                others += 1
        return Machine(
            date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            cores=os.cpu_count() or 0, mem_total_gib=mem.total / 2**30,
            mem_available_gib=mem.available / 2**30, kernel=platform.release(),
            python=platform.python_version(), load_average=os.getloadavg()[0],
            other_supervisords=others)

    def describe(self) -> str:
        return (f"{self.date}; {self.cores} cores, {self.mem_total_gib:.0f} GiB "
                f"({self.mem_available_gib:.0f} GiB available at the start), Linux "
                f"{self.kernel}, Python {self.python}; load average {self.load_average:.1f} "
                f"at the start; {self.other_supervisords} other supervisords (other engineers' "
                "labs) running on the machine")


@dataclass(frozen=True)
class Row:
    """One figure beside its anchor, measured in the same run."""

    area: str
    figure: str
    ours: float | None
    anchor: float | None = None
    anchor_name: str = ""
    unit: str = ""
    #: A test of ``ours`` (and the anchor), and its text: e.g. ``("<= 0.25 x ssh", fn)``.
    goal: str = ""
    goal_met: Callable[[float, float | None], bool] | None = None
    note: str = ""
    #: The goal as a number, for the picture (bench/chart.py): a ratio to the anchor, or a
    #: value in ``unit`` (drawn as a ratio to the anchor, or to itself without one).
    goal_ratio: float | None = None
    goal_value: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.anchor:
            return None
        return self.ours / self.anchor

    @property
    def met(self) -> str:
        if self.goal_met is None or self.ours is None:
            return ""
        return "yes" if self.goal_met(self.ours, self.anchor) else "**no**"


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    text = f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{text} {unit}".strip()


def markdown_table(rows: list[Row]) -> str:
    out = ["| area | figure | VMBusify | anchor (same run) | ratio | goal | met? |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        anchor = f"{fmt(r.anchor, r.unit)} ({r.anchor_name})" if r.anchor is not None else (
            r.anchor_name or "—")
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "—"
        figure = r.figure + (f" ({r.note})" if r.note else "")
        cells = [r.area, figure, fmt(r.ours, r.unit), anchor, ratio, r.goal or "—",
                 r.met or "—"]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


def text_table(rows: list[Row]) -> str:
    lines = [f"{'figure':<52} {'VMBusify':>12} {'anchor':>12} {'ratio':>6}  goal / met"]
    for r in rows:
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        lines.append(f"{(r.area + ': ' + r.figure)[:52]:<52} {fmt(r.ours, r.unit):>12} "
                     f"{fmt(r.anchor, r.unit) if r.anchor is not None else '-':>12} "
                     f"{ratio:>6}  {r.goal or '-'} {r.met.replace('*', '')}")
    return "\n".join(lines)


@dataclass
class Script:
    """One area's benchmark script, run as a subprocess; its output and how long it took."""

    name: str
    argv: list[str]
    output: str = ""
    seconds: float = 0.0
    error: str = ""

    def run(self, timeout: float = 1800) -> Script:
        t0 = time.monotonic()
        print(f"bench/run: {self.name}: {' '.join(self.argv)}", flush=True)
        try:
            proc = subprocess.run([PY, str(BENCH / self.argv[0]), *self.argv[1:]],
                                  capture_output=True, text=True, timeout=timeout, check=False,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            self.error = f"timed out after {timeout:g} s"
        else:
            self.output = proc.stdout
            if proc.returncode != 0:
                self.error = (f"exit {proc.returncode}: "
                              f"{(proc.stderr or proc.stdout).strip()[-600:]}")
        self.seconds = time.monotonic() - t0
        for line in self.output.rstrip().splitlines():
            print(f"    {line}", flush=True)
        if self.error:
            print(f"    FAILED: {self.error}", flush=True)
        return self

    def find(self, pattern: str, group: int = 1) -> float | None:
        """The number ``pattern`` captures in the output (None if it is not there)."""
        m = re.search(pattern, self.output, re.MULTILINE)
        return float(m.group(group)) if m else None
