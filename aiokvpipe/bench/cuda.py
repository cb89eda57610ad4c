"""``python -m aiokvpipe.bench cuda``: the GPU layer against same-run baselines.

* **event-await overhead**: a sleep kernel of fixed length, then either
  ``torch.cuda.synchronize()`` or ``await wait_event(...)``; the figure is the
  median extra latency of awaiting (target: <= 20 us). Measured for several
  kernel lengths because polling with back-off costs differently when the
  kernel ends inside the spin phase than when it ends during a sleep.
* **NCCL grouped self send/recv bandwidth**: one process, a one-rank
  communicator, ``groupStart; send to self; recv from self; groupEnd``, timed
  with CUDA events, beside a device-to-device copy of the same bytes.
* **CUDA IPC bandwidth**: two processes on one GPU, a cuda_ipc Pipe, wall
  time from the first send to the last acknowledged copy, beside a
  device-to-device copy of the same bytes (target: >= 80%).
* **event-loop lag p99** while 1 GiB moves on the GPU (NCCL self transfer,
  and staging to pinned host memory), beside the idle loop's lag in the same
  run (target: <= 2 ms).

Without a CUDA device (or without NCCL, for its figure) every row says
"skipped: ..." and carries no number.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import torch

from ..cuda.events import wait_event
from ..cuda.runtime import cuda_available, nccl_or_raise, require_cuda
from ..errors import CudaUnavailableError
from ..ports import free_port
from .report import Progress, Result, human_size

SUITE = "cuda"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
EVENT_TARGET_US = 20.0
IPC_TARGET_RATIO = 0.8
LAG_TARGET_MS = 2.0

FIGURES = (
    "event-await overhead vs synchronize()",
    "NCCL grouped self send/recv bandwidth",
    "CUDA IPC bandwidth, two processes on one GPU",
    "event-loop lag p99 during a 1 GiB GPU transfer",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda:0", help="GPU to measure (default cuda:0)")
    parser.add_argument(
        "--kernel-us",
        type=float,
        nargs="+",
        default=[20.0, 200.0, 2000.0],
        help="sleep-kernel lengths for the event-await figure (microseconds)",
    )


def skipped(name: str, reason: str) -> Result:
    """A row that says why a figure was not measured (and has no number)."""
    return Result(
        SUITE,
        f"{name} (skipped: {reason})",
        float("nan"),
        "skipped",
        target=f"skipped: {reason}",
        extra={"skipped": reason},
    )


def run(args: argparse.Namespace) -> list[Result]:
    if not cuda_available():
        return [skipped(name, "no CUDA device") for name in FIGURES]
    try:
        device = require_cuda("the cuda benchmarks", getattr(args, "device", "cuda:0"))
    except CudaUnavailableError as exc:
        return [skipped(name, str(exc)) for name in FIGURES]
    quick = bool(getattr(args, "quick", False))
    loops = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
    kernels = [float(k) for k in getattr(args, "kernel_us", [20.0, 200.0, 2000.0])]
    progress = Progress(len(loops) * (len(kernels) + 2) + 2, SUITE)
    results: list[Result] = []
    for loop_name in loops:
        for kernel_us in kernels:
            results.append(_run(loop_name, _event_overhead(device, kernel_us, quick, loop_name)))
            progress.step(f"event await {kernel_us:g} us ({loop_name})")
    try:
        nccl: Any = nccl_or_raise("the NCCL benchmark")
    except CudaUnavailableError as exc:
        nccl = None
        results.append(skipped(FIGURES[1], f"NCCL unavailable: {exc}"))
    if nccl is not None:
        results.append(_run(loops[0], _nccl_bandwidth(nccl, device, quick)))
    progress.step("nccl self send/recv")
    results.append(_ipc_bandwidth(device, quick, loops[0]))
    progress.step("cuda ipc")
    for loop_name in loops:
        results.extend(_run(loop_name, _loop_lag(nccl, device, quick, loop_name)))
        progress.step(f"loop lag ({loop_name})")
    return results


# ----------------------------------------------------------------- helpers


def _runner(loop_name: str) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run  # type: ignore[no-any-return,unused-ignore]
    return asyncio.run


def _run(loop_name: str, coro: Coroutine[Any, Any, Any]) -> Any:
    return _runner(loop_name)(coro)


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _timing_event() -> Any:
    event_type: Any = torch.cuda.Event  # untyped in torch's stubs
    return event_type(enable_timing=True)


def _gpu_sleep(cycles: int) -> None:
    """A kernel that spins for ``cycles`` GPU clock cycles."""
    sleep: Any = torch.cuda._sleep  # untyped in torch's stubs
    sleep(cycles)


def _sleep_rate(device: torch.device) -> float:
    """Cycles per second of the sleep kernel on ``device``."""
    start, end = _timing_event(), _timing_event()
    with torch.cuda.device(device):
        _gpu_sleep(1_000_000)  # warm-up
        start.record()
        _gpu_sleep(50_000_000)
        end.record()
        end.synchronize()  # calibration, outside any measurement
    return 50_000_000 / (float(start.elapsed_time(end)) / 1e3)


async def _gpu_seconds(stream: Any, work: Callable[[], None]) -> float:
    """GPU time of ``work`` queued on ``stream``, awaited without blocking."""
    start, end = _timing_event(), _timing_event()
    start.record(stream)
    work()
    end.record(stream)
    await wait_event(end, timeout=600)
    return float(start.elapsed_time(end)) / 1e3


# ----------------------------------------------------------------- figures


async def _event_overhead(
    device: torch.device, kernel_us: float, quick: bool, loop_name: str
) -> Result:
    reps = 50 if quick else 300
    cycles = max(1, int(_sleep_rate(device) * kernel_us / 1e6))
    stream = torch.cuda.current_stream(device)
    synced: list[float] = []
    awaited: list[float] = []
    with torch.cuda.device(device):
        for _ in range(reps):  # interleaved, so drift hits both alike
            _gpu_sleep(cycles)
            t0 = time.perf_counter()
            torch.cuda.synchronize(device)
            synced.append(time.perf_counter() - t0)
            _gpu_sleep(cycles)
            event = stream.record_event()
            t0 = time.perf_counter()
            await wait_event(event, timeout=60)
            awaited.append(time.perf_counter() - t0)
    base, got = statistics.median(synced), statistics.median(awaited)
    overhead_us = (got - base) * 1e6
    return Result(
        SUITE,
        f"event-await overhead, {kernel_us:g} us kernel ({loop_name})",
        overhead_us,
        "us",
        "synchronize() latency",
        base * 1e6,
        f"<= {EVENT_TARGET_US:g} us over synchronize()",
        overhead_us <= EVENT_TARGET_US,
        {"loop": loop_name, "await_p99_us": _p(awaited, 0.99) * 1e6, "reps": reps},
    )


async def _self_communicator(nccl: Any, device: torch.device) -> Any:
    """A one-rank communicator on ``device`` (grouped send/recv to itself)."""
    from ..cuda.streams import TorchCudaOps
    from ..transport.nccl import create_endpoint, unique_id_bytes

    uid = unique_id_bytes(nccl.get_unique_id())
    ops = TorchCudaOps(device)
    return await create_endpoint(nccl, ops, uid, world_size=1, rank=0, timeout=120, what="bench")


async def _nccl_seconds(endpoint: Any, work: Callable[[], None]) -> float:
    """GPU time of NCCL ``work``, queued (with its timing events) on the NCCL thread."""
    start, end = _timing_event(), _timing_event()

    def job() -> None:
        start.record(endpoint.stream)
        work()
        end.record(endpoint.stream)

    await endpoint.thread.call(job, timeout=600, what="queuing the NCCL benchmark")
    await wait_event(end, timeout=600)
    return float(start.elapsed_time(end)) / 1e3


async def _nccl_bandwidth(nccl: Any, device: torch.device, quick: bool) -> Result:
    size, iters = (64 * MiB, 5) if quick else (256 * MiB, 20)
    endpoint = await _self_communicator(nccl, device)
    try:
        src = torch.randint(0, 256, (size,), dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        stream = endpoint.stream
        stream.wait_stream(torch.cuda.current_stream(device))

        def exchange() -> None:  # on the NCCL thread
            for _ in range(iters):
                endpoint.exchange_now(src, dst, peer=0)

        def copy() -> None:
            with torch.cuda.stream(stream):
                for _ in range(iters):
                    dst.copy_(src, non_blocking=True)

        await _nccl_seconds(endpoint, lambda: endpoint.exchange_now(src, dst, peer=0))  # warm-up
        nccl_s = await _nccl_seconds(endpoint, exchange)
        copy_s = await _gpu_seconds(stream, copy)
        endpoint.check()
    finally:
        await endpoint.abort(timeout=60)
    moved = size * iters
    return Result(
        SUITE,
        f"NCCL grouped self send/recv {human_size(size)}",
        moved / nccl_s / 1e9,
        "GB/s",
        "device-to-device copy",
        moved / copy_s / 1e9,
        "",
        None,
        {"size": size, "iters": iters},
    )


def _ipc_config(rank: int, port: int, device: str) -> Any:
    from ..config import PipeConfig

    return PipeConfig(
        rank=rank,
        port=port,
        device=device,
        transport="cuda_ipc",
        connect_timeout=120.0,
        op_timeout=120.0,
    )


def _ipc_receiver(port: int, device: str, count: int, loop_name: str, queue: Any) -> None:
    """Rank 1, in its own process: take ``count`` tensors, then say so with a None."""
    from ..pipe import Pipe

    async def main() -> None:
        async with await Pipe.connect(_ipc_config(1, port, device)) as pipe:
            for _ in range(count):
                await pipe.recv()
            await pipe.send(None)
            await pipe.flush()

    try:
        _run(loop_name, main())
        queue.put({"ok": True})
    except BaseException as exc:  # reported to the parent, which raises it
        queue.put({"error": repr(exc)})


async def _ipc_sender(port: int, device: torch.device, size: int, count: int) -> float:
    from ..pipe import Pipe

    async with await Pipe.connect(_ipc_config(0, port, str(device))) as pipe:
        src = torch.randint(0, 256, (size,), dtype=torch.uint8, device=device)
        await (await pipe.send(src))  # warm-up: mappings, streams, allocator
        started = time.perf_counter()
        transfers = [await pipe.send(src) for _ in range(count - 1)]
        for transfer in transfers:
            await transfer
        elapsed = time.perf_counter() - started
        if await pipe.recv() is not None:
            raise RuntimeError("IPC receiver sent something other than its end marker")
    return size * (count - 1) / elapsed


async def _d2d_wall(device: torch.device, size: int, count: int) -> float:
    src = torch.randint(0, 256, (size,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    stream = torch.cuda.current_stream(device)
    await wait_event(stream.record_event(), timeout=600)
    started = time.perf_counter()
    for _ in range(count):
        dst.copy_(src, non_blocking=True)
    await wait_event(stream.record_event(), timeout=600)
    return size * count / (time.perf_counter() - started)


def _ipc_bandwidth(device: torch.device, quick: bool, loop_name: str) -> Result:
    size, count = (64 * MiB, 5) if quick else (256 * MiB, 17)
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(
        target=_ipc_receiver, args=(port, str(device), count, loop_name, queue), daemon=True
    )
    child.start()
    try:
        ipc_bps = _run(loop_name, _ipc_sender(port, device, size, count))
        report = queue.get(timeout=120)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
            child.join()
    if "error" in report:
        raise RuntimeError(f"IPC receiver failed: {report['error']}")
    d2d_bps = _run(loop_name, _d2d_wall(device, size, count - 1))
    ratio = ipc_bps / d2d_bps
    return Result(
        SUITE,
        f"CUDA IPC two processes {human_size(size)} ({loop_name})",
        ipc_bps / 1e9,
        "GB/s",
        "device-to-device copy (wall)",
        d2d_bps / 1e9,
        f">= {IPC_TARGET_RATIO:.0%} of device-to-device",
        ratio >= IPC_TARGET_RATIO,
        {"size": size, "messages": count - 1, "loop": loop_name},
    )


async def _lag_during(work: Callable[[], Awaitable[None]] | None, seconds: float) -> list[float]:
    """Lateness of a 1 ms ticker while ``work`` runs (or for ``seconds`` if None)."""
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(1e-3)
            lags.append(max(0.0, time.perf_counter() - before - 1e-3))

    task = asyncio.ensure_future(ticker())
    try:
        if work is None:
            await asyncio.sleep(seconds)
        else:
            await work()
    finally:
        stop.set()
        await task
    return lags


async def _loop_lag(nccl: Any, device: torch.device, quick: bool, loop_name: str) -> list[Result]:
    from ..cuda.staging import to_host

    size, rounds = GiB, (2 if quick else 4)
    src = torch.randint(0, 256, (size,), dtype=torch.uint8, device=device)
    works: list[tuple[str, Callable[[], Awaitable[None]]]] = []

    async def staging() -> None:
        for _ in range(rounds):
            await to_host(src)

    await to_host(src)  # warm-up: the first 1 GiB of pinned memory is allocated here
    works.append(("1 GiB staged to pinned host memory", staging))
    endpoint = None
    if nccl is not None:
        endpoint = await _self_communicator(nccl, device)
        dst = torch.empty_like(src)
        endpoint.stream.wait_stream(torch.cuda.current_stream(device))

        async def nccl_transfer() -> None:
            assert endpoint is not None
            for _ in range(rounds):
                event = await endpoint.exchange(src, dst, peer=0)
                await endpoint.wait(event, timeout=600, what="1 GiB")

        works.append(("1 GiB NCCL self send/recv", nccl_transfer))
    results = []
    try:
        for label, work in works:
            started = time.perf_counter()
            busy = await _lag_during(work, 0.0)
            idle = await _lag_during(None, time.perf_counter() - started)
            p99 = _p(busy, 0.99) * 1e3
            results.append(
                Result(
                    SUITE,
                    f"loop lag p99 during {label} ({loop_name})",
                    p99,
                    "ms",
                    "idle loop lag p99",
                    _p(idle, 0.99) * 1e3,
                    f"<= {LAG_TARGET_MS:g} ms",
                    p99 <= LAG_TARGET_MS,
                    {"ticks": len(busy), "loop": loop_name},
                )
            )
    finally:
        if endpoint is not None:
            await endpoint.abort(timeout=60)
    return results
