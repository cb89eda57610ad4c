"""One waiting policy shared by every poller in the package.

Polling is the only way to await things that cannot signal an fd (CUDA
events, a peer's flag in shared memory), so the policy matters: answer in
microseconds when the thing is about to happen, and cost ~nothing when it is
not. Hence three phases: a few bare yields to the loop (``sleep(0)``), then
sleeps that grow geometrically up to a ceiling.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Spin -> yield -> growing sleeps. Not thread-safe; one per waiter.

    ``spin_seconds`` bounds the yield phase by time rather than by count, so
    it means the same under uvloop (fast yields) and asyncio (slow yields).
    """

    spin_seconds: float = 50e-6
    initial_sleep: float = 20e-6
    max_sleep: float = 1e-3
    factor: float = 2.0
    _started: float | None = field(default=None, init=False, repr=False)
    _sleep: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.spin_seconds < 0 or self.initial_sleep <= 0:
            raise ValueError("spin_seconds must be >= 0 and initial_sleep > 0")
        if self.max_sleep < self.initial_sleep or self.factor < 1:
            raise ValueError("max_sleep must be >= initial_sleep and factor >= 1")

    def reset(self) -> None:
        """Start again from the spin phase (call after progress was made)."""
        self._started = None
        self._sleep = 0.0

    @property
    def spinning(self) -> bool:
        """True while still in the spin phase (callers may park after it)."""
        return self._started is None or (time.perf_counter() - self._started) < self.spin_seconds

    def next_delay(self) -> float:
        """The delay the next :meth:`wait` will use (0.0 means a bare yield)."""
        now = time.perf_counter()
        if self._started is None:
            self._started = now
        if now - self._started < self.spin_seconds:
            return 0.0
        self._sleep = (
            self.initial_sleep
            if self._sleep == 0.0
            else min(self._sleep * self.factor, self.max_sleep)
        )
        return self._sleep

    async def wait(self) -> None:
        """Yield or sleep for the next step of the policy (cancellable)."""
        await asyncio.sleep(self.next_delay())


async def poll_until(predicate: Callable[[], bool], backoff: Backoff | None = None) -> None:
    """Await until ``predicate()`` is true, polling with ``backoff``.

    Cancellable at every step; time limits come from the caller's deadline.
    """
    if predicate():
        return
    policy = backoff if backoff is not None else Backoff()
    policy.reset()
    while True:
        await policy.wait()
        if predicate():
            return
