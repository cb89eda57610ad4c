"""Predict when the next message is due, so a waiter can be awake for it.

Waking a parked process costs tens of microseconds on bare metal and
70-150 us on the VMs this project is measured on (an idle vCPU has to be
brought back by the host), and that is most of a parked reader's latency.
Inference traffic is rhythmic, though: one broadcast per scheduler step, one
reply per request. :class:`Cadence` learns the rhythm from the gaps between
recent arrivals and names a short window around the next expected arrival;
the waiter parks until the window opens (a precise timer), spins through it,
and parks normally if nothing came. The window is bounded by a CPU budget
(a fraction of the gap), so anticipating costs at most that fraction of a
core while messages flow, and nothing once they stop: the window of a
stopped stream passes once, then the waiter parks until rung.

Pure logic on plain floats (seconds), so it is tested without processes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

__all__ = ["Cadence"]


@dataclass
class Cadence:
    """Arrival-rhythm predictor; one per waiter, fed with arrival times.

    ``lead`` starts the window that long before the earliest recent gap
    predicts, plus how late recent timer wake-ups typically were
    (:meth:`woke_late`, the median: 50-125 us on a VM, as late as any other
    wake-up; a waiter woken later spins as long as planned from its actual
    wake-up, so the budget is never lost to a late timer); ``tail`` keeps it open
    past the latest. ``budget`` caps the window at that fraction of
    the median gap, but never below ``min_window`` (short gaps are cheaper to
    spin through than to park for) nor above ``max_window``. A window opening
    less than ``spin_ahead`` after a wait starts is spun from the start (a
    timer wake-up would cost about as much as the wait). ``history``
    gaps are kept; ``min_history`` are needed before any prediction.
    """

    budget: float = 0.2
    lead: float = 100e-6
    tail: float = 100e-6
    min_window: float = 250e-6
    max_window: float = 1e-3
    spin_ahead: float = 200e-6
    history: int = 16
    min_history: int = 4
    _gaps: deque[float] = field(init=False, repr=False)
    _last: float | None = field(default=None, init=False, repr=False)
    _window: tuple[float, float] | None = field(default=None, init=False, repr=False)
    _lateness: deque[float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        spans = (self.lead, self.tail, self.min_window, self.spin_ahead)
        if min(spans) < 0 or self.max_window < self.min_window:
            raise ValueError(
                "lead, tail, min_window, spin_ahead must be >= 0 and max_window >= min_window"
            )
        if not 2 <= self.min_history <= self.history:
            raise ValueError("need 2 <= min_history <= history")
        self._gaps = deque(maxlen=self.history)
        self._lateness = deque(maxlen=self.history)

    def woke_late(self, seconds: float) -> None:
        """Record how late a wake-up timer for :meth:`window` fired."""
        self._lateness.append(min(max(seconds, 0.0), self.max_window))
        self._window = None

    def woke(self, planned: tuple[float, float], now: float) -> float:
        """A timer for the window ``planned`` fired at ``now``: record how late
        it was, and return when to stop spinning (the close, pushed back by
        that lateness: the budget is spin time, and a late timer spent none)."""
        late = max(now - planned[0], 0.0)
        self.woke_late(late)
        return planned[1] + min(late, self.max_window)

    def arrived(self, at: float) -> None:
        """Record an arrival (any monotonic clock, seconds; non-decreasing)."""
        last = self._last
        if last is not None and at > last:
            self._gaps.append(at - last)
            self._window = None
        if last is None or at > last:
            self._last = at

    def reset(self) -> None:
        """Forget the rhythm (e.g. after a long pause or a reconnect)."""
        self._gaps.clear()
        self._last = None
        self._window = None

    def window(self) -> tuple[float, float] | None:
        """``(opens, closes)`` of the next expected arrival, or None (no rhythm yet).

        Times are on the clock given to :meth:`arrived`. The window is the
        span of recent gaps after the last arrival, widened by ``lead`` and
        ``tail``, then cut to the budget from its start (early arrivals are
        caught, the latest ones park as before).
        """
        if self._window is not None or self._last is None:
            return self._window
        gaps = self._gaps
        if len(gaps) < self.min_history:
            return None
        ordered = sorted(gaps)
        median = ordered[len(ordered) // 2]
        late = sorted(self._lateness)
        # The typical recent lateness: a wake-up later than that still spins for
        # the whole budget (the waiter extends the close by its own lateness).
        lead = self.lead + (late[len(late) // 2] if late else 0.0)
        allowed = min(self.max_window, max(self.min_window, self.budget * median))
        first = ordered[0]
        if ordered[-1] + self.tail - (first - lead) > allowed:
            first = _densest_start(ordered, allowed - lead)
        opens = self._last + first - lead
        closes = self._last + ordered[-1] + self.tail
        self._window = (opens, min(closes, opens + allowed))
        return self._window

    def plan(self, now: float) -> tuple[float, float] | None:
        """``(spin_from, spin_until)`` for a wait starting at ``now``, or None: park.

        ``spin_from > now`` means: park with a wake-up timer until then.
        """
        window = self.window()
        if window is None or now >= window[1]:
            return None
        opens, closes = window
        return (opens if opens - now > self.spin_ahead else now), closes


def _densest_start(ordered: list[float], span: float) -> float:
    """The earliest gap ``g`` of ``ordered`` (sorted) maximising how many gaps
    lie in ``[g, g + span]``."""
    best, best_count, hi = ordered[0], 0, 0
    for lo, start in enumerate(ordered):
        while hi < len(ordered) and ordered[hi] <= start + span:
            hi += 1
        if hi - lo > best_count:
            best, best_count = start, hi - lo
    return best
