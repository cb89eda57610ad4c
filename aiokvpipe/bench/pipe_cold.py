"""``bench pipe``'s cold-stream rows: distinct tensors, held, against a cold memcpy.

The throughput rows send one tensor over and over to a receiver that drops
each: source, ring and destination all stay in the last-level cache, a
ceiling no server reaches (a 1 MiB copy here runs at ~60 GB/s hot and ~10-13
GB/s from DRAM). A server streams distinct KV blocks and keeps what it
receives; ``examples/demo.py`` does the same. These rows measure that: both
sides cycle through twice the cache's worth of tensors, beside a
single-core memcpy over the same working set, in the same run.
"""

from __future__ import annotations

from ..ports import free_port
from .pipe_workers import COLD_WORKING_SET, _pipe_worker, memcpy_cold_bandwidth
from .procs import run_pair
from .report import Progress, Result, human_size

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
COLD_SIZES = (1 * MiB, 16 * MiB, 64 * MiB)


def cold_sizes(sizes: list[int] | None) -> list[int]:
    """The sizes the cold rows run: the requested ones of 64 KiB and up, else COLD_SIZES."""
    if sizes is None:
        return list(COLD_SIZES)
    return [s for s in sizes if 64 * KiB <= s <= 256 * MiB]


def cold_cases(
    results: list[Result],
    progress: Progress,
    suite: str,
    loops: list[str],
    transport: str,
    sizes: list[int],
    quick: bool,
) -> None:
    budget = 256 * MiB if quick else 1 * GiB
    for size in sizes:
        count = max(8, budget // size)
        memcpy_bps = memcpy_cold_bandwidth(size)
        for loop_name in loops:
            best = 0.0
            for _ in range(1 if quick else 2):
                got = run_pair(
                    _pipe_worker, "cold", free_port(), size, count, loop_name, transport, 1 * GiB
                )
                best = max(best, size * count / got["seconds"])
            results.append(
                Result(
                    suite,
                    f"throughput {human_size(size)}, distinct tensors held ({loop_name})",
                    best / 1e9,
                    "GB/s",
                    f"memcpy over {COLD_WORKING_SET // MiB} MiB of distinct tensors",
                    memcpy_bps / 1e9,
                    "",
                    None,
                    {"size": size, "count": count, "loop": loop_name, "cold": True},
                )
            )
            progress.step(f"cold {loop_name} {size}")
