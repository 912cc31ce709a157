"""vmbusify.runtime: what every long-running program sets up before its loop."""

from __future__ import annotations

import gc

from vmbusify.runtime import GC_YOUNG, tune_gc


def test_tune_gc_freezes_the_start_and_collects_young_objects_less_often() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG, before[1], before[2])
        assert gc.get_freeze_count() > 0  # what was there at start is scanned no more
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
