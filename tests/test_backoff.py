"""Backoff: spin -> yield -> growing sleeps; poll_until is prompt and cancellable."""

from __future__ import annotations

import asyncio
import time

import pytest

from aiokvpipe.backoff import Backoff, poll_until


def test_sleeps_grow_geometrically_to_the_ceiling() -> None:
    policy = Backoff(spin_seconds=0, initial_sleep=1e-4, max_sleep=1e-3, factor=2.0)
    delays = [policy.next_delay() for _ in range(8)]
    assert delays == pytest.approx([1e-4, 2e-4, 4e-4, 8e-4, 1e-3, 1e-3, 1e-3, 1e-3])
    assert not policy.spinning


def test_spin_phase_is_bounded_by_time_then_reset_starts_over() -> None:
    policy = Backoff(spin_seconds=0.05, initial_sleep=1e-4, max_sleep=4e-4, factor=3.0)
    assert policy.spinning  # before the first wait
    assert [policy.next_delay() for _ in range(100)] == [0.0] * 100
    assert policy.spinning
    time.sleep(0.06)
    assert not policy.spinning
    assert policy.next_delay() == pytest.approx(1e-4)
    assert policy.next_delay() == pytest.approx(3e-4)
    assert policy.next_delay() == pytest.approx(4e-4)
    policy.reset()
    assert policy.spinning
    assert policy.next_delay() == 0.0
    time.sleep(0.06)
    assert policy.next_delay() == pytest.approx(1e-4)  # the sleeps start small again


def test_factor_one_keeps_a_constant_sleep() -> None:
    policy = Backoff(spin_seconds=0, initial_sleep=5e-4, max_sleep=5e-4, factor=1.0)
    assert {policy.next_delay() for _ in range(5)} == {5e-4}


def test_invalid_policies_are_refused() -> None:
    for kwargs in (
        {"spin_seconds": -1e-6},
        {"initial_sleep": 0},
        {"initial_sleep": -1.0},
        {"initial_sleep": 1e-3, "max_sleep": 1e-4},
        {"factor": 0.5},
    ):
        with pytest.raises(ValueError):
            Backoff(**kwargs)


async def test_wait_uses_the_policy_delay() -> None:
    policy = Backoff(spin_seconds=0, initial_sleep=0.02, max_sleep=0.02)
    started = time.monotonic()
    await policy.wait()
    assert time.monotonic() - started >= 0.019


def test_poll_until_true_returns_without_yielding() -> None:
    calls = 0

    def ready() -> bool:
        nonlocal calls
        calls += 1
        return True

    coro = poll_until(ready)
    with pytest.raises(StopIteration):
        coro.send(None)  # finished in its first step: never suspended
    assert calls == 1


async def test_poll_until_yields_to_the_loop_while_spinning() -> None:
    """Spinning is sleep(0): other tasks run, so a predicate they satisfy returns."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(ticker())
    try:
        await asyncio.wait_for(poll_until(lambda: ticks >= 50, Backoff(spin_seconds=10)), 5)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert ticks >= 50


async def test_poll_until_notices_promptly_and_resets_a_reused_policy() -> None:
    policy = Backoff(spin_seconds=0, initial_sleep=1e-4, max_sleep=2e-3)
    for _ in range(20):
        policy.next_delay()  # a used policy, deep into its sleeps
    loop = asyncio.get_running_loop()
    due = loop.time() + 0.05
    checks = 0

    def ready() -> bool:
        nonlocal checks
        checks += 1
        return loop.time() >= due

    await asyncio.wait_for(poll_until(ready, policy), 5)
    late = loop.time() - due
    assert late < 0.25, f"noticed {late:.3f}s late"  # max_sleep is 2 ms; generous for CI
    assert checks > 5  # polled repeatedly with small sleeps, not one long one


async def test_poll_until_is_cancellable_and_stops_polling() -> None:
    checks = 0

    def never() -> bool:
        nonlocal checks
        checks += 1
        return False

    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(poll_until(never, Backoff(max_sleep=1e-3)), 0.05)
    assert time.monotonic() - started < 1.0
    after_cancel = checks
    await asyncio.sleep(0.02)
    assert checks == after_cancel  # nothing keeps polling in the background

    task = asyncio.ensure_future(poll_until(never))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
