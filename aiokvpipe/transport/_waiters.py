"""Tasks waiting for "something changed" on a receive channel.

Both receive channels (tcp, shm) park ``recv`` callers here and wake them
all whenever a message arrives or the channel stops; each woken caller then
re-checks the channel's state, so a cancelled waiter never loses a message.
"""

from __future__ import annotations

import asyncio


class WaiterSet:
    def __init__(self) -> None:
        self._futures: list[asyncio.Future[None]] = []

    async def wait(self) -> None:
        """Return after the next :meth:`wake_all` (cancellable, leaves nothing behind)."""
        fut = asyncio.get_running_loop().create_future()
        self._futures.append(fut)
        try:
            await fut
        finally:
            if fut in self._futures:
                self._futures.remove(fut)

    def wake_all(self) -> None:
        futures, self._futures = self._futures, []
        for fut in futures:
            if not fut.done():
                fut.set_result(None)
