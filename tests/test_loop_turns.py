"""Copy slices give way to timers: a task woken by a timer that fell due
during a slice runs before the copier's next slice, on both loops.

Why it matters: the block payloads and the Pipe's shared-memory ring copy on
the loop thread in slices; if a timer's wake-up waits behind another whole
slice, a layer-wise push starts every layer late (a 2 ms compute step ran
3.0-3.2 ms) and a ticker beside a big send lags by milliseconds.
"""

from __future__ import annotations

import asyncio
import time

from aiokvpipe.loop_turns import yield_turn


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def test_a_timer_due_during_a_slice_wakes_its_task_before_the_next_slice() -> None:
    order: list[str] = []

    async def sleeper() -> None:
        await asyncio.sleep(0.001)
        order.append("woke")

    task = asyncio.get_running_loop().create_task(sleeper())
    await asyncio.sleep(0)  # the sleeper's timer is armed
    for i in range(4):
        _busy(0.003)  # a copy slice, during which the timer falls due
        order.append(f"slice {i}")
        await yield_turn()
    await task
    assert order[:2] == ["slice 0", "woke"], order


async def test_a_ready_task_runs_between_two_slices() -> None:
    order: list[str] = []

    async def other() -> None:
        order.append("other")

    task = asyncio.get_running_loop().create_task(other())
    _busy(0.001)
    order.append("slice 0")
    await yield_turn()
    order.append("slice 1")
    await task
    assert order == ["slice 0", "other", "slice 1"], order
