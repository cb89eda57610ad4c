"""The 4 KiB round-trip cases of ``python -m aiokvpipe.bench pipe``.

Each case sets the pipe's round trip against a raw asyncio ping-pong (and gloo)
in the same placement; with ``--transport shm`` it also sets the shm
transport against the tcp transport and a raw wake-up floor, all interleaved
in the same two processes. The workers are in :mod:`aiokvpipe.bench.rtt_workers`
and :mod:`aiokvpipe.bench.pipe_workers`.
"""

from __future__ import annotations

import argparse
import statistics

from ..ports import free_port
from .pipe_workers import _gloo_worker, _pipe_worker
from .procs import percentile, run_pair
from .report import Progress, Result
from .rtt_workers import FLOOR, _asyncio_pingpong_worker, _rtt_mixed_worker, same_cpu_share

KiB, GiB = 1 << 10, 1 << 30


def _rtt_cases(
    results: list[Result],
    progress: Progress,
    suite: str,
    args: argparse.Namespace,
    loops: list[str],
    transport: str,
    shm: bool,
    n_rtt: int,
    where: str,
    pin: tuple[int, int] | None,
    gap: float = 0.0,
) -> None:
    """4 KiB round trips of the pipe and its baselines, all placed by ``pin``."""
    # The default rows (unpinned, jittered gaps) carry the shm-vs-tcp target;
    # the raw/gloo targets stay on the pinned separate-cores rows, whose
    # baselines run back to back the same way. The shared-core rows are context.
    default = where.startswith("unpinned")
    targets = where != "one shared core"
    gloo_rtt = None
    if not args.no_gloo:
        gloo_rtt = statistics.median(
            run_pair(_gloo_worker, "rtt", free_port(), 4 * KiB, n_rtt, pin=pin)["samples"]
        )
        progress.step(f"gloo rtt, {where}")
    for loop_name in loops:
        base = run_pair(_asyncio_pingpong_worker, free_port(), 4 * KiB, n_rtt, loop_name, pin=pin)[
            "samples"
        ]
        run = run_pair(
            _pipe_worker, "rtt", free_port(), 4 * KiB, n_rtt, loop_name, transport, 1 * GiB,
            True, gap, pin=pin,
        )  # fmt: skip
        got = run["samples"]
        p50, base50 = statistics.median(got), statistics.median(base)
        gated = where == "separate cores" and loop_name == "uvloop"
        results.append(
            Result(
                suite,
                f"4 KiB round trip p50, {where} ({loop_name})",
                p50 * 1e6,
                "us",
                f"raw asyncio ping-pong ({loop_name})",
                base50 * 1e6,
                "<= 1.5x raw asyncio" if gated else "",
                (p50 <= 1.5 * base50) if gated else None,
            )
        )
        results.append(
            Result(
                suite,
                f"4 KiB round trip p99, {where} ({loop_name})",
                percentile(got, 0.99) * 1e6,
                "us",
                f"raw asyncio ping-pong ({loop_name})",
                percentile(base, 0.99) * 1e6,
            )
        )
        results.append(
            Result(
                suite,
                f"4 KiB round trip, CPU per message, receiving side, {where} ({loop_name})",
                run["cpu1"] * 1e6,
                "us",
                "sending side (waits for the echo)",
                run["cpu0"] * 1e6,
                "context",
            )
        )
        if targets:
            # The same pipe with receivers that always park: anticipation
            # spends CPU to be awake when the reply lands; this is without it.
            parked = run_pair(
                _pipe_worker, "rtt", free_port(), 4 * KiB, n_rtt, loop_name, transport, 1 * GiB,
                False, gap, pin=pin,
            )["samples"]  # fmt: skip
            results.append(
                Result(
                    suite,
                    f"4 KiB round trip p50, anticipate=False, {where} ({loop_name})",
                    statistics.median(parked) * 1e6,
                    "us",
                    f"raw asyncio ping-pong ({loop_name})",
                    base50 * 1e6,
                    "context",
                )
            )
        if shm:
            _shm_vs_tcp_rtt(results, suite, loop_name, n_rtt, where, pin, gap, default, targets)
            progress.step(f"tcp rtt {loop_name}, {where}")
        if gloo_rtt is not None:
            results.append(
                Result(
                    suite,
                    f"4 KiB round trip p50 vs gloo, {where} ({loop_name})",
                    p50 * 1e6,
                    "us",
                    "gloo send/recv",
                    gloo_rtt * 1e6,
                    "<= 0.5x gloo" if gated else "",
                    (p50 <= 0.5 * gloo_rtt) if gated else None,
                )
            )
        progress.step(f"rtt {loop_name}, {where}")


def _shm_vs_tcp_rtt(
    results: list[Result],
    suite: str,
    loop_name: str,
    n_rtt: int,
    where: str,
    pin: tuple[int, int] | None,
    gap: float,
    default: bool,
    targets: bool,
) -> None:
    """The shm transport's 4 KiB round trip against the tcp transport's, both
    Pipes in the same two processes, interleaved in blocks of 10 (separate
    process pairs land in different scheduler regimes: ratios between them
    moved 1.5-2.9x either way), with anticipation on and off."""
    block = 10
    count = -(-n_rtt // block) * block
    for anticipate in (True, False) if targets else (True,):
        got = run_pair(
            _rtt_mixed_worker,
            [free_port(), free_port(), free_port()],
            [("shm", anticipate), ("tcp", anticipate), (FLOOR, False)],
            4 * KiB,
            count,
            loop_name,
            gap,
            block,
            pin=pin,
        )
        (shm_s, tcp_s, floor_s), (shm_cpu0, tcp_cpu0, _), (shm_cpu1, tcp_cpu1, floor_cpu1) = (
            got["samples"],
            got["cpu0"],
            got["cpu1"],
        )
        shm50, tcp50 = statistics.median(shm_s), statistics.median(tcp_s)
        floor50 = statistics.median(floor_s)
        shared = [same_cpu_share(a, b) for a, b in zip(got["where0"], got["where1"], strict=True)]
        how = "" if anticipate else "anticipate=False, "
        extra = {
            "p99_us": [percentile(shm_s, 0.99) * 1e6, percentile(tcp_s, 0.99) * 1e6],
            "cpu_per_rt_us_sender": [shm_cpu0 * 1e6, tcp_cpu0 * 1e6],
            "cpu_per_rt_us_echo": [shm_cpu1 * 1e6, tcp_cpu1 * 1e6],
            "floor_p50_us": floor50 * 1e6,
            "floor_cpu_per_rt_us_echo": floor_cpu1 * 1e6,
            "echo_on_senders_cpu": shared,
        }
        results.append(
            Result(
                suite,
                f"4 KiB round trip p50 vs tcp transport, {how}same processes, {where} "
                f"({loop_name})",
                shm50 * 1e6,
                "us",
                f"tcp transport ({loop_name})",
                tcp50 * 1e6,
                "<= 0.7x tcp" if default else "",
                (shm50 <= 0.7 * tcp50) if default else None,
                extra,
            )
        )
        results.append(
            Result(
                suite,
                f"4 KiB round trip p50 vs the wake-up floor, {how}same processes, {where} "
                f"({loop_name})",
                shm50 * 1e6,
                "us",
                f"raw Unix-socket echo, both sides parked (tcp transport: {tcp50 * 1e6:.0f} us)",
                floor50 * 1e6,
                "context",
            )
        )
        results.append(
            Result(
                suite,
                f"4 KiB round trip, CPU per message, echoing (waiting) side, shm vs tcp, "
                f"{how}{where} ({loop_name})",
                shm_cpu1 * 1e6,
                "us",
                "tcp transport, same processes",
                tcp_cpu1 * 1e6,
                "context",
            )
        )
        if shared[0] is not None and shared[1] is not None:
            # Unpinned on these VMs, a parked echo was woken on the sender's
            # vCPU in 99 % of round trips (2026-12-04): the two sides' work
            # then runs in series, and shm/tcp follows their CPU per message.
            results.append(
                Result(
                    suite,
                    f"4 KiB round trips whose echo ran on the sender's CPU, shm, "
                    f"{how}{where} ({loop_name})",
                    shared[0] * 100,
                    "%",
                    "tcp transport, same processes",
                    shared[1] * 100,
                    "context",
                )
            )
