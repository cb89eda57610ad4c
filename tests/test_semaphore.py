"""ByteSemaphore: FIFO, oversize, cancellation, close."""

from __future__ import annotations

import asyncio

import pytest

from aiokvpipe import ByteSemaphore, PeerClosedError


async def test_acquire_release_and_metrics() -> None:
    sem = ByteSemaphore(100)
    await sem.acquire(60)
    assert (sem.held, sem.available, sem.capacity) == (60, 40, 100)
    sem.release(60)
    assert sem.available == 100
    with pytest.raises(ValueError):
        sem.release(1)
    with pytest.raises(ValueError):
        await sem.acquire(-1)


async def test_oversize_granted_only_when_empty() -> None:
    sem = ByteSemaphore(10)
    await sem.acquire(5)
    big = asyncio.ensure_future(sem.acquire(1000))
    await asyncio.sleep(0.01)
    assert not big.done()
    sem.release(5)
    await asyncio.wait_for(big, 1)
    assert sem.held == 1000
    sem.release(1000)


async def test_fifo_big_waiter_not_starved() -> None:
    sem = ByteSemaphore(10)
    await sem.acquire(8)
    order: list[str] = []

    async def take(name: str, n: int) -> None:
        await sem.acquire(n)
        order.append(name)

    big = asyncio.ensure_future(take("big", 10))
    await asyncio.sleep(0)
    small = asyncio.ensure_future(take("small", 1))  # would fit now, but must queue
    await asyncio.sleep(0.01)
    assert order == []
    sem.release(8)
    await asyncio.wait_for(big, 1)
    assert order == ["big"]
    sem.release(10)
    await asyncio.wait_for(small, 1)
    assert order == ["big", "small"]
    sem.release(1)
    assert sem.held == 0


async def test_cancelled_waiter_takes_nothing() -> None:
    sem = ByteSemaphore(10)
    await sem.acquire(10)
    waiter = asyncio.ensure_future(sem.acquire(4))
    behind = asyncio.ensure_future(sem.acquire(3))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    sem.release(10)
    await asyncio.wait_for(behind, 1)
    assert sem.held == 3


async def test_cancel_after_grant_returns_bytes() -> None:
    sem = ByteSemaphore(10)
    await sem.acquire(10)
    waiter = asyncio.ensure_future(sem.acquire(4))
    await asyncio.sleep(0)
    sem.release(10)  # grants 4 to the waiter, which has not resumed yet
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert sem.held == 0


async def test_hold_and_close() -> None:
    sem = ByteSemaphore(4)
    async with sem.hold(4):
        assert sem.available == 0
        waiter = asyncio.ensure_future(sem.acquire(1))
        await asyncio.sleep(0)
        sem.close(PeerClosedError("gone"))
        with pytest.raises(PeerClosedError):
            await waiter
    with pytest.raises(PeerClosedError):
        await sem.acquire(1)
    assert not sem.try_acquire(1)
