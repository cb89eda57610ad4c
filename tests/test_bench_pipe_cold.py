"""The pipe benchmark's cold-stream rows (distinct tensors, held), end to end, tiny.

Speed is not asserted (that lives in the benchmark's output); this checks the
rows exist beside a same-run memcpy over the same working set, and that the
worker really cycles through distinct tensors.
"""

from __future__ import annotations

import io
import math

import pytest

from aiokvpipe import free_port
from aiokvpipe.bench import pipe_cold
from aiokvpipe.bench.pipe_workers import _pipe_worker, memcpy_cold_bandwidth
from aiokvpipe.bench.procs import run_pair
from aiokvpipe.bench.report import Progress, Result

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


def test_cold_rows_sit_beside_a_cold_memcpy() -> None:
    results: list[Result] = []
    progress = Progress(1, "test", stream=io.StringIO())
    pipe_cold.cold_cases(results, progress, "pipe/tcp", ["asyncio"], "tcp", [16 * MiB], True)
    (row,) = results
    assert row.name == "throughput 16 MiB, distinct tensors held (asyncio)"
    assert row.baseline_name == "memcpy over 64 MiB of distinct tensors"
    assert row.extra["cold"] is True and row.extra["count"] >= 8
    assert row.baseline_value is not None and math.isfinite(row.baseline_value)
    assert math.isfinite(row.value) and row.value > 0


def test_the_cold_worker_moves_a_working_set_of_distinct_tensors() -> None:
    got = run_pair(_pipe_worker, "cold", free_port(), 1 * MiB, 8, "asyncio", "shm", 1 << 30)
    assert got["seconds"] > 0 and got["transport0"] == "shm"
    assert memcpy_cold_bandwidth(16 * MiB, total=64 * MiB) > 0


def test_cold_sizes_default_and_filter() -> None:
    assert pipe_cold.cold_sizes(None) == [1 * MiB, 16 * MiB, 64 * MiB]
    assert pipe_cold.cold_sizes([4096, 1 * MiB, 1 << 30]) == [1 * MiB]
