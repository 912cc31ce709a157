"""Suite-wide test set-up.

Markers (declared in pyproject.toml): tests marked ``@pytest.mark.root`` or
``@pytest.mark.lab`` need root (network namespaces, TUN, nftables) and are skipped with the
reason "needs root (network namespaces)" otherwise. A test that uses the ``lab`` or ``lab_up``
fixture (tests/e2e/conftest.py) counts as marked ``lab`` even without the marker.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

NEEDS_ROOT = "needs root (network namespaces)"

# The suite runs on shared, often busy machines (CI among them): Hypothesis's timing checks
# (a 200 ms deadline per example, "input generation is slow") then fail tests whose property
# holds. What the properties check does not depend on speed, so those two checks are off.
settings.register_profile(
    "vmbusify", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("vmbusify")
_LAB_FIXTURES = {"lab", "lab_up"}


def is_root() -> bool:
    """Whether this process may make network namespaces."""
    return os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _LAB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.lab)
    if is_root():
        return
    skip = pytest.mark.skip(reason=NEEDS_ROOT)
    for item in items:
        if item.get_closest_marker("root") or item.get_closest_marker("lab"):
            item.add_marker(skip)
