"""bench/subnet.py's proof of what 1.5x slirp4netns asks of the subnet's CPU (sans-I/O)."""

from __future__ import annotations

import pytest

from bench.subnet import GOAL, Budget, Usage, budget_for


def _run(gbps: float, user: float, sys_: float, main_sys: float, rest: float) -> tuple[
        float, Usage, float]:
    return gbps, Usage(user, sys_, main_sys, rest, user + sys_ + rest), 5.0


def test_the_budget_is_the_cores_time_per_gb_at_the_goal_less_the_rest_of_the_path() -> None:
    runs = [_run(2.0, 2.0, 1.2, 1.0, 0.4), _run(2.2, 1.8, 1.1, 0.9, 0.3),
            _run(1.8, 2.2, 1.3, 1.1, 0.5)]
    b = budget_for(4.0, runs, cores=2)
    assert b.target_gbps == pytest.approx(GOAL * 4.0)
    # 2 cores / (6 Gbit/s = 0.75 GB/s) = 2.67 CPU-s/GB for everything on the path
    assert b.rest == pytest.approx(0.4)
    assert b.budget == pytest.approx(2 / 0.75 - 0.4)
    assert b.spent == pytest.approx(3.2)
    assert b.kernel == pytest.approx(1.0)
    assert b.busy_cores == pytest.approx(3.6 * 2.0 / 8)


def test_the_verdict_says_unreachable_when_the_kernel_work_alone_is_over_the_budget() -> None:
    over = Budget(target_gbps=9.0, rest=0.4, budget=0.9, spent=3.5, kernel=1.1, busy_cores=2)
    assert "not reachable here" in over.lines("ext -> VM", 2)[1]
    short = Budget(target_gbps=5.0, rest=0.4, budget=2.0, spent=3.0, kernel=1.0, busy_cores=2)
    verdict = short.lines("VM -> ext", 2)[1]
    assert "needs 1.00 CPU-s/GB less" in verdict and "50%" in verdict
    room = Budget(target_gbps=5.0, rest=0.4, budget=3.5, spent=3.0, kernel=1.0, busy_cores=1)
    assert "within the budget" in room.lines("VM -> ext", 2)[1]
