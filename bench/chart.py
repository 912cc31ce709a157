#!/usr/bin/env python3
"""The picture bench/run draws of what it measured: each figure as a ratio to its anchor (or,
without one, to its goal), on a log scale, the goal marked, green where it is met and red
where not. matplotlib is a benchmark-only dependency (the bench extra: see bench/run's
docstring for the install line, which keeps bin/setup's editable mode)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Row


def chart_points(rows: list[Row]) -> list[tuple[str, float, float | None, str]]:
    """(label, ratio, goal as a ratio or None, "yes"/"no"/"") for each row that has a ratio."""
    out = []
    for r in rows:
        if r.ours is None or r.ours <= 0:
            continue
        goal: float | None
        if r.anchor:
            ratio, label = r.ours / r.anchor, f"{r.area}: {r.figure} / {r.anchor_name}"
            goal = r.goal_ratio if r.goal_ratio is not None else (
                r.goal_value / r.anchor if r.goal_value is not None else None)
        elif r.goal_value:
            ratio, label = r.ours / r.goal_value, f"{r.area}: {r.figure} / its goal"
            goal = 1.0
        else:
            continue
        out.append((label, ratio, goal, r.met.replace("*", "")))
    return out


def draw(rows: list[Row], path: Path, title: str) -> str | None:
    """Draw ``rows`` into ``path`` (PNG), their points beside it (``path`` with .json, to
    draw again with ``bench/chart.py PATH``); returns why not (no matplotlib), or None."""
    points = chart_points(rows)
    path.with_suffix(".json").write_text(json.dumps({"title": title, "points": points},
                                                    indent=1) + "\n")
    return draw_points(points, path, title)


def draw_points(points: list[tuple[str, float, float | None, str]], path: Path,
                title: str) -> str | None:
    """Draw ``points`` (chart_points) into ``path``; returns why not, or None."""
    try:
        import matplotlib  # a benchmark-only dependency: imported only to draw
    except ImportError:
        return ("matplotlib is not installed (the bench extra: bench/run's docstring): "
                "no picture drawn")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not points:
        return "no figure with a ratio: no picture drawn"
    colours = {"yes": "#3a923a", "no": "#c83737", "": "#8c8c8c"}
    fig, ax = plt.subplots(figsize=(13, 0.36 * len(points) + 1.6))
    ys = list(range(len(points)))[::-1]
    for y, (_, ratio, goal, met) in zip(ys, points, strict=True):
        ax.barh(y, ratio, left=0, color=colours[met], height=0.6)
        ax.text(ratio * 1.04, y, f"{ratio:.2f}", va="center", fontsize=7)
        if goal is not None:
            ax.plot([goal, goal], [y - 0.42, y + 0.42], color="black", linewidth=2)
    ax.axvline(1.0, color="#4060c0", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(ys, [p[0][:90] for p in points], fontsize=7)
    ax.set_xlabel("VMBusify / anchor, same run (log scale; dashed: the anchor; black bar: "
                  "the goal; green: met, red: not met, grey: no goal)", fontsize=8)
    ax.set_title(title, fontsize=8, loc="left")
    fig.subplots_adjust(left=0.40, right=0.97, top=1 - 0.5 / fig.get_figheight(),
                        bottom=0.7 / fig.get_figheight())
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main() -> None:
    """Draw the picture again from the points bench/run saved beside it."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("picture", type=Path, nargs="?",
                    default=Path(__file__).resolve().parents[1] / "docs" / "performance.png")
    args = ap.parse_args()
    saved = json.loads(args.picture.with_suffix(".json").read_text())
    why_not = draw_points([tuple(p) for p in saved["points"]], args.picture, saved["title"])
    sys.exit(why_not)


if __name__ == "__main__":
    main()
