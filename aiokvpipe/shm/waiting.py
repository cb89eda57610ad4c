"""Waiting for a chunk: spin, then park on the doorbell; mixed into RingEndpoint.

Spin with ``sched_yield()`` + ``asyncio.sleep(0)`` for the spin
window (50 us, adaptive, none after a long park: see ``_adapt_spin``); then
announce "parked", fence, recheck, and only then wait on the doorbell fd
(plus the writer's pidfd, for readers) for at most a safety interval growing
from 20 ms to 50 ms (to 1 s for a reader watching the writer's pidfd), so
even a lost ring costs bounded latency, and an idle reader wakes about once
a second.
The same coroutines serve the blocking API: with ``blocking=True`` they never
suspend (they spin and ``poll`` instead).

The chunk protocol these waits serve (who rings whom, and the fences
around the park words) is :mod:`aiokvpipe.shm.endpoint`'s.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..backoff import Backoff
from ..cadence import Cadence
from ..errors import PipeClosedError
from .doorbell import TIMER, Doorbell
from .fence import fence

if TYPE_CHECKING:
    from ..errors import PeerClosedError, TransferTimeout
    from .ring import ShmRingBuffer

__all__ = ["TAKEN", "RingWaiting"]

_monotonic = time.monotonic
_perf_counter = time.perf_counter
# Longest park between safety rechecks. A reader that watches the writer's
# pidfd learns of its death from the kernel, so its recheck only bounds a lost
# ring: 1 s. Measured with 16 idle peers on one host (bench endpoint, idle,
# auto = shm links): 2.6-2.7 % of a core at 50 ms, the rechecks being nearly
# all of it (tcp links: 0.5 %). A writer finds a dead reader, and a reader
# without a pidfd a dead writer, only on these rechecks: 50 ms.
_WATCHED_MAX_PARK = 1.0
_UNWATCHED_MAX_PARK = 50e-3
_sched_yield = getattr(os, "sched_yield", lambda: None)
TAKEN = -1  # _wait: the doorbell callback already handed the chunk to ``take``


class RingWaiting:
    """Spinning, parking and doorbell waits; mixed into RingEndpoint.

    RingEndpoint's ``__init__`` sets the state declared here (annotations
    only: no class attributes, so lookups stay on the instance) and it
    supplies the peer checks a park runs.
    """

    buffer: ShmRingBuffer
    is_writer: bool
    _closed: bool
    _hdr: memoryview  # the ring's header bytes
    _words: memoryview  # the same header as u32 words (park words)
    _bell: Doorbell  # this endpoint's own doorbell
    _park_word: int  # index in _words of this endpoint's park word
    _park_gen: int  # the value last stored there: odd while parked
    _spin_flag: int  # reader: header offset of its spinning-for-a-message hint
    _pidfd: int | None  # reader: the writer's pidfd, once it has one
    _backoff: Backoff
    _spin_base: float  # the configured spin window
    _spin_max: float  # the most _adapt_spin grows it to
    _cadence: Cadence | None  # reader that anticipates: the writer's rhythm

    if TYPE_CHECKING:  # RingEndpoint's peer checks

        def _check_peer_or_poll(
            self, poll: Callable[[], int | None], reason: str | None, parking: bool = False
        ) -> int | None: ...

        def _timeout_error(
            self, timeout: float | None, ahead: int = 0
        ) -> TransferTimeout | PeerClosedError: ...

    async def _wait(
        self,
        poll: Callable[[], int | None],
        timeout: float | None,
        deadline: float | None,
        blocking: bool,
        take: Callable[[int], None] | None = None,
        keep: Callable[[], bool] | None = None,
        rehearse: Callable[[], object] | None = None,
    ) -> int:
        """Spin, then park on the doorbell until ``poll()`` yields a chunk index.

        ``take`` (async waits): when a ring ends a park, the doorbell's fd
        callback itself hands the chunk ``poll()`` then yields to
        ``take(idx)``, which must consume it; the wait returns :data:`TAKEN`.
        Whatever ``take`` wakes then runs in the loop's next turn instead of
        after this task's own turn (one loop iteration of cold code earlier).

        ``keep`` (with ``take``, readers that do not anticipate): after a
        take, while ``keep()`` is true the wait stays parked (announced anew,
        so the writer rings for the next chunk) and every ring is served in
        the callback alone, like a protocol's ``data_received``: no task
        step, future or timer per message. The wait returns :data:`TAKEN`
        once ``keep()`` is false, on its safety interval, or after a chunk
        that came within 4x the base spin window of the park or the previous
        take: close messages (a ping-pong back to back) are caught sooner by
        the task's spin than by a wake-up.

        ``rehearse`` (anticipating readers): called once, when the window in
        which the next chunk is due opens after this wait parked (not in a
        stream, which the spin catches warm), before the spin through it.
        """
        on_rung: Callable[[], bool] | None = None
        taken = False
        parked_at = 0.0  # when the first park began (then: the last take, see on_rung)
        dense_gap: float | None = None  # on_rung handed back after a close message
        if take is not None and not blocking:
            words, word = self._words, self._park_word
            if self._cadence is not None:
                keep = None  # anticipation re-plans its window after every message

            def on_rung() -> bool:
                nonlocal taken, parked_at, dense_gap
                if self._closed or self.buffer.closed:
                    return False
                idx = poll()
                while idx is not None:
                    take(idx)
                    taken = True
                    # Messages that come close together (a ping-pong back to
                    # back, a stream) are caught sooner by the spin than by a
                    # park: hand back to the task, which spins (_adapt_spin
                    # sees this short gap). Only sparse ones are served here.
                    now = _perf_counter()
                    gap, parked_at = now - parked_at, now  # the next gap starts here
                    if gap <= 4 * self._spin_base:
                        dense_gap = gap
                        return False
                    if keep is None or not keep():
                        return False
                    # Still parked: a fresh odd value, so the writer rings once
                    # more; then recheck (announce, fence, look: as a park).
                    gen = self._park_gen = (self._park_gen + 2) & 0xFFFFFFFF
                    words[word] = gen
                    fence()
                    idx = poll()
                return taken and keep is not None

        backoff = self._backoff
        backoff.reset()
        words, word, bell = self._words, self._park_word, self._bell
        reason: str | None = None
        window = self._cadence.plan(_monotonic()) if self._cadence is not None else None
        flagged = 0  # 1 while our "spinning for a message" hint is up
        try:
            while True:
                delay = backoff.next_delay()
                wake_at: float | None = None
                if delay != 0.0 and window is not None:
                    # Anticipation (see cadence.py): spin through the window in
                    # which the next message is due; park until it opens.
                    now = _monotonic()
                    if now >= window[1]:
                        window = None  # it passed empty: park until rung
                        if flagged:
                            self._hdr[self._spin_flag] = flagged = 0
                    elif now >= window[0]:
                        delay = 0.0
                        if not flagged:
                            self._hdr[self._spin_flag] = flagged = 1
                            if rehearse is not None and parked_at:
                                rehearse()  # slept, and the message is due: warm its take
                    else:
                        wake_at = window[0]
                if delay == 0.0:
                    # Give the CPU to the peer if it waits on this core (a busy box,
                    # or a pinned pair): spinning in place would only delay it.
                    _sched_yield()
                    if not blocking:
                        await asyncio.sleep(0)
                    if self._closed or self.buffer.closed:  # closed by another task mid-spin
                        raise PipeClosedError(f"ring endpoint on {self.buffer.name!r} was closed")
                else:
                    if not parked_at:
                        parked_at = _perf_counter()
                    if self.is_writer or self._pidfd is None:
                        # Only the safety recheck finds a dead peer here (a
                        # writer's lagging reader, a writer without a pidfd).
                        delay = min(delay, _UNWATCHED_MAX_PARK)
                    if deadline is not None:
                        left = deadline - _monotonic()
                        if left <= 0:
                            raise self._timeout_error(timeout)
                        delay = min(delay, left)
                    # Announce with a fresh odd value: peers ring once per park, not per chunk.
                    gen = self._park_gen = (self._park_gen + 1) & 0xFFFFFFFF
                    words[word] = gen
                    fence()  # announce, then recheck: the peer either sees us or we see it
                    try:
                        idx = poll()
                        if idx is None:
                            idx = self._check_peer_or_poll(poll, reason, True)
                        if idx is not None:
                            self._adapt_spin(_perf_counter() - parked_at)
                            return idx
                        if blocking:
                            reason = bell.wait_blocking(delay, self._pidfd, wake_at)
                        else:
                            reason = await bell.wait(delay, self._pidfd, wake_at, on_rung)
                        if reason == TIMER and window is not None and self._cadence is not None:
                            window = (window[0], self._cadence.woke(window, _monotonic()))
                    finally:
                        if not (self._closed or self.buffer.closed):
                            self._unpark()
                    if self._closed or self.buffer.closed:
                        raise PipeClosedError(f"ring endpoint on {self.buffer.name!r} was closed")
                    if taken:
                        gap = _perf_counter() - parked_at if dense_gap is None else dense_gap
                        self._adapt_spin(gap)
                        return TAKEN
                idx = poll()
                if idx is not None:
                    if parked_at:
                        self._adapt_spin(_perf_counter() - parked_at)
                    return idx
                if deadline is not None and _monotonic() >= deadline:
                    raise self._timeout_error(timeout)
        finally:
            if flagged and not (self._closed or self.buffer.closed):
                self._hdr[self._spin_flag] = 0

    def _adapt_spin(self, parked_for: float) -> None:
        """Spin longer after parks that were barely needed; not at all after long ones.

        In a stream the other side frees or fills a chunk within microseconds,
        yet a park costs a full wake-up (tens of us, more in a VM), twice per
        bubble. A park that ended within 4x the base window doubles the window
        (from the base, up to 8x). A longer park, as between sparse messages,
        sets it to 0: the next wait parks at once, since a message that is
        milliseconds apart never lands within 50 us, and a cold spin step
        costs its syscalls and a loop turn (measured here: on a 4 KiB round
        trip 2 ms apart it was the shm receiver's extra CPU against tcp's).
        Anticipation, where on, still spins where the next message is due.
        """
        backoff = self._backoff
        base = self._spin_base
        if parked_for <= 4 * base:
            backoff.spin_seconds = min(max(backoff.spin_seconds * 2, base), self._spin_max)
        else:
            backoff.spin_seconds = 0.0

    def _unpark(self) -> None:
        if self._park_gen & 1:
            self._park_gen = (self._park_gen + 1) & 0xFFFFFFFF
            self._words[self._park_word] = self._park_gen
