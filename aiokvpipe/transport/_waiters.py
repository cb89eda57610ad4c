"""Tasks waiting for "something changed" on a receive channel.

Both receive channels (tcp, shm) park ``recv`` callers here and wake them
all whenever a message arrives or the channel stops; each woken caller then
re-checks the channel's state, so a cancelled waiter never loses a message.

:meth:`WaiterSet.wait_for` adds anticipation (see :mod:`aiokvpipe.cadence`):
when the next message is due soon, the caller spins through the expected
window, yielding to the loop, instead of parking. A parked process that is
woken pays a full wake-up (70-150 us on a VM); a spinning one sees the
message on the loop's next turn.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from .._timerfd import LoopTimer
from ..cadence import Cadence

_monotonic = time.monotonic
_sched_yield = getattr(os, "sched_yield", lambda: None)


class WaiterSet:
    def __init__(self, anticipate: bool = False) -> None:
        self._futures: list[asyncio.Future[None]] = []
        self.cadence: Cadence | None = Cadence() if anticipate else None
        self._timer = LoopTimer(self.wake_all)

    async def wait(self) -> None:
        """Return after the next :meth:`wake_all` (cancellable, leaves nothing behind)."""
        fut = asyncio.get_running_loop().create_future()
        self._futures.append(fut)
        try:
            await fut
        finally:
            if fut in self._futures:
                self._futures.remove(fut)

    async def wait_for(
        self, ready: Callable[[], bool], rehearse: Callable[[], object] | None = None
    ) -> None:
        """Like :meth:`wait`, but awake through the window a message is due in.

        Returns when ``ready()`` may have become true; callers recheck.
        ``rehearse`` runs once as the spin through the window starts, if the
        wait slept until the window opened (not in a stream, whose next
        message is due at once and whose code is warm; see
        :func:`aiokvpipe.tensors.rehearse_receive`).
        """
        cadence = self.cadence
        plan = cadence.plan(_monotonic()) if cadence is not None else None
        if plan is None:
            await self.wait()
            return
        opens, closes = plan
        if _monotonic() < opens:
            if not self._arm(opens):
                await self.wait()  # no precise timer: never spin towards the window
                return
            try:
                await self.wait()
            finally:
                fired = self._timer.disarm()
            now = _monotonic()
            if now < opens:
                return  # woken before the window (closed, another caller took it): recheck
            if fired and cadence is not None:
                closes = cadence.woke((opens, closes), now)
            if ready():
                return
            if rehearse is not None:  # slept through a gap: the take would run cold
                rehearse()
        while _monotonic() < closes:
            # Yield the CPU too: the sender may share this vCPU.
            _sched_yield()
            await asyncio.sleep(0)
            if ready():
                return
        await self.wait()

    def arrived(self) -> None:
        """Record that a message just arrived (feeds the cadence)."""
        if self.cadence is not None:
            self.cadence.arrived(_monotonic())

    def wake_all(self) -> None:
        futures, self._futures = self._futures, []
        for fut in futures:
            if not fut.done():
                fut.set_result(None)

    def close(self) -> None:
        """Release the wake-up timer (the set itself stays usable, without one)."""
        self.cadence = None
        self._timer.close()

    def _arm(self, at: float) -> bool:
        """Arm the precise wake-up; where there is none, stop anticipating."""
        if self.cadence is not None and self._timer.arm(at, asyncio.get_running_loop()):
            return True
        self.cadence = None  # no precise timer here (or closed): never anticipate
        return False
