"""Cadence: the predicted window of the next arrival, on plain floats (seconds)."""

from __future__ import annotations

from typing import Any

import pytest

from aiokvpipe.cadence import Cadence

pytestmark = pytest.mark.timeout(10)

MS = 1e-3
US = 1e-6


def fed(cadence: Cadence, start: float, gaps: list[float]) -> float:
    """Record an arrival at ``start`` and one after each gap; the last arrival's time."""
    t = start
    cadence.arrived(t)
    for gap in gaps:
        t += gap
        cadence.arrived(t)
    return t


def test_no_window_before_min_history_gaps() -> None:
    cadence = Cadence(min_history=4)
    assert cadence.window() is None  # nothing seen
    cadence.arrived(100.0)
    assert cadence.window() is None  # one arrival: no gap yet
    for i in range(1, 4):
        cadence.arrived(100.0 + i * 10 * MS)
        assert cadence.window() is None, f"{i} gaps must not predict"
    cadence.arrived(100.0 + 40 * MS)  # the fourth gap
    assert cadence.window() is not None


def test_window_spans_the_recent_gaps_widened_by_lead_and_tail() -> None:
    # A wide budget, so nothing is cut: opens at last + shortest gap - lead,
    # closes at last + longest gap + tail.
    cadence = Cadence(lead=100 * US, tail=200 * US, budget=1.0, max_window=50 * MS)
    last = fed(cadence, 5.0, [10 * MS, 11 * MS, 10.5 * MS, 12 * MS])
    opens, closes = cadence.window()  # type: ignore[misc]
    assert opens == pytest.approx(last + 10 * MS - 100 * US)
    assert closes == pytest.approx(last + 12 * MS + 200 * US)


def test_window_is_cached_until_something_changes() -> None:
    cadence = Cadence()
    last = fed(cadence, 1.0, [2 * MS] * 4)
    first = cadence.window()
    assert cadence.window() == first
    cadence.arrived(last + 2 * MS)
    assert cadence.window() != first
    assert cadence.window()[0] == pytest.approx(first[0] + 2 * MS)  # type: ignore[index]


def test_budget_caps_the_window_from_its_start() -> None:
    # Gaps of 10-14 ms: the raw window is ~4.2 ms wide, the budget allows 20%
    # of the median gap (2.4 ms): early arrivals are caught, late ones are not.
    cadence = Cadence(lead=100 * US, tail=100 * US, budget=0.2, max_window=50 * MS)
    last = fed(cadence, 0.0, [10 * MS, 14 * MS, 12 * MS, 13 * MS, 11 * MS])
    opens, closes = cadence.window()  # type: ignore[misc]
    median = 12 * MS  # sorted gaps [10, 11, 12, 13, 14]
    assert opens == pytest.approx(last + 10 * MS - 100 * US), "the cut keeps the opening"
    assert closes - opens == pytest.approx(0.2 * median)
    assert closes < last + 14 * MS + 100 * US


def test_budget_is_bounded_by_max_window() -> None:
    cadence = Cadence(budget=0.5, min_window=250 * US, max_window=1 * MS)
    last = fed(cadence, 0.0, [20 * MS, 30 * MS, 25 * MS, 22 * MS])
    opens, closes = cadence.window()  # type: ignore[misc]
    assert opens == pytest.approx(last + 20 * MS - cadence.lead)
    assert closes - opens == pytest.approx(1 * MS)  # 0.5 * 25 ms, capped


def test_budget_is_raised_to_min_window() -> None:
    # Short gaps: 20% of 0.5 ms is 100 us, below min_window (250 us).
    cadence = Cadence(budget=0.2, lead=10 * US, tail=500 * US, min_window=250 * US)
    last = fed(cadence, 0.0, [0.5 * MS, 0.6 * MS, 0.5 * MS, 0.55 * MS])
    opens, closes = cadence.window()  # type: ignore[misc]
    assert opens == pytest.approx(last + 0.5 * MS - 10 * US)
    assert closes - opens == pytest.approx(250 * US)


def test_a_window_narrower_than_the_budget_is_not_widened() -> None:
    cadence = Cadence(lead=50 * US, tail=50 * US, budget=0.2, min_window=0.0, max_window=10 * MS)
    last = fed(cadence, 0.0, [10 * MS] * 5)  # a steady rhythm
    opens, closes = cadence.window()  # type: ignore[misc]
    assert opens == pytest.approx(last + 10 * MS - 50 * US)
    assert closes == pytest.approx(last + 10 * MS + 50 * US)


def test_woke_late_widens_the_lead() -> None:
    cadence = Cadence(lead=100 * US)
    last = fed(cadence, 0.0, [2 * MS] * 4)
    base = cadence.window()[0]  # type: ignore[index]
    assert base == pytest.approx(last + 2 * MS - 100 * US)
    cadence.woke_late(60 * US)  # one measurement: used as it is
    assert cadence.window()[0] == pytest.approx(base - 60 * US)  # type: ignore[index]
    cadence.woke_late(40 * US)  # two: the upper median (60 us)
    assert cadence.window()[0] == pytest.approx(base - 60 * US)  # type: ignore[index]
    cadence.woke_late(30 * US)  # [30, 40, 60]: the median is 40 us
    assert cadence.window()[0] == pytest.approx(base - 40 * US)  # type: ignore[index]


def test_a_late_timer_still_spins_for_the_whole_window() -> None:
    cadence = Cadence(lead=100 * US, max_window=1 * MS)
    fed(cadence, 0.0, [2 * MS] * 4)
    opens, closes = cadence.window()  # type: ignore[misc]
    assert cadence.woke((opens, closes), opens + 300 * US) == pytest.approx(closes + 300 * US)
    assert cadence._lateness[-1] == pytest.approx(300 * US)
    early = cadence.woke((opens, closes), opens - 5 * US)
    assert early == pytest.approx(closes), "an early wake-up spins as planned"
    # a wake-up very late (the host ran something else) extends by at most max_window
    assert cadence.woke((opens, closes), opens + 1.0) == pytest.approx(closes + 1 * MS)


def test_one_late_outlier_does_not_widen_every_window() -> None:
    cadence = Cadence(lead=100 * US, max_window=1 * MS)
    last = fed(cadence, 0.0, [2 * MS] * 4)
    for _ in range(5):
        cadence.woke_late(50 * US)
    typical = cadence.window()[0]  # type: ignore[index]
    assert typical == pytest.approx(last + 2 * MS - 150 * US)
    cadence.woke_late(900 * US)  # one wake-up that came very late
    assert cadence.window()[0] == pytest.approx(typical)  # type: ignore[index]


def test_lateness_is_clamped_to_zero_and_max_window() -> None:
    cadence = Cadence(lead=100 * US, max_window=1 * MS)
    last = fed(cadence, 0.0, [2 * MS] * 4)
    cadence.woke_late(-5.0)  # "early" (clock noise) counts as on time
    assert cadence.window()[0] == pytest.approx(last + 2 * MS - 100 * US)  # type: ignore[index]
    cadence.woke_late(10.0)
    cadence.woke_late(10.0)
    assert cadence.window()[0] == pytest.approx(  # type: ignore[index]
        last + 2 * MS - 100 * US - 1 * MS
    )


def test_one_outlier_gap_does_not_move_the_opening() -> None:
    cadence = Cadence(lead=100 * US, budget=0.2, max_window=50 * MS)
    t = fed(cadence, 0.0, [10 * MS] * 6)
    assert cadence.window()[0] == pytest.approx(t + 10 * MS - 100 * US)  # type: ignore[index]
    t += 500 * MS  # a pause (the scheduler had nothing to do)
    cadence.arrived(t)
    opens, closes = cadence.window()  # type: ignore[misc]
    assert opens == pytest.approx(t + 10 * MS - 100 * US)
    assert closes - opens == pytest.approx(0.2 * 10 * MS)  # the median gap is still 10 ms
    t += 10 * MS
    cadence.arrived(t)
    assert cadence.window()[0] == pytest.approx(t + 10 * MS - 100 * US)  # type: ignore[index]


def test_one_short_gap_does_not_pull_the_window_early() -> None:
    # A writer that once published 1.1 ms after the previous message (the
    # rest ~2.1-2.2 ms apart): a window opened at the shortest gap would end
    # before every later arrival for the next `history` messages.
    cadence = Cadence(lead=100 * US, tail=100 * US, budget=0.2)
    gaps = [2.10 * MS, 2.15 * MS, 1.10 * MS, 2.20 * MS, 2.12 * MS, 2.18 * MS]
    last = fed(cadence, 0.0, gaps)
    opens, closes = cadence.window()  # type: ignore[misc]
    assert opens == pytest.approx(last + 2.10 * MS - 100 * US), "placed on the bulk of the gaps"
    assert closes == pytest.approx(last + 2.20 * MS + 100 * US), "every usual gap is covered"
    assert closes - opens <= 0.2 * 2.15 * MS  # within the budget


def test_the_budget_goes_where_most_gaps_are() -> None:
    # Two clusters: one early arrival, four late ones; the cut window covers the four.
    cadence = Cadence(lead=0.0, tail=0.0, budget=0.1, min_window=0.0, max_window=50 * MS)
    last = fed(cadence, 0.0, [8 * MS, 10 * MS, 10.2 * MS, 10.4 * MS, 10.6 * MS])
    opens, closes = cadence.window()  # type: ignore[misc]
    assert opens == pytest.approx(last + 10 * MS)
    assert closes == pytest.approx(last + 10.6 * MS)


def test_only_the_last_history_gaps_count() -> None:
    cadence = Cadence(history=4, min_history=4, lead=0.0)
    t = fed(cadence, 0.0, [1 * MS] * 4)
    assert cadence.window()[0] == pytest.approx(t + 1 * MS)  # type: ignore[index]
    t = fed(cadence, t + 5 * MS, [5 * MS] * 3)  # four 5 ms gaps push the 1 ms ones out
    assert cadence.window()[0] == pytest.approx(t + 5 * MS)  # type: ignore[index]


def test_reset_forgets_the_rhythm() -> None:
    cadence = Cadence(lead=0.0, min_history=4)
    fed(cadence, 0.0, [1 * MS] * 8)
    assert cadence.window() is not None
    cadence.reset()
    assert cadence.window() is None
    cadence.arrived(50.0)  # not a gap from the forgotten last arrival
    assert cadence.window() is None
    t = fed(cadence, 50.0 + 3 * MS, [3 * MS] * 3)
    assert cadence.window() is not None
    assert cadence.window()[0] == pytest.approx(t + 3 * MS)  # type: ignore[index]


def test_non_increasing_arrival_times_are_ignored() -> None:
    cadence = Cadence(lead=0.0, tail=0.0, min_window=0.0)
    t = fed(cadence, 10.0, [2 * MS] * 4)
    before = cadence.window()
    cadence.arrived(t)  # the same instant again (a message with several chunks)
    cadence.arrived(t - 1 * MS)  # out of order
    cadence.arrived(0.0)
    assert cadence.window() == before
    t += 2 * MS
    cadence.arrived(t)  # gaps are measured from the latest arrival, not the stale ones
    opens, closes = cadence.window()  # type: ignore[misc]
    assert opens == pytest.approx(t + 2 * MS)
    assert closes == pytest.approx(t + 2 * MS)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"budget": 0.0},
        {"budget": -0.1},
        {"budget": 1.5},
        {"lead": -1e-6},
        {"tail": -1e-6},
        {"min_window": -1e-6},
        {"min_window": 2e-3, "max_window": 1e-3},
        {"min_history": 1},
        {"min_history": 5, "history": 4},
    ],
)
def test_invalid_parameters_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Cadence(**kwargs)


def test_boundary_parameters_are_accepted() -> None:
    Cadence(budget=1.0, lead=0.0, tail=0.0, min_window=0.0, max_window=0.0)
    Cadence(min_history=2, history=2)
