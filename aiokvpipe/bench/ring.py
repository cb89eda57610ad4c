"""Ring benchmarks: ``python -m aiokvpipe.bench ring [--loop L] [--quick]``.

Every figure comes from real processes (spawn start method): a writer
process and one or two reader processes attached to a ring that this process
creates. Baselines are measured in the same run:

* wake-up latency and message rate beside a ``multiprocessing.Pipe`` between
  the same processes (blocking ``send_bytes``/``recv_bytes``);
* idle waiting CPU beside the reference ring's way of waiting (a reader
  polling its flag with ``time.sleep(1e-7)``);
* 1 MiB bandwidth beside a single-core memcpy of the same bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import struct
import time
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from typing import Any

from ..shm import ShmRingBuffer, ShmRingBufferIO, ShmRingHandle
from .report import Progress, Result

SUITE = "ring"
_STAMP = struct.Struct("<q")
_ctx = mp.get_context("spawn")


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
        help="64 B messages per rate run (default 200000, quick 40000)",
    )
    parser.add_argument(
        "--large-messages",
        type=int,
        default=None,
        help="1 MiB messages per bandwidth run (default 3000, quick 600)",
    )


# -- child processes ---------------------------------------------------------


def _run_loop(loop_name: str, coro: Coroutine[Any, Any, Any]) -> Any:
    if loop_name == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def _writer_main(
    handle: ShmRingHandle,
    loop_name: str,
    mode: str,
    n: int,
    size: int,
    interval: float,
    conn: Connection,
) -> None:
    io = ShmRingBufferIO.attach(handle, -1)

    async def body() -> None:
        if mode in ("sparse", "idle"):
            pad = bytes(size - _STAMP.size)
            for _ in range(n):
                await asyncio.sleep(interval)
                await io.enqueue(_STAMP.pack(time.perf_counter_ns()) + pad, timeout=30)
        else:
            payload = os.urandom(size)
            for _ in range(n):
                await io.enqueue(payload, timeout=30)

    try:
        conn.recv()  # go
        _run_loop(loop_name, body())
        conn.send("done")
    finally:
        io.close()
        conn.close()


def _reader_main(
    handle: ShmRingHandle, rank: int, loop_name: str, mode: str, n: int, conn: Connection
) -> None:
    io = ShmRingBufferIO.attach(handle, rank)

    async def body() -> Any:
        if mode == "sparse":
            lat = []
            for _ in range(n):
                msg = await io.dequeue(timeout=30)
                lat.append(time.perf_counter_ns() - _STAMP.unpack_from(msg)[0])
            return lat
        if mode == "idle":
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await io.dequeue(timeout=60)
            return (time.process_time() - cpu0, time.perf_counter() - wall0)
        await io.dequeue(timeout=30)
        t0 = time.perf_counter()
        nbytes = 0
        for _ in range(n - 1):
            nbytes += len(await io.dequeue(timeout=30))
        return ((n - 1) / (time.perf_counter() - t0), nbytes / (time.perf_counter() - t0))

    try:
        conn.send("ready")
        conn.send(_run_loop(loop_name, body()))
    finally:
        io.close()
        conn.close()


def _pipe_writer_main(
    conns: list[Connection], mode: str, n: int, size: int, interval: float, go: Connection
) -> None:
    go.recv()
    payload = bytes(size)
    for _ in range(n):
        if mode == "sparse":
            time.sleep(interval)
            payload = _STAMP.pack(time.perf_counter_ns()) + bytes(size - _STAMP.size)
        for c in conns:
            c.send_bytes(payload)
    go.send("done")


def _pipe_reader_main(conn: Connection, mode: str, n: int, out: Connection) -> None:
    out.send("ready")
    if mode == "sparse":
        lat = []
        for _ in range(n):
            msg = conn.recv_bytes()
            lat.append(time.perf_counter_ns() - _STAMP.unpack_from(msg)[0])
        out.send(lat)
        return
    conn.recv_bytes()
    t0 = time.perf_counter()
    for _ in range(n - 1):
        conn.recv_bytes()
    out.send(((n - 1) / (time.perf_counter() - t0), 0.0))


def _poll_reader_main(flag_name: str, seconds: float, out: Connection) -> None:
    """The reference ring's waiting: poll a shared flag, sleeping 0.1 us between."""
    ring = ShmRingBuffer(0, 64, 1, name=flag_name)
    try:
        flags = ring.flags
        cpu0, wall0 = time.process_time(), time.perf_counter()
        deadline = wall0 + seconds
        while not flags[0] and time.perf_counter() < deadline:
            time.sleep(1e-7)
        out.send((time.process_time() - cpu0, time.perf_counter() - wall0))
    finally:
        ring.close()


# -- orchestration -------------------------------------------------------------


def _start(target: Callable[..., None], *args: Any) -> tuple[Any, Connection]:
    mine, theirs = _ctx.Pipe()
    proc = _ctx.Process(target=target, args=(*args, theirs), daemon=True)
    proc.start()
    theirs.close()
    return proc, mine


def _ring_run(
    loop_name: str,
    mode: str,
    n_reader: int,
    n: int,
    size: int,
    chunk_bytes: int,
    chunks: int,
    interval: float = 0.0,
) -> list[Any]:
    """One writer process and ``n_reader`` reader processes on a fresh ring."""
    with ShmRingBuffer(n_reader, chunk_bytes, chunks) as ring:
        handle = ring.export_handle()
        readers = [_start(_reader_main, handle, r, loop_name, mode, n) for r in range(n_reader)]
        writer = _start(_writer_main, handle, loop_name, mode, n, size, interval)
        try:
            for _, conn in readers:
                conn.recv()  # attached
            writer[1].send("go")
            results = [conn.recv() for _, conn in readers]
            writer[1].recv()
        finally:
            for proc, conn in (*readers, writer):
                proc.join(30)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
                conn.close()
    return results


def _pipe_run(mode: str, n_reader: int, n: int, size: int, interval: float = 0.0) -> list[Any]:
    pairs = [_ctx.Pipe(duplex=False) for _ in range(n_reader)]
    readers = [_start(_pipe_reader_main, recv_end, mode, n) for recv_end, _ in pairs]
    writer = _start(_pipe_writer_main, [send_end for _, send_end in pairs], mode, n, size, interval)
    try:
        for _, conn in readers:
            conn.recv()
        writer[1].send("go")
        results = [conn.recv() for _, conn in readers]
        writer[1].recv()
    finally:
        for recv_end, send_end in pairs:
            recv_end.close()
            send_end.close()
        for proc, conn in (*readers, writer):
            proc.join(30)
            conn.close()
    return results


def _idle_poll_baseline(seconds: float) -> float:
    with ShmRingBuffer(0, 64, 1) as flag:
        proc, conn = _start(_poll_reader_main, flag.name, seconds)
        cpu, wall = conn.recv()
        proc.join()
        conn.close()
    return 100.0 * cpu / wall


def _memcpy_bandwidth(size: int, count: int) -> float:
    src = os.urandom(size)
    dst = bytearray(size)
    view = memoryview(dst)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(count):
            view[:] = src
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
    sparse_n = args.sparse_messages or (400 if quick else 2500)
    idle_s = args.idle_seconds or (1.0 if quick else 5.0)
    small_n = args.small_messages or (40_000 if quick else 200_000)
    large_n = args.large_messages or (600 if quick else 3000)
    mib = 1 << 20
    progress = Progress(3 + 5 * len(loops), "ring")
    results: list[Result] = []

    # Baselines first (they do not depend on the event loop).
    base_lat = {k: _flat(_pipe_run("sparse", k, sparse_n, 64, 0.002)) for k in (1, 2)}
    progress.step("pipe latency baseline")
    base_rate = _pipe_run("rate", 1, small_n, 64)[0][0]
    base_idle = _idle_poll_baseline(min(idle_s, 1.0))
    progress.step("pipe rate, polling idle baseline")
    base_bw = _memcpy_bandwidth(mib, max(large_n // 3, 50)) / 1e9
    progress.step("memcpy baseline")

    for loop in loops:
        for k in (1, 2):
            lat = _flat(_ring_run(loop, "sparse", k, sparse_n, 64, 4096, 16, 0.002))
            p50, p99 = _pct(lat, 0.50), _pct(lat, 0.99)
            b50, b99 = _pct(base_lat[k], 0.50), _pct(base_lat[k], 0.99)
            what = f"{k} reader{'s' if k > 1 else ''}"
            results.append(
                Result(
                    SUITE,
                    f"{loop}: wake-up p50, 64 B every 2 ms, {what}",
                    p50,
                    "us",
                    "mp.Pipe p50",
                    b50,
                    "<= 20 us",
                    p50 <= 20.0,
                )
            )
            results.append(
                Result(
                    SUITE,
                    f"{loop}: wake-up p99, 64 B every 2 ms, {what}",
                    p99,
                    "us",
                    "mp.Pipe p99",
                    b99,
                    "<= 100 us",
                    p99 <= 100.0,
                )
            )
            progress.step(f"{loop} sparse {what}")
        cpu, wall = _ring_run(loop, "idle", 1, 1, 64, 4096, 4, idle_s)[0]
        idle = 100.0 * cpu / wall
        results.append(
            Result(
                SUITE,
                f"{loop}: idle reader CPU over {idle_s:g} s wait",
                idle,
                "% core",
                "seed-style poll",
                base_idle,
                "<= 2%",
                idle <= 2.0,
            )
        )
        progress.step(f"{loop} idle")
        rate = _ring_run(loop, "rate", 1, small_n, 64, 4096, 64)[0][0]
        results.append(
            Result(
                SUITE,
                f"{loop}: 64 B back-to-back, 1 reader",
                rate,
                "msg/s",
                "mp.Pipe",
                base_rate,
                ">= 150k msg/s",
                rate >= 150_000,
            )
        )
        progress.step(f"{loop} rate")
        bw = _ring_run(loop, "rate", 1, large_n, mib, mib, 8)[0][1] / 1e9
        results.append(
            Result(
                SUITE,
                f"{loop}: 1 MiB messages, 1 reader",
                bw,
                "GB/s",
                "1-core memcpy",
                base_bw,
                ">= 0.80x memcpy",
                bw >= 0.8 * base_bw,
            )
        )
        progress.step(f"{loop} bandwidth")
    return results
