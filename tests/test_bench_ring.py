"""The ring benchmark end to end with tiny counts: every figure, each a real measurement.

Speed is not asserted here (that lives in the benchmark's own output); this
checks that the suite runs its spawned workers to the end, pairs every
latency sample with its send, and reports each figure beside its baseline.
"""

from __future__ import annotations

import argparse
import math

import pytest
import shm_workers

from aiokvpipe.bench import ring

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(autouse=True, scope="module")
def _tracker() -> None:
    shm_workers.start_resource_tracker()  # spawn's process-wide helper: not a leak


def test_every_ring_figure_is_measured_with_its_baseline() -> None:
    args = argparse.Namespace(
        loop="asyncio",
        quick=True,
        sparse_messages=30,
        idle_seconds=0.2,
        small_messages=3000,
        large_messages=24,
    )
    results = ring.run(args)
    by_name = {r.name: r for r in results}
    for readers in ("1 reader", "2 readers"):
        for q in ("p50", "p99"):
            wake = by_name[f"asyncio: wake-up {q}, 64 B every ~2 ms (coroutine), {readers}"]
            # the seed-style busy-poll reader, run on the same writer in the same run
            assert wake.baseline_name == f"seed-style reader {q}"
            assert 0 < wake.baseline_value < 1_000_000
            # a send-to-receive time: positive, and far below the 2 ms gap
            # unless the machine stalled (bounded generously: CI is noisy)
            assert 0 < wake.value < 1_000_000
            assert by_name[f"asyncio: publish -> dequeue {q}, {readers}"].value > 0
    handoff = by_name["asyncio: 1 MiB messages vs a bare cross-process handoff, same processes"]
    # the same ring runs as the memcpy row's, beside a handoff interleaved with them
    assert handoff.value == by_name["asyncio: 1 MiB messages, 1 reader (median of 3)"].value
    assert len(handoff.extra["handoff_runs"]) == 3
    for r in results:
        assert math.isfinite(r.value) and r.value > 0, r
        assert r.baseline_value is not None and r.baseline_value > 0, r
    targets = [r for r in results if r.ok is not None]
    assert {r.target for r in targets} == {
        "<= 0.5x seed",
        "<= 1.0x seed",
        "<= 15%",
        "<= 2%",
        ">= 150k msg/s",
        ">= 0.80x memcpy",
    }
