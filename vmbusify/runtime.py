"""What every long-running VMBusify program shares: its event loop and its stop signal."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import signal
from collections.abc import Coroutine
from typing import Any

#: glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Buffers up to this size (a payload is at most 1 MiB) come from the heap and are reused,
#: not mapped and unmapped each time.
_MMAP_THRESHOLD = 4 << 20
#: Free memory at the top of the heap kept for reuse (per process) before it is returned.
_TRIM_THRESHOLD = 32 << 20
#: Allocations (less deallocations) of container objects between two young collections:
#: Python's default, 700, made a burst of 1,000 proxy connections (a few tasks, futures and
#: handles each) run the collector, old generations included, 8-18 % of a proxy's CPU.
GC_YOUNG = 20_000


def keep_buffers_mapped() -> bool:
    """Have glibc reuse freed payload buffers instead of returning them to the kernel.

    Every package's payload is a fresh buffer of up to 1 MiB. By default glibc maps such a
    buffer and unmaps it when freed, or trims the heap under it, so the next one page-faults
    its way in again: that cost as much CPU as moving the bytes. The memory kept is bounded
    by the flow-control windows in flight, and at most _TRIM_THRESHOLD of it stays with the
    process when idle. A no-op (False) where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the kernel (glibc ``malloc_trim``), e.g. after a
    gone peer's queue of payloads was dropped: the heap keeps freed buffers for reuse (see
    keep_buffers_mapped), which after a flood can be gigabytes. False where not glibc."""
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


class UsesLoop:
    """``loop``: the running loop, looked up once and passed down (Python 3.11's
    ``asyncio.get_running_loop`` is a getpid system call each time)."""

    _loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop


def tune_gc() -> None:
    """Collect garbage less often, and never scan what was there at start.

    What the program imported and built before serving (modules, classes, its config) lives
    as long as the process: ``gc.freeze`` takes it out of every later collection, so a full
    one scans only what serving made. The young generation's larger threshold keeps the
    cost per allocated object low; what a cycle holds between two collections is a few
    MB at most, far below what the limits bound (docs/performance.md, the 1,000 burst).
    """
    gc.collect()
    gc.freeze()
    _young, old1, old2 = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, old1, old2)


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine on uvloop (a faster event loop, same semantics) or plain asyncio.

    uvloop is a host extra (``vmbusify[host]``): a guest installed from Debian's packages
    runs without it, and says so in one line."""
    keep_buffers_mapped()
    tune_gc()
    try:
        import uvloop
        run = uvloop.run  # 0.18 and later
    except (ImportError, AttributeError):
        logging.getLogger("vmbusify.runtime").info(
            "uvloop (0.18 or later) is not installed: running on asyncio's own event loop "
            "(same behaviour, more CPU per package)")
        return asyncio.run(coro)
    return run(coro)


def stop_on_signals(stop: asyncio.Event | None = None) -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so a program can finish cleanly and exit 0.

    Pass an existing event to have it set too (tests stop programs that way; outside the
    main thread no signal handler can be installed, and the event alone serves).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    return stop
