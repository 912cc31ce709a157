"""A worker process whose MESSAGE handler waits forever (for test_worker_survives).

    python stuck_worker.py CONFIG STALL_AFTER

It answers ECHO requests until a HANG message arrives; its receive loop is then stuck, and
the link must stop its heartbeat and exit the process with STALL_EXIT_CODE.
"""

from __future__ import annotations

import asyncio
import sys

from vmbusify.bus.frames import RouteKind
from vmbusify.bus.link import Inbound, WorkerLink
from vmbusify.config import load_config
from vmbusify.logs import setup_logging
from vmbusify.protocol.entities import Entity

ECHO, HANG = 931, 932


async def main(config_path: str, stall_after: float) -> None:
    never = asyncio.Event()

    async def wait_forever(msg: Inbound) -> None:
        await never.wait()

    async def echo(msg: Inbound) -> str:
        return "alive"

    link = WorkerLink(load_config(config_path), "stuck", [Entity.CMD_EXECUTOR],
                      stall_after=stall_after)
    link.route(Entity.CMD_LISTENER, HANG, wait_forever, RouteKind.MESSAGE)
    link.route(Entity.CMD_LISTENER, ECHO, echo, RouteKind.REQUEST)
    await link.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    setup_logging("stuck")
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
