"""Backpressure sized in bytes.

The reference pipe slept 50 ms in a loop while queued bytes exceeded a
threshold. Here a sender simply awaits room; the release that makes room
wakes it at once, and a waiting sender costs no CPU.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class ByteSemaphore:
    """A FIFO semaphore whose units are bytes.

    * FIFO: a large waiter at the head is not starved by small ones behind it.
    * A request larger than ``capacity`` is granted when nothing is held, so
      any single tensor can pass through a window smaller than itself.
    * Cancellation-safe: a cancelled waiter holds nothing afterwards.
    * :meth:`close` fails all current and future waiters with a given error
      (used when the pipe breaks or closes).
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self._capacity = capacity
        self._held = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._error: BaseException | None = None

    @property
    def capacity(self) -> int:
        """The window size in bytes."""
        return self._capacity

    @property
    def held(self) -> int:
        """Bytes currently acquired (may exceed capacity by one oversize grant)."""
        return self._held

    @property
    def available(self) -> int:
        """Bytes that could be acquired right now without waiting (if nobody queues)."""
        return max(self._capacity - self._held, 0)

    def _fits(self, n: int) -> bool:
        return self._held == 0 or self._held + n <= self._capacity

    async def acquire(self, n: int) -> None:
        """Wait (FIFO, without polling) until ``n`` bytes fit, then take them.

        Cancellation leaves nothing taken. Raises the error given to
        :meth:`close` once the semaphore is closed.
        """
        if n < 0:
            raise ValueError(f"cannot acquire a negative byte count ({n})")
        if self._error is not None:
            raise self._error
        if not self._waiters and self._fits(n):
            self._held += n
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Granted just before we were cancelled: give it back.
                self.release(n)
            else:
                try:
                    self._waiters.remove(entry)
                except ValueError:
                    pass
                self._wake()
            raise

    def try_acquire(self, n: int) -> bool:
        """Take ``n`` bytes if that needs no waiting (and nobody queues); else False."""
        if self._error is None and not self._waiters and self._fits(n):
            self._held += n
            return True
        return False

    def release(self, n: int) -> None:
        """Give back ``n`` bytes and wake the waiters at the head that now fit."""
        if n < 0 or n > self._held:
            raise ValueError(f"release({n}) with only {self._held} bytes held")
        self._held -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if not self._fits(n):
                return
            self._waiters.popleft()
            self._held += n
            fut.set_result(None)

    def close(self, error: BaseException) -> None:
        """Fail every waiter (now and later) with ``error``."""
        self._error = error
        while self._waiters:
            _, fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(error)

    @asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        """``async with sem.hold(n):`` acquire for the body, release after."""
        await self.acquire(n)
        try:
            yield
        finally:
            self.release(n)
