"""PreciseTimer: a real timerfd, watched with select/poll and loop.add_reader.

Each test runs on both implementations where the interpreter has them: the
``os.timerfd_*`` functions (Python >= 3.13) and the ctypes calls into libc
(forced on 3.13 by hiding the ``os`` functions).
"""

from __future__ import annotations

import asyncio
import os
import select
import sys
import time
from collections.abc import Iterator

import pytest

from aiokvpipe import _timerfd
from aiokvpipe._timerfd import PreciseTimer, open_timer

pytestmark = [
    pytest.mark.timeout(20),
    pytest.mark.skipif(sys.platform != "linux", reason="timerfd is Linux-only"),
]

# How late a firing may be on a loaded 2-core VM; only catches "never" or
# "on a coarse loop timer much later", never a latency claim.
GENEROUS = 1.0


@pytest.fixture(params=["os", "ctypes"])
def timer(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PreciseTimer]:
    if request.param == "os":
        if not hasattr(os, "timerfd_create"):
            pytest.skip("os.timerfd_create needs Python >= 3.13")
    else:
        monkeypatch.delattr(os, "timerfd_create", raising=False)
    made = open_timer()
    assert made is not None
    assert (made._libc is None) == (request.param == "os")
    try:
        yield made
    finally:
        made.close()


def readable(fd: int, wait: float) -> bool:
    return bool(select.select([fd], [], [], wait)[0])


def test_fires_not_before_the_armed_instant(timer: PreciseTimer) -> None:
    assert not timer.armed
    at = time.monotonic() + 0.03
    timer.arm(at)
    assert timer.armed
    assert not timer.clear(), "nothing has fired yet"
    assert timer.armed, "a clear() that read nothing leaves the timer armed"
    assert readable(timer.fileno, 10.0), "the armed timer never fired"
    fired = time.monotonic()
    assert fired >= at, f"fired {at - fired:.6f} s early"
    assert fired - at < GENEROUS
    assert timer.clear()
    assert not timer.armed
    assert not timer.clear(), "one expiry is consumed once"
    assert not readable(timer.fileno, 0.0)


def test_poll_sees_the_expiry(timer: PreciseTimer) -> None:
    poller = select.poll()
    poller.register(timer.fileno, select.POLLIN)
    assert poller.poll(0) == []
    at = time.monotonic() + 0.01
    timer.arm(at)
    events = poller.poll(10_000)
    assert events == [(timer.fileno, select.POLLIN)]
    assert time.monotonic() >= at
    assert timer.clear()


async def test_fires_through_the_event_loop(timer: PreciseTimer) -> None:
    loop = asyncio.get_running_loop()
    fired: asyncio.Future[float] = loop.create_future()

    def on_readable() -> None:
        if timer.clear() and not fired.done():
            fired.set_result(time.monotonic())

    loop.add_reader(timer.fileno, on_readable)
    try:
        for delay in (0.005, 0.02):  # re-armed after firing: fires again
            fired = loop.create_future()
            at = time.monotonic() + delay
            timer.arm(at)
            when = await asyncio.wait_for(fired, 10)
            assert at <= when < at + GENEROUS
            assert not timer.armed
    finally:
        loop.remove_reader(timer.fileno)


def test_disarm_prevents_firing(timer: PreciseTimer) -> None:
    timer.arm(time.monotonic() + 0.02)
    timer.disarm()
    assert not timer.armed
    assert not readable(timer.fileno, 0.15), "a disarmed timer fired"
    assert not timer.clear()
    timer.disarm()  # disarming an idle timer is a no-op


def test_rearming_moves_the_instant(timer: PreciseTimer) -> None:
    timer.arm(time.monotonic() + 0.02)
    later = time.monotonic() + 0.12
    timer.arm(later)  # replaces the earlier expiry
    assert readable(timer.fileno, 10.0)
    assert time.monotonic() >= later
    assert timer.clear()


def test_clear_is_false_when_nothing_fired(timer: PreciseTimer) -> None:
    assert not timer.clear()  # never armed
    timer.arm(time.monotonic() + 60)
    assert not timer.clear()  # armed, not due
    timer.disarm()
    assert not timer.clear()


@pytest.mark.parametrize("past", [1.0, 0.0], ids=["a second ago", "at zero"])
def test_arming_in_the_past_fires_at_once(timer: PreciseTimer, past: float) -> None:
    at = time.monotonic() - past if past else 0.0  # 0 itself would mean "disarm"
    started = time.monotonic()
    timer.arm(at)
    assert readable(timer.fileno, 10.0)
    assert time.monotonic() - started < GENEROUS
    assert timer.clear()


def test_close_is_idempotent(timer: PreciseTimer) -> None:
    fd = timer.fileno
    timer.arm(time.monotonic() + 60)
    timer.close()
    assert timer.fileno == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    timer.close()
    assert timer.fileno == -1


def test_each_timer_is_its_own_fd() -> None:
    first, second = open_timer(), open_timer()
    assert first is not None and second is not None
    try:
        assert first.fileno != second.fileno
        first.arm(time.monotonic() + 60)
        second.arm(time.monotonic())
        assert readable(second.fileno, 10.0)
        assert not readable(first.fileno, 0.0)
    finally:
        first.close()
        second.close()


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="Python >= 3.13 uses os.timerfd_*")
def test_ctypes_path_is_used_before_python_3_13() -> None:
    assert not hasattr(os, "timerfd_create")
    made = open_timer()
    assert made is not None
    try:
        assert made._libc is not None
        assert made._libc is _timerfd._load_libc()  # loaded once, then shared
    finally:
        made.close()


@pytest.mark.skipif(sys.version_info < (3, 13), reason="os.timerfd_* arrived in Python 3.13")
def test_os_path_is_used_from_python_3_13() -> None:
    made = open_timer()
    assert made is not None
    try:
        assert made._libc is None
    finally:
        made.close()


# -- LoopTimer: the timer a waiter holds ------------------------------------


def _timerfds() -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if "timerfd" in os.readlink(f"/proc/self/fd/{name}"):
                count += 1
        except OSError:
            pass
    return count


async def test_loop_timer_calls_back_from_the_loop_that_armed_it() -> None:
    loop = asyncio.get_running_loop()
    fired = asyncio.Event()
    lt = _timerfd.LoopTimer(fired.set)
    try:
        at = time.monotonic() + 0.01
        assert lt.arm(at, loop)
        await asyncio.wait_for(fired.wait(), GENEROUS)
        assert time.monotonic() >= at
        assert lt.disarm(), "it had fired (the callback consumed the expiry)"
        assert not lt.disarm(), "nothing is armed any more"
    finally:
        lt.close()


async def test_loop_timer_disarmed_in_time_never_calls_back() -> None:
    calls: list[None] = []
    lt = _timerfd.LoopTimer(lambda: calls.append(None))
    try:
        assert lt.arm(time.monotonic() + 0.02, asyncio.get_running_loop())
        assert not lt.disarm(), "it had not fired"
        await asyncio.sleep(0.05)
        assert calls == []
    finally:
        lt.close()


def test_loop_timer_follows_the_loop_it_is_armed_from() -> None:
    # Two loops in turn (a ring endpoint used by two asyncio.run calls).
    loops: list[asyncio.AbstractEventLoop] = []
    fired: list[asyncio.AbstractEventLoop] = []
    events: list[asyncio.Event] = []

    def on_fire() -> None:
        fired.append(asyncio.get_running_loop())
        events[-1].set()

    lt = _timerfd.LoopTimer(on_fire)

    async def once() -> None:
        loops.append(asyncio.get_running_loop())
        events.append(asyncio.Event())
        assert lt.arm(time.monotonic() + 0.005, asyncio.get_running_loop())
        await asyncio.wait_for(events[-1].wait(), GENEROUS)

    try:
        asyncio.run(once())
        asyncio.run(once())
        assert fired == loops, "each loop ran the callback of the arm made from it"
    finally:
        lt.close()


def test_loop_timer_armed_without_a_loop_is_polled_by_its_caller() -> None:
    calls: list[None] = []
    lt = _timerfd.LoopTimer(lambda: calls.append(None))
    try:
        assert lt.arm(time.monotonic() + 0.005)
        assert lt.timer is not None
        assert readable(lt.timer.fileno, GENEROUS)
        assert lt.disarm(), "fired: disarm consumes the expiry"
        assert not readable(lt.timer.fileno, 0.0)
        assert calls == [], "no loop watches it: the caller polls"
    finally:
        lt.close()


async def test_loop_timer_close_releases_the_fd_and_never_arms_again() -> None:
    before = _timerfds()
    lt = _timerfd.LoopTimer(lambda: None)
    assert lt.timer is None, "opened on first use only"
    assert lt.arm(time.monotonic() + 10, asyncio.get_running_loop())
    assert _timerfds() == before + 1
    lt.close()
    assert _timerfds() == before and lt.timer is None
    assert not lt.arm(time.monotonic() + 10, asyncio.get_running_loop())
    assert lt.timer is None and _timerfds() == before, "arming a closed one opens nothing"
    lt.close()  # idempotent


async def test_loop_timer_where_there_is_no_timerfd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_timerfd, "open_timer", lambda: None)  # as on a non-Linux box
    lt = _timerfd.LoopTimer(lambda: None)
    assert not lt.arm(time.monotonic() + 0.01, asyncio.get_running_loop())
    assert lt.timer is None
    assert not lt.disarm()
    lt.close()
