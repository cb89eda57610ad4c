"""The shm-vs-tcp round-trip case of the pipe benchmark, end to end with tiny counts.

Speed is not asserted (that lives in the benchmark's output); this checks
that the interleaved worker runs both Pipes and the raw wake-up floor in the
same two processes and reports each figure beside its baseline.
"""

from __future__ import annotations

import math
import sys

import pytest

from aiokvpipe.bench import pipe_rtt
from aiokvpipe.bench.report import Result
from aiokvpipe.bench.rtt_workers import same_cpu_share

pytestmark = pytest.mark.timeout(120)


def test_shm_vs_tcp_round_trip_reports_the_wake_up_floor_beside_both_transports() -> None:
    results: list[Result] = []
    where = "unpinned, ~2 ms gaps"
    pipe_rtt._shm_vs_tcp_rtt(results, "pipe/shm", "asyncio", 20, where, None, 0.001, True, True)
    by_name = {r.name: r for r in results}
    for how in ("", "anticipate=False, "):
        vs_tcp = by_name[
            f"4 KiB round trip p50 vs tcp transport, {how}same processes, {where} (asyncio)"
        ]
        floor = by_name[
            f"4 KiB round trip p50 vs the wake-up floor, {how}same processes, {where} (asyncio)"
        ]
        assert vs_tcp.target == "<= 0.7x tcp" and vs_tcp.ok is not None
        # Same shm samples in both rows; the floor is its own measurement.
        assert floor.value == vs_tcp.value
        assert floor.baseline_name.startswith("raw Unix-socket echo")
        assert floor.baseline_value is not None and 0 < floor.baseline_value < 1_000_000
        assert vs_tcp.extra is not None
        assert vs_tcp.extra["floor_p50_us"] == pytest.approx(floor.baseline_value)
        placed = by_name.get(
            f"4 KiB round trips whose echo ran on the sender's CPU, shm, {how}{where} (asyncio)"
        )
        if sys.platform == "linux":
            assert placed is not None
        if placed is not None:
            assert placed.unit == "%" and 0 <= placed.value <= 100
            assert placed.baseline_value is not None and 0 <= placed.baseline_value <= 100
            shares = vs_tcp.extra["echo_on_senders_cpu"]
            assert [placed.value, placed.baseline_value] == pytest.approx(
                [shares[0] * 100, shares[1] * 100]
            )
    for r in results:
        if r.unit == "%":
            continue
        assert math.isfinite(r.value) and r.value > 0, r
        assert r.baseline_value is not None and r.baseline_value > 0, r


def test_same_cpu_share_counts_only_round_trips_whose_cpus_were_read() -> None:
    assert same_cpu_share([0, 1, 1, 0], [0, 0, 1, 1]) == 0.5
    assert same_cpu_share([0, -1, 1], [0, 1, -1]) == 1.0  # -1: not read, left out
    assert same_cpu_share([-1, -1], [-1, -1]) is None
    assert same_cpu_share([], []) is None
    with pytest.raises(ValueError):
        same_cpu_share([0], [0, 1])  # both sides count the same round trips
