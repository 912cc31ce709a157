"""The lab's nftables clean-up (``lab down`` after a kill -9 of the subnet worker), without
root: the commands it would run, recorded instead of run."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence

import pytest

from vmbusify.lab import netns


def _recorder(present: bool, calls: list[list[str]]
              ) -> Callable[..., subprocess.CompletedProcess[str]]:
    """A stand-in for netns.run: records each command; `nft list` finds the table if
    ``present``."""
    def run(argv: Sequence[str], *, check: bool = True, **_: object
            ) -> subprocess.CompletedProcess[str]:
        calls.append(list(argv))
        listing = argv[:2] == ["nft", "list"]
        return subprocess.CompletedProcess(argv, 0 if present or not listing else 1, "", "")
    return run


def test_deletes_the_lab_table_when_it_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(netns, "run", _recorder(True, calls))
    assert netns.delete_nft_table("vmbusify-t1") is True
    assert calls == [["nft", "list", "table", "inet", "vmbusify-t1"],
                     ["nft", "delete", "table", "inet", "vmbusify-t1"]]


def test_touches_nothing_when_the_table_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(netns, "run", _recorder(False, calls))
    assert netns.delete_nft_table("vmbusify-t1") is False
    assert calls == [["nft", "list", "table", "inet", "vmbusify-t1"]]
