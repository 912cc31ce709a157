#!/usr/bin/env python3
"""What `vmbusifyctl cp --fsync` costs (docs/files.md, "Durability"), in one run.

    .venv/bin/python bench/fsync.py [--mib 1024] [--files 2000] [--rounds 5] [--dir /var/tmp]

No lab and no root: the real sender (tree.Sender) feeds the real Decoder and receiver
(tree.Receiver) in this process, writing into DIR (a disk, not a tmpfs: fsync on tmpfs costs
nothing). Two copies, each ROUNDS times without and with ``fsync``, alternated (a loaded
machine moves single figures; the anchor is the same copy without fsync, just before):
one file of MIB MiB, and a tree of FILES files of 1-4 KiB in directories of 100. The page
cache is flushed (``sync``) before each copy. Prints each time and the ratio of medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmbusify.files.tree import Receiver, Sender, open_target
from vmbusify.files.wire import Decoder
from vmbusify.lab.testing import write_big_file


def copy_once(src: Path, out: Path, *, recursive: bool, fsync: bool) -> float:
    """Seconds to copy ``src`` to ``out`` (new) through the real sender and receiver."""
    os.sync()
    started = time.monotonic()
    receiver = Receiver(open_target(os.fsencode(out), 1), fsync=fsync)
    decoder = Decoder()
    for piece in Sender([os.fsencode(src)], recursive=recursive).pieces():
        decoder.feed(piece)
        while (event := decoder.next_event()) is not None:
            receiver.handle(event)
    receiver.finish()
    took = time.monotonic() - started
    shutil.rmtree(out) if out.is_dir() else out.unlink()
    return took


def measure(name: str, src: Path, work: Path, rounds: int, recursive: bool) -> None:
    """Print ROUNDS pairs (without, with fsync) for one source and the ratio of medians."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for fsync in (False, True):
            times[fsync].append(copy_once(src, work / "out", recursive=recursive,
                                          fsync=fsync))
    plain, synced = statistics.median(times[False]), statistics.median(times[True])
    print(f"{name}: without {' '.join(f'{t:.2f}' for t in times[False])} s, "
          f"with --fsync {' '.join(f'{t:.2f}' for t in times[True])} s; "
          f"medians {plain:.2f} / {synced:.2f} s, ratio {synced / plain:.2f}")


def main() -> int:
    """Run both measurements."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vmbusify-fsync-", dir=args.dir))
    try:
        write_big_file(work / "big", args.mib << 20)
        measure(f"one {args.mib} MiB file", work / "big", work, args.rounds, False)
        (work / "big").unlink()
        for i in range(args.files):
            d = work / "tree" / f"d{i // 100}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i}").write_bytes(os.urandom(1024 * (1 + i % 4)))
        measure(f"{args.files} files of 1-4 KiB", work / "tree", work, args.rounds, True)
    finally:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
