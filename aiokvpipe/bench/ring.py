"""Ring benchmarks: ``python -m aiokvpipe.bench ring [--loop L] [--quick]``.

Every figure comes from real processes (spawn start method): a writer process
and one or two reader processes attached to a ring this process creates.
Workers (:mod:`aiokvpipe.bench.ring_workers`, run by
:mod:`aiokvpipe.bench.ring_procs`) are spawned once and run one
scenario after another (a spawned interpreter takes seconds to import the
package), each scenario on a fresh ring. Baselines come from the same run:

* wake-up latency and 64 B message rate: a ``multiprocessing.Pipe`` between
  the same kind of processes (blocking ``send_bytes``/``recv_bytes``); and,
  as context for the latency targets, the machine's floor for waking an
  awaiting task on the same loop through an fd (a datagram, no ring);
* idle waiting CPU: the reference ring's way of waiting, a reader polling its
  flag with ``time.sleep(1e-7)``;
* 1 MiB bandwidth: a single-core memcpy of the same bytes, in 1 MiB pieces
  over buffers larger than the CPU caches (as the ring's data is); and, as
  context, a bare handoff of 1 MiB between the same two processes (one
  shared buffer and a flag), interleaved with the ring's runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from ..shm import ShmRingBuffer
from .report import Progress, Result
from .ring_procs import SPAWN, Worker, handoff, latencies, run_ring, run_scenario

SUITE = "ring"
MIB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sparse-messages",
        type=int,
        default=None,
        help="messages per sparse-latency run (default 2500, quick 400)",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=None,
        help="how long the idle reader waits (default 5, quick 1)",
    )
    parser.add_argument(
        "--small-messages",
        type=int,
        default=None,
        help="64 B messages per rate run (default 300000, quick 60000)",
    )
    parser.add_argument(
        "--large-messages",
        type=int,
        default=None,
        help="1 MiB messages per bandwidth run (default 4000, quick 800)",
    )


def _memcpy_bandwidth(size: int, count: int) -> float:
    """Single-core copy of ``count`` pieces of ``size`` bytes, cycling through
    64 MiB buffers so the bytes come from memory, as a ring's do."""
    span = 64 * MIB
    src, dst = os.urandom(span), bytearray(span)
    s, d = memoryview(src), memoryview(dst)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(count):
            off = (i * size) % (span - size + 1)
            d[off : off + size] = s[off : off + size]
        best = max(best, size * count / (time.perf_counter() - t0))
    return best


def _flat(per_reader: list[list[int]]) -> list[int]:
    return [x for samples in per_reader for x in samples]


def _pct(samples: list[int], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


def run(args: argparse.Namespace) -> list[Result]:
    quick = bool(getattr(args, "quick", False))
    loops = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
    sparse_n = getattr(args, "sparse_messages", None) or (400 if quick else 2500)
    idle_s = getattr(args, "idle_seconds", None) or (1.0 if quick else 5.0)
    small_n = getattr(args, "small_messages", None) or (60_000 if quick else 300_000)
    large_n = getattr(args, "large_messages", None) or (800 if quick else 4000)
    progress = Progress(3 + 6 * len(loops), "ring")  # sparse steps count per reader count
    results: list[Result] = []

    pipe_pairs = [SPAWN.Pipe(duplex=False) for _ in range(2)]
    pwriter = Worker([send for _, send in pipe_pairs])
    preaders = [Worker([recv]) for recv, _ in pipe_pairs]
    writer, readers = Worker(), [Worker(), Worker()]
    for recv, send in pipe_pairs:
        recv.close()
        send.close()
    try:
        base_lat = {}
        for k in (1, 2):
            got, sent = run_scenario(
                pwriter,
                preaders[:k],
                ("pipe_write", k, "stamped", sparse_n, 0.002),
                [("pipe_read", "stamped", sparse_n)] * k,
            )
            base_lat[k] = _flat([latencies(sent, g) for g in got])
        progress.step("pipe latency baseline")
        base_rate = run_scenario(
            pwriter,
            preaders[:1],
            ("pipe_write", 1, "rate", small_n, 0.0),
            [("pipe_read", "rate", small_n)],
        )[0][0][0]
        with ShmRingBuffer(0, 64, 1) as flag:
            readers[0].start("poll_idle", flag.name, min(idle_s, 1.0))
            readers[0].expect_ready()
            cpu, wall = readers[0].result()
        base_idle = 100.0 * cpu / wall
        progress.step("pipe rate, polling idle baseline")
        base_bw = _memcpy_bandwidth(MIB, max(large_n // 2, 200)) / 1e9
        progress.step("memcpy baseline")

        for loop in loops:
            address = f"\0aiokv_bench_floor_{os.getpid()}".encode()
            (got,), sent = run_scenario(
                writer,
                readers[:1],
                ("floor_write", address, loop, sparse_n, 0.002),
                [("floor_read", address, loop, sparse_n)],
            )
            lat = latencies(sent, got)
            for q in (0.50, 0.99):
                results.append(
                    Result(
                        SUITE,
                        f"{loop}: fd wake-up floor p{q * 100:.0f} (datagram -> awaiting task)",
                        _pct(lat, q),
                        "us",
                        f"mp.Pipe p{q * 100:.0f}",
                        _pct(base_lat[1], q),
                        "context, no ring",
                    )
                )
            progress.step(f"{loop} fd wake-up floor")
            for k in (1, 2):
                # The library's readers and seed-style busy-poll readers on the
                # same writer (a coroutine sleeping 2 ms: jittered gaps), one
                # run each, back to back, twice: ranges, same minutes.
                runs: list[list[Any]] = []
                seeds: list[list[Any]] = []
                for _ in range(2):
                    seeds.append(
                        run_ring(writer, readers[:k], loop, "stamped", sparse_n, 64, 4096, 16,
                              0.002, seed=True)
                    )  # fmt: skip
                    runs.append(
                        run_ring(
                            writer, readers[:k], loop, "stamped", sparse_n, 64, 4096, 16, 0.002
                        )
                    )
                got = runs[-1]
                lat = _flat([lats for run in runs for lats, _, _ in run])
                slat = _flat([lats for run in seeds for lats, _, _ in run])
                p50, p99 = _pct(lat, 0.50), _pct(lat, 0.99)
                s50, s99 = _pct(slat, 0.50), _pct(slat, 0.99)
                b50, b99 = _pct(base_lat[k], 0.50), _pct(base_lat[k], 0.99)
                what = f"{k} reader{'s' if k > 1 else ''}"
                spread = {
                    "runs_p50": [_pct(_flat([x for x, _, _ in r]), 0.5) for r in runs],
                    "seed_runs_p50": [_pct(_flat([x for x, _, _ in r]), 0.5) for r in seeds],
                    "runs_p99": [_pct(_flat([x for x, _, _ in r]), 0.99) for r in runs],
                    "seed_runs_p99": [_pct(_flat([x for x, _, _ in r]), 0.99) for r in seeds],
                    "mp_pipe_p50": b50,
                    "mp_pipe_p99": b99,
                }
                results.append(
                    Result(
                        SUITE,
                        f"{loop}: wake-up p50, 64 B every ~2 ms (coroutine), {what}",
                        p50,
                        "us",
                        "seed-style reader p50",
                        s50,
                        "<= 0.5x seed",
                        p50 <= 0.5 * s50,
                        spread,
                    )
                )
                results.append(
                    Result(
                        SUITE,
                        f"{loop}: wake-up p99, 64 B every ~2 ms (coroutine), {what}",
                        p99,
                        "us",
                        "seed-style reader p99",
                        s99,
                        "<= 1.0x seed",
                        p99 <= s99,
                        spread,
                    )
                )
                cpu_lib = 100.0 * max(cpu for run in runs for _, cpu, _ in run)
                cpu_seed = 100.0 * max(cpu for run in seeds for _, cpu, _ in run)
                results.append(
                    Result(
                        SUITE,
                        f"{loop}: waiting reader CPU, 64 B every ~2 ms, {what}",
                        cpu_lib,
                        "% core",
                        "seed-style reader",
                        cpu_seed,
                        "<= 15%",
                        cpu_lib <= 15.0,
                    )
                )
                results.append(
                    Result(
                        SUITE,
                        f"{loop}: wake-up p50 vs mp.Pipe, {what}",
                        p50,
                        "us",
                        "mp.Pipe p50 (blocking reader)",
                        b50,
                        "context",
                    )
                )
                # The wake-up alone: from the chunk's publish (its descriptor
                # timestamp) to dequeue returning, without the writer's own
                # enqueue work before the publish.
                woke = _flat([w for _, _, w in got])
                for q in (0.50, 0.99):
                    results.append(
                        Result(
                            SUITE,
                            f"{loop}: publish -> dequeue p{q * 100:.0f}, {what}",
                            _pct(woke, q),
                            "us",
                            f"mp.Pipe p{q * 100:.0f}",
                            _pct(base_lat[k], q),
                            "context",
                        )
                    )
                # The same stream with readers that only park: what
                # anticipation buys, and what it costs in CPU.
                parked = run_ring(
                    writer, readers[:k], loop, "stamped", sparse_n, 64, 4096, 16, 0.002, False
                )
                plat = _flat([lats for lats, _, _ in parked])
                for q in (0.50, 0.99):
                    results.append(
                        Result(
                            SUITE,
                            f"{loop}: wake-up p{q * 100:.0f}, parked readers "
                            f"(anticipate=False), {what}",
                            _pct(plat, q),
                            "us",
                            f"mp.Pipe p{q * 100:.0f}",
                            _pct(base_lat[k], q),
                            "context",
                        )
                    )
                results.append(
                    Result(
                        SUITE,
                        f"{loop}: reader CPU while 64 B arrive every 2 ms, {what}",
                        100.0 * max(cpu for _, cpu, _ in got),
                        "% core",
                        "anticipate=False",
                        100.0 * max(cpu for _, cpu, _ in parked),
                        "context",
                    )
                )
                progress.step(f"{loop} sparse {what}")
            cpu, wall = run_ring(writer, readers[:1], loop, "idle", 1, 64, 4096, 4, idle_s)[0]
            idle = 100.0 * cpu / wall
            results.append(
                Result(
                    SUITE,
                    f"{loop}: idle reader CPU, {idle_s:g} s wait",
                    idle,
                    "% core",
                    "seed-style poll",
                    base_idle,
                    "<= 2%",
                    idle <= 2.0,
                )
            )
            progress.step(f"{loop} idle")
            rates = [
                run_ring(writer, readers[:1], loop, "rate", small_n // 3, 64, 4096, 64)[0][0]
                for _ in range(3)
            ]
            rate = statistics.median(rates)
            results.append(
                Result(
                    SUITE,
                    f"{loop}: 64 B back-to-back, 1 reader (median of 3)",
                    rate,
                    "msg/s",
                    "mp.Pipe",
                    base_rate,
                    ">= 150k msg/s",
                    rate >= 150_000,
                    {"runs": rates},
                )
            )
            progress.step(f"{loop} rate")
            bws, handoffs = [], []
            for _ in range(3):  # interleaved: the machine's cross-CPU copy speed drifts
                bws.append(
                    run_ring(writer, readers[:1], loop, "rate", large_n // 3, MIB, MIB, 8)[0][1]
                    / 1e9
                )
                handoffs.append(handoff(writer, readers[0], max(large_n // 6, 8), MIB) / 1e9)
            bw = statistics.median(bws)
            results.append(
                Result(
                    SUITE,
                    f"{loop}: 1 MiB messages, 1 reader (median of 3)",
                    bw,
                    "GB/s",
                    "1-core memcpy",
                    base_bw,
                    ">= 0.80x memcpy",
                    bw >= 0.8 * base_bw,
                    {"runs": bws},
                )
            )
            results.append(
                Result(
                    SUITE,
                    f"{loop}: 1 MiB messages vs a bare cross-process handoff, same processes",
                    bw,
                    "GB/s",
                    "one shared 1 MiB buffer and a flag, both sides spinning (median of 3)",
                    statistics.median(handoffs),
                    "context",
                    extra={"runs": bws, "handoff_runs": handoffs},
                )
            )
            progress.step(f"{loop} bandwidth")
    finally:
        for w in (pwriter, *preaders, writer, *readers):
            w.stop()
    return results
