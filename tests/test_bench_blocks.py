"""The blocks benchmark end to end with tiny sizes: every figure measured beside its baseline.

Speed is not asserted (the lead's runs report it); this checks the suite runs
its two spawned workers to the end over a real Endpoint, verifies the pulled
blocks, and reports each figure with its baseline and target.
"""

from __future__ import annotations

import argparse
import math

import pytest
import shm_workers

from aiokvpipe.bench import blocks

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(autouse=True, scope="module")
def _tracker() -> None:
    shm_workers.start_resource_tracker()  # spawn's process-wide helper: not a leak


def test_every_blocks_figure_is_measured_with_its_baseline() -> None:
    args = argparse.Namespace(
        loop="asyncio",
        quick=True,
        layers=2,
        blocks=4,
        iters=2,
        small_iters=3,
        compute_ms=0.5,
        transport="both",
    )
    results = blocks.run(args)
    # Each transport reports the layer-wise push beside a bare socket's (tcp)
    # or a bare ring's (shm), and one core's block copy beside a contiguous
    # one, both context, before the 16-block read.
    targets = [">= 1.5x faster", ">= 0.80x", "<= 1.15x", "<= 1.15x", "context", "context", "<= 2x"]
    assert [r.target for r in results] == targets + targets
    assert [r.extra["transport"] for r in results] == ["tcp"] * 7 + ["shm"] * 7
    push, floor = results[2], results[3]
    assert floor.value == push.value and floor.baseline_value is not None
    # The floor is never below max(compute, transfer): the bound the issue states.
    assert push.baseline_value is not None and floor.baseline_value >= push.baseline_value
    bare = [results[4], results[11]]  # a bare socket's push, a bare ring's
    assert "bare socket" in bare[0].baseline_name
    assert "bare shared-memory ring" in bare[1].baseline_name
    for raw in bare:  # layer-wise / max(compute, whole): never below the bound's 1x by much
        assert raw.ok is None and raw.unit == "x" and raw.baseline_value is not None
        assert raw.baseline_value > 0.5 and raw.value > 0.5
    copies = [r for r in results if r.name.startswith("one-core copy")]
    assert len(copies) == 2 and all(r.unit == "GB/s" and r.ok is None for r in copies)
    for r in results:
        assert r.suite == "blocks" and (r.ok is not None or r in bare or r in copies), r
        assert math.isfinite(r.value) and r.value > 0, r
        assert r.baseline_value is not None and r.baseline_value > 0, r
    assert results[0].extra["bytes"] == 4 * 2 * 2 * 16 * 8 * 128 * 2
