"""wait_event / wait_stream on CPU, with events that stand in for CUDA's.

What is checked: the first query comes before any yield, waiting never calls
``synchronize()``, it yields to the loop, it follows the Backoff policy
(bare yields, then growing sleeps), it is cancellable, bounded by its
timeout, and device errors come out as CudaTransferError.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from aiokvpipe.backoff import Backoff
from aiokvpipe.cuda.events import is_complete, wait_event, wait_stream
from aiokvpipe.errors import CudaTransferError, TransferTimeout


class PolledEvent:
    """Completes after ``after_polls`` queries or ``after_seconds``, whichever is set."""

    def __init__(self, after_polls: int | None = None, after_seconds: float | None = None) -> None:
        self.after_polls = after_polls
        self.deadline = None if after_seconds is None else time.perf_counter() + after_seconds
        self.polls = 0
        self.poll_times: list[float] = []

    def query(self) -> bool:
        self.polls += 1
        self.poll_times.append(time.perf_counter())
        if self.after_polls is not None and self.polls >= self.after_polls:
            return True
        return self.deadline is not None and time.perf_counter() >= self.deadline

    def synchronize(self) -> None:
        raise AssertionError("wait_event must never synchronize on the loop")


class CupyStyleEvent:
    """cupy spells completion as a ``done`` property."""

    def __init__(self, after_polls: int) -> None:
        self.after_polls = after_polls
        self.polls = 0

    @property
    def done(self) -> bool:
        self.polls += 1
        return self.polls >= self.after_polls


class RecordingBackoff(Backoff):
    def __init__(self) -> None:
        super().__init__(spin_seconds=0.0, initial_sleep=1e-4, max_sleep=1.6e-3)
        self.delays: list[float] = []

    def next_delay(self) -> float:
        delay = super().next_delay()
        self.delays.append(delay)
        return delay


async def test_done_event_returns_without_yielding() -> None:
    event = PolledEvent(after_polls=1)
    ran = False

    async def other() -> None:
        nonlocal ran
        ran = True

    task = asyncio.ensure_future(other())
    await wait_event(event)
    assert event.polls == 1
    assert not ran  # no await happened: a finished event costs one query
    await task


async def test_pending_event_yields_to_the_loop() -> None:
    event = PolledEvent(after_polls=50)
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(ticker())
    await wait_event(event)
    stop.set()
    await task
    assert event.polls == 50
    assert ticks >= 10  # the loop ran other work between polls


async def test_follows_the_backoff_policy() -> None:
    backoff = RecordingBackoff()
    event = PolledEvent(after_polls=8)
    await wait_event(event, backoff=backoff)
    assert backoff.delays == pytest.approx([1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3, 1.6e-3, 1.6e-3])


async def test_default_policy_spins_then_sleeps() -> None:
    # Pending for 60 ms: a busy poller would query thousands of times; the
    # default policy yields for ~50 us, then sleeps up to 1 ms per poll.
    event = PolledEvent(after_seconds=0.06)
    await wait_event(event)
    assert 2 <= event.polls <= 400
    late_gaps = [b - a for a, b in zip(event.poll_times[-6:], event.poll_times[-5:], strict=False)]
    assert min(late_gaps) >= 0.5e-3  # later polls are sleeps, not yields


async def test_never_synchronizes() -> None:
    event = PolledEvent(after_polls=20)
    await wait_event(event)  # PolledEvent.synchronize would raise


async def test_timeout_raises_transfer_timeout() -> None:
    event = PolledEvent()  # never completes
    start = time.perf_counter()
    with pytest.raises(TransferTimeout) as info:
        await wait_event(event, timeout=0.05, what="test event")
    elapsed = time.perf_counter() - start
    assert isinstance(info.value, TimeoutError)
    assert "test event" in str(info.value)
    assert 0.045 <= elapsed < 1.0  # uvloop timers have 1 ms granularity
    assert event.polls > 1


async def test_completion_before_timeout_wins() -> None:
    event = PolledEvent(after_seconds=0.01)
    await wait_event(event, timeout=1.0)


async def test_cancellation_stops_polling() -> None:
    event = PolledEvent()
    task = asyncio.ensure_future(wait_event(event))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    polls = event.polls
    await asyncio.sleep(0.02)
    assert event.polls == polls


async def test_cancellation_with_timeout_is_not_a_timeout() -> None:
    task = asyncio.ensure_future(wait_event(PolledEvent(), timeout=5.0))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_check_runs_while_pending_and_its_error_is_typed() -> None:
    checks = 0

    def check() -> None:
        nonlocal checks
        checks += 1
        if checks == 3:
            raise RuntimeError("NCCL error: remote process exited")

    with pytest.raises(CudaTransferError, match="remote process exited") as info:
        await wait_event(PolledEvent(), check=check, what="ncclSend")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "ncclSend" in str(info.value)


async def test_check_not_called_once_complete() -> None:
    def check() -> None:
        raise AssertionError("check must not run for a finished event")

    await wait_event(PolledEvent(after_polls=1), check=check)


async def test_query_error_is_translated() -> None:
    class Broken:
        def query(self) -> bool:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(CudaTransferError, match="illegal memory access"):
        await wait_event(Broken())


async def test_cupy_style_done_property() -> None:
    event = CupyStyleEvent(after_polls=4)
    await wait_event(event)
    assert event.polls == 4


async def test_wait_stream_uses_the_same_polling() -> None:
    stream = PolledEvent(after_polls=5)
    await wait_stream(stream, timeout=1.0)
    assert stream.polls == 5


def test_is_complete_rejects_non_events() -> None:
    with pytest.raises(TypeError, match="not a CUDA event"):
        is_complete(object())


async def test_negative_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="timeout"):
        await wait_event(PolledEvent(after_polls=1), timeout=-1)
