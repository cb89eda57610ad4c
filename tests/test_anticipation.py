"""Anticipating receivers: ``WaiterSet.wait_for`` and a TCP ``recv`` that
learns the rhythm of arrivals, pre-wakes on a timerfd and spins through the
window the next message is due in (``PipeConfig.anticipate``).

Behaviour only, never timing figures: what must arrive arrives, in order and
bit for bit; cancelled and timed-out waits leave nothing behind; the wake-up
timer is a real fd that is opened only when anticipating and always closed.
Real sockets on 127.0.0.1, and a real second process where one is needed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable

import pytest
import torch
from conftest import connect_beside, free_port
from forked import Forked
from transport_conformance import (
    assert_all_same,
    assert_same,
    opened,
    pipe_factory,
    random_tensor,
    tagged,
    together,
)

from aiokvpipe import (
    AiokvpipeError,
    ConfigError,
    PeerClosedError,
    PipeClosedError,
    PipeConfig,
    TransferTimeout,
    _timerfd,
)
from aiokvpipe.cadence import Cadence
from aiokvpipe.pipe import Pipe
from aiokvpipe.transport._waiters import WaiterSet

# --------------------------------------------------------------------- helpers


def timerfds() -> int:
    """How many timerfds this process holds (the waiters' wake-up timers)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[timerfd]":
                count += 1
    return count


async def until(condition: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    """Wait for ``condition`` (a hang guard, not a timing assertion)."""
    give_up = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < give_up, f"never happened: {what}"
        await asyncio.sleep(0.002)


def learn(ws: WaiterSet, gap: float, last: float, n: int = 6) -> None:
    """Teach ``ws`` a rhythm of ``gap`` seconds whose latest arrival was at ``last``."""
    assert ws.cadence is not None
    for k in range(n - 1, -1, -1):
        ws.cadence.arrived(last - k * gap)


def parked(ws: WaiterSet) -> bool:
    return len(ws._futures) == 1


def timer_armed(ws: WaiterSet) -> bool:
    return ws._timer.timer is not None and ws._timer.timer.armed


# --------------------------------------------------------------------- WaiterSet.wait_for


@pytest.mark.timeout(30)
@pytest.mark.parametrize("anticipate", [True, False], ids=["anticipate", "park"])
async def test_wait_for_follows_a_steady_producer(anticipate: bool) -> None:
    """A producer that appends, records the arrival and wakes every 3 ms, the
    way a receive channel does: the consumer in ``wait_for`` sees every item
    before the next one is produced, whether it parked, woke on the timer or
    spun through the window; only an anticipating set opens a timer."""
    fds = timerfds()
    ws = WaiterSet(anticipate=anticipate)
    items: list[int] = []
    n = 120

    async def producer() -> None:
        for i in range(n):
            await asyncio.sleep(0.003)
            items.append(i)
            ws.arrived()
            ws.wake_all()

    async def consumer() -> list[int]:
        got: list[int] = []
        most_queued = 0
        while len(got) < n:
            while not items:
                await ws.wait_for(lambda: bool(items))
            most_queued = max(most_queued, len(items))
            got.append(items.pop(0))
        assert most_queued == 1, "the consumer missed a wake-up and fell behind"
        return got

    try:
        _, got = await asyncio.wait_for(together(producer(), consumer()), 25)
        assert got == list(range(n))
        assert ws._futures == []
        if anticipate:
            assert ws.cadence is not None and ws.cadence.window() is not None
            assert ws._timer.timer is not None, "a 3 ms rhythm never armed the wake-up timer"
            assert timerfds() == fds + 1
        else:
            assert ws.cadence is None and ws._timer.timer is None
            assert timerfds() == fds
    finally:
        ws.close()
    assert timerfds() == fds


@pytest.mark.timeout(20)
async def test_wait_for_rehearses_once_as_its_spin_starts() -> None:
    """``rehearse`` runs when the window opens, before the first spin step,
    once however long the spin lasts; a wait with no rhythm never runs it."""
    ws = WaiterSet(anticipate=True)
    try:
        calls: list[bool] = []
        items: list[int] = []
        learn(ws, 0.02, time.monotonic())  # the next one is due in ~20 ms
        waiting = asyncio.ensure_future(
            ws.wait_for(lambda: bool(items), lambda: calls.append(parked(ws)))
        )
        await until(lambda: bool(calls), "the window opened")
        await asyncio.sleep(0.005)  # spin steps, then (the window closed) a park
        assert calls == [False], "rehearsed while parked, or more than once"
        items.append(1)
        ws.wake_all()
        await asyncio.wait_for(waiting, 5)
        assert calls == [False]
        assert ws.cadence is not None
        ws.cadence.reset()
        waiting = asyncio.ensure_future(
            ws.wait_for(lambda: bool(items), lambda: calls.append(True))
        )
        await asyncio.sleep(0.02)
        ws.wake_all()
        await asyncio.wait_for(waiting, 5)
        assert calls == [False]
    finally:
        ws.close()


@pytest.mark.timeout(20)
async def test_wait_for_cancelled_while_parked_on_the_timer() -> None:
    """The next message is due in ~10 s: the waiter parks with the timer armed.
    Cancelled, it leaves no future and no armed timer; the next wait_for works;
    close() releases the fd and is idempotent."""
    fds = timerfds()
    ws = WaiterSet(anticipate=True)
    ready = False
    try:
        learn(ws, gap=10.0, last=time.monotonic())
        waiter = asyncio.ensure_future(ws.wait_for(lambda: ready))
        await until(lambda: parked(ws), "the waiter parks")
        assert timer_armed(ws), "a window 10 s ahead is waited for on the timer"
        assert timerfds() == fds + 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert ws._futures == []
        assert not timer_armed(ws), "a cancelled wait left the timer armed"

        # the set is still usable: the producer's wake-up ends the next wait
        waiter = asyncio.ensure_future(ws.wait_for(lambda: ready))
        await until(lambda: parked(ws), "the waiter parks again")
        assert timer_armed(ws)
        ready = True
        ws.wake_all()
        await asyncio.wait_for(waiter, 5)
        assert ws._futures == [] and not timer_armed(ws)
        assert timerfds() == fds + 1  # the one timer is reused, never a second
    finally:
        ws.close()
    assert timerfds() == fds
    ws.close()  # idempotent
    assert ws.cadence is None
    # still a plain WaiterSet without a timer: parks, wakes, opens nothing
    waiter = asyncio.ensure_future(ws.wait_for(lambda: False))
    await until(lambda: parked(ws), "a closed set still parks")
    ws.wake_all()
    await asyncio.wait_for(waiter, 5)
    assert ws._timer.timer is None and timerfds() == fds


@pytest.mark.timeout(20)
async def test_wait_for_cancelled_while_spinning() -> None:
    """A window open right now (and for 30 s): the waiter spins (awake, not
    parked, no timer). A spinning waiter sees the condition without a wake-up;
    cancelled mid-spin it leaves nothing behind and the next wait works."""
    ws = WaiterSet(anticipate=True)
    ws.cadence = Cadence(budget=1.0, tail=30.0, min_window=30.0, max_window=30.0)
    learn(ws, gap=0.01, last=time.monotonic() - 0.01)  # due about now
    ready = False
    try:
        waiter = asyncio.ensure_future(ws.wait_for(lambda: ready))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not waiter.done()
        assert ws._futures == [] and ws._timer.timer is None, "expected a spinning waiter"
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert ws._futures == [] and ws._timer.timer is None

        waiter = asyncio.ensure_future(ws.wait_for(lambda: ready))
        await asyncio.sleep(0.01)
        assert not waiter.done() and ws._futures == []
        ready = True  # no wake_all: the spinning waiter notices by itself
        await asyncio.wait_for(waiter, 5)
        assert ws._futures == []
    finally:
        ws.close()


@pytest.mark.timeout(20)
async def test_timer_wakes_the_waiter_then_it_parks_past_the_window() -> None:
    """The window opens ~50 ms ahead: the timer fires (the lateness is learned),
    the waiter spins through the window and, with nothing there, parks for good
    (no armed timer, no spinning) until the producer's next wake-up."""
    fds = timerfds()
    ws = WaiterSet(anticipate=True)
    cadence = ws.cadence
    assert cadence is not None
    try:
        learn(ws, gap=0.05, last=time.monotonic())
        waiter = asyncio.ensure_future(ws.wait_for(lambda: False))
        await until(lambda: bool(cadence._lateness), "the wake-up timer fires")
        await until(lambda: parked(ws) and not timer_armed(ws), "the waiter parks again")
        await asyncio.sleep(0.05)
        assert not waiter.done() and parked(ws)
        ws.wake_all()
        await asyncio.wait_for(waiter, 5)  # wait_for returns on a wake-up: callers recheck
        assert ws._futures == []
    finally:
        ws.close()
    assert timerfds() == fds


@pytest.mark.timeout(30)
async def test_a_wake_up_before_the_window_does_not_spin_towards_it() -> None:
    """Two waiters parked for a window ~60 s ahead, woken with nothing ready
    (two recv callers, one message: one of them finds nothing). wait_for
    returns for its caller to recheck, and a recheck parks again on the timer;
    neither busy-spins through the minute before the window."""
    ws = WaiterSet(anticipate=True)
    learn(ws, gap=60.0, last=time.monotonic())
    waiters = [asyncio.ensure_future(ws.wait_for(lambda: False)) for _ in range(2)]
    try:
        await until(lambda: len(ws._futures) == 2 and timer_armed(ws), "both park")
        ws.wake_all()
        await asyncio.wait_for(asyncio.gather(*waiters), 5)  # a hang guard: spinning takes 60 s
        assert ws._futures == [] and not timer_armed(ws)
        again = asyncio.ensure_future(ws.wait_for(lambda: False))
        waiters.append(again)
        await until(lambda: parked(ws) and timer_armed(ws), "a recheck parks on the timer")
        again.cancel()
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        ws.close()


@pytest.mark.timeout(20)
async def test_close_while_parked_on_the_timer_releases_it() -> None:
    """close() from another task (the channel's aclose) while a waiter is parked
    with the timer armed: the fd is closed at once, the waiter is left parked
    until the wake-up that follows, and then returns cleanly."""
    fds = timerfds()
    ws = WaiterSet(anticipate=True)
    learn(ws, gap=10.0, last=time.monotonic())
    waiter = asyncio.ensure_future(ws.wait_for(lambda: False))
    try:
        await until(lambda: parked(ws) and timer_armed(ws), "the waiter parks on the timer")
        ws.close()
        assert timerfds() == fds and ws._timer.timer is None
        await asyncio.sleep(0.01)
        assert not waiter.done()
        ws.wake_all()
        await asyncio.wait_for(waiter, 5)
        assert ws._futures == []
    finally:
        waiter.cancel()
        ws.close()
    assert timerfds() == fds


@pytest.mark.timeout(20)
async def test_without_anticipation_no_timer_is_ever_opened() -> None:
    """``WaiterSet()`` and ``WaiterSet(anticipate=False)``: arrivals are ignored,
    every wait parks, no timerfd exists at any point."""
    fds = timerfds()
    for ws in (WaiterSet(), WaiterSet(anticipate=False)):
        assert ws.cadence is None
        for _ in range(20):
            ws.arrived()
            await asyncio.sleep(0.001)
        waiter = asyncio.ensure_future(ws.wait_for(lambda: False))
        await until(lambda ws=ws: parked(ws), "a non-anticipating waiter parks")
        assert ws._timer.timer is None and timerfds() == fds
        ws.wake_all()
        await asyncio.wait_for(waiter, 5)
        ws.close()
        ws.close()
    assert timerfds() == fds


@pytest.mark.timeout(20)
async def test_a_stale_rhythm_parks_without_a_timer() -> None:
    """The rhythm's last window passed long ago (the stream stopped): wait_for
    parks at once, it neither spins nor arms a timer."""
    fds = timerfds()
    ws = WaiterSet(anticipate=True)
    learn(ws, gap=0.001, last=time.monotonic() - 5.0)
    waiter = asyncio.ensure_future(ws.wait_for(lambda: False))
    try:
        await until(lambda: parked(ws), "the waiter parks")
        assert ws._timer.timer is None and timerfds() == fds
        ws.wake_all()
        await asyncio.wait_for(waiter, 5)
    finally:
        waiter.cancel()
        ws.close()


@pytest.mark.timeout(20)
async def test_without_a_precise_timer_the_waiter_parks_instead_of_spinning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where no timerfd can be had (``open_timer()`` is None: not Linux), a
    window due 2 s ahead must not be spun towards: the waiter parks, and
    anticipation is switched off for good."""
    monkeypatch.setattr(_timerfd, "open_timer", lambda: None)
    ws = WaiterSet(anticipate=True)
    learn(ws, gap=2.0, last=time.monotonic())
    waiter = asyncio.ensure_future(ws.wait_for(lambda: False))
    try:
        await until(lambda: parked(ws), "the waiter parks", limit=1.0)
        assert ws.cadence is None and ws._timer.timer is None
        ws.wake_all()
        await asyncio.wait_for(waiter, 5)
    finally:
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        ws.close()


# --------------------------------------------------------------------- PipeConfig


@pytest.mark.parametrize("value", ["yes", 1, 0, None, 1.0])
def test_anticipate_must_be_a_bool(value: object) -> None:
    with pytest.raises(ConfigError, match="anticipate") as info:
        PipeConfig(rank=0, anticipate=value)  # type: ignore[arg-type]
    assert info.value.field == "anticipate"
    assert PipeConfig(rank=0).anticipate is True
    assert PipeConfig(rank=0, anticipate=False).anticipate is False


# --------------------------------------------------------------------- two ranks, one process


async def rhythm(a: Pipe, b: Pipe, n: int, gap: float, start: int = 0) -> None:
    """``a`` sends ``n`` tensors ``gap`` apart while ``b`` waits in recv for each."""

    async def sender() -> None:
        for i in range(n):
            await asyncio.sleep(gap)
            await a.send(tagged(start + i))

    async def receiver() -> list[torch.Tensor | None]:
        return [await b.recv(timeout=10) for _ in range(n)]

    _, got = await together(sender(), receiver())
    assert_all_same(got, [tagged(start + i) for i in range(n)])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("anticipate", [True, False], ids=["anticipate", "park"])
async def test_idle_receiver_after_a_rhythm_gets_the_next_message(anticipate: bool) -> None:
    """A 5 ms rhythm, then the receiver waits a whole second: the window passes,
    it parks, and the late message is delivered; the rhythm then resumes. Only
    the anticipating receiver holds a timer, and aclose releases it."""
    fds = timerfds()
    async with opened(pipe_factory("tcp"), anticipate=anticipate) as (a, b):
        await rhythm(a, b, 30, gap=0.005)
        late = asyncio.ensure_future(b.recv(timeout=10))
        await asyncio.sleep(1.0)
        assert not late.done()
        assert timerfds() == fds + (1 if anticipate else 0)
        await a.send(tagged(99))
        assert_same(await asyncio.wait_for(late, 10), tagged(99))
        await rhythm(a, b, 10, gap=0.002, start=100)
        assert (b._receiver._waiters.cadence is not None) == anticipate  # type: ignore[attr-defined]
    assert timerfds() == fds


@pytest.mark.timeout(30)
async def test_op_timeout_on_recv_while_anticipating() -> None:
    """A receiver that learned a 3 ms rhythm still raises TransferTimeout when
    nothing comes (op_timeout, and a per-call deadline that ends while it is
    parked on the timer), leaves nothing behind, and receives what comes next."""
    async with opened(pipe_factory("tcp"), op_timeout=0.2, anticipate=True) as (a, b):
        waiters = b._receiver._waiters  # type: ignore[attr-defined]
        await rhythm(a, b, 20, gap=0.003)
        with pytest.raises(TransferTimeout, match="recv on rank 1"):
            await b.recv()
        assert waiters._futures == [] and not timer_armed(waiters)
        await a.send(tagged(1))
        assert_same(await b.recv(), tagged(1))

    # a fresh pipe with a slow rhythm: the next window opens ~50 ms ahead
    async with opened(pipe_factory("tcp"), op_timeout=0.2, anticipate=True) as (a, b):
        waiters = b._receiver._waiters  # type: ignore[attr-defined]
        await rhythm(a, b, 6, gap=0.05)
        with pytest.raises(TransferTimeout):
            await b.recv(timeout=0.005)
        assert waiters._futures == [] and not timer_armed(waiters)
        await a.send(tagged(2))
        assert_same(await b.recv(), tagged(2))
        await rhythm(a, b, 5, gap=0.05, start=3)


@pytest.mark.timeout(30)
async def test_receiver_aclose_while_anticipating_leaves_no_fds() -> None:
    """The receiver's aclose while its recv is parked on the timer: the recv
    fails with PipeClosedError, the timerfd and the socket are released (the
    leak check sees every fd), and the sender side closes normally."""
    fds = timerfds()
    async with opened(pipe_factory("tcp"), anticipate=True) as (a, b):
        await rhythm(a, b, 6, gap=0.1)
        pending = asyncio.ensure_future(b.recv(timeout=None))
        await asyncio.sleep(0.01)
        assert not pending.done()
        assert timerfds() == fds + 1
        await b.aclose()
        with pytest.raises(PipeClosedError):
            await asyncio.wait_for(pending, 5)
        assert timerfds() == fds
        with pytest.raises(PipeClosedError):
            await b.recv()
    assert timerfds() == fds


# --------------------------------------------------------------------- a peer process

ECHO = r"""
import asyncio, sys
import torch
from aiokvpipe import PeerClosedError, PipeConfig
from aiokvpipe.pipe import Pipe

async def main(port, anticipate):
    cfg = PipeConfig(
        rank=1, port=port, connect_timeout=30, transport="tcp", anticipate=anticipate
    )
    async with await Pipe.connect(cfg) as pipe:
        while True:
            try:
                item = await pipe.recv(timeout=None)
            except PeerClosedError:
                break
            if item is not None and item.dtype == torch.float64 and item.dim() == 0:
                await asyncio.sleep(float(item))  # a request to keep them waiting
            await pipe.send(item)
        await pipe.flush()

asyncio.run(main(int(sys.argv[1]), sys.argv[2] == "1"))
"""


@contextlib.asynccontextmanager
async def echo_peer(anticipate: bool) -> AsyncIterator[tuple[Pipe, Forked]]:
    """Rank 1 in a child process echoing everything back; rank 0 (yielded) here."""
    port = free_port()
    # fork/exec returns at once; nothing below blocks on the child while it runs
    proc = Forked(
        [sys.executable, "-c", ECHO, str(port), "1" if anticipate else "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    pipe: Pipe | None = None
    try:
        config = PipeConfig(
            rank=0, port=port, connect_timeout=30.0, transport="tcp", anticipate=anticipate
        )
        pipe = await connect_beside(config, proc)
        yield pipe, proc
    finally:
        if pipe is not None:
            with contextlib.suppress(AiokvpipeError):
                await pipe.aclose()
        if proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)  # it leaves once it sees our goodbye
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def ping(rng: random.Random) -> torch.Tensor | None:
    if rng.random() < 0.1:
        return None
    dtype = rng.choice([torch.float32, torch.int64, torch.bfloat16, torch.uint8, torch.complex64])
    return random_tensor(dtype, (rng.randrange(1, 200),), rng)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("anticipate", [True, False], ids=["anticipate", "park"])
async def test_ping_pong_with_a_rhythm_a_pause_and_an_idle_wait(anticipate: bool) -> None:
    """Hundreds of small tensors to a peer process and back at a 1-2 ms rhythm
    (now and then three in flight), a 0.3 s pause, more, then a one-second
    silence from the peer, then more: everything comes back in order and bit
    for bit, on both anticipating ends or on neither; everyone closes cleanly."""
    rng = random.Random(11)
    fds = timerfds()
    async with echo_peer(anticipate) as (pipe, proc):

        async def round_trip(burst: int) -> None:
            items = [ping(rng) for _ in range(burst)]
            for item in items:
                await pipe.send(item)
            got = [await asyncio.wait_for(pipe.recv(), 20) for _ in items]
            assert_all_same(got, items)

        for i in range(250):
            await round_trip(3 if i % 17 == 0 else 1)
            await asyncio.sleep(0.001 + 0.001 * (i % 2))
        await asyncio.sleep(0.3)
        for _ in range(100):
            await round_trip(1)
            await asyncio.sleep(0.002)
        # the peer keeps us waiting a whole second, then answers
        delay = torch.tensor(1.0, dtype=torch.float64)
        await pipe.send(delay)
        assert_same(await asyncio.wait_for(pipe.recv(), 20), delay)
        for _ in range(20):
            await round_trip(1)
            await asyncio.sleep(0.001)
        await pipe.flush()
        assert (pipe._receiver._waiters.cadence is not None) == anticipate  # type: ignore[attr-defined]
        if not anticipate:
            assert timerfds() == fds
    assert timerfds() == fds
    assert proc.returncode == 0, "the echo peer did not leave cleanly"


def kill(proc: Forked) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.mark.timeout(60)
async def test_send_after_the_peer_was_killed_surfaces_peer_closed() -> None:
    """The peer process is SIGKILLed while our anticipating recv waits and
    nothing is queued: sending on (each send goes straight to ``sendmsg``)
    surfaces PeerClosedError from send and from the failed Transfer if any,
    then from flush and recv; aclose is quiet and nothing leaks."""
    async with echo_peer(True) as (pipe, proc):
        for i in range(30):
            await pipe.send(tagged(i))
            assert_same(await asyncio.wait_for(pipe.recv(), 20), tagged(i))
            await asyncio.sleep(0.002)
        pending_recv = asyncio.ensure_future(pipe.recv(timeout=None))
        await asyncio.sleep(0.01)
        assert not pending_recv.done()
        kill(proc)  # blocks: the loop has not seen the hang-up yet
        transfers = []
        error: PeerClosedError | None = None
        for i in range(2000):
            try:
                transfers.append(await pipe.send(tagged(i)))
            except PeerClosedError as exc:
                error = exc
                break
            if i >= 10:
                await asyncio.sleep(0.005)  # let the loop see the hang-up
        assert error is not None, "sends to a dead peer never failed"
        assert "rank 0 -> rank 1" in str(error)
        for transfer in transfers:
            with contextlib.suppress(PeerClosedError):
                await asyncio.wait_for(transfer, 5)  # type: ignore[arg-type]
        with pytest.raises(PeerClosedError):
            await pipe.send(None)
        with pytest.raises(PeerClosedError):
            await pipe.flush()
        with pytest.raises(PeerClosedError):
            await asyncio.wait_for(pending_recv, 5)
        with pytest.raises(PeerClosedError):
            await pipe.recv()
        await pipe.aclose()  # every error was reported already: quiet
        assert pipe.pending_bytes == 0
