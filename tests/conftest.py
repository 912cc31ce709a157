"""Suite-wide test set-up.

Markers (declared in pyproject.toml): tests marked ``@pytest.mark.root`` or
``@pytest.mark.lab`` need root (network namespaces, TUN, nftables) and are skipped with the
reason "needs root (network namespaces)" otherwise. A test that uses the ``lab`` or ``lab_up``
fixture (tests/e2e/conftest.py) counts as marked ``lab`` even without the marker.
"""

from __future__ import annotations

import os

import pytest

NEEDS_ROOT = "needs root (network namespaces)"
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
