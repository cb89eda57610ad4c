"""Process plumbing shared by the benchmark suites.

Every case runs in fresh worker processes (no state shared with the parent,
one event loop each); workers report one dict through a queue, errors
included, so the parent fails loudly instead of hanging.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import resource
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

#: What the fork server imports once, so that its children do not.
PRELOAD = ("torch", "aiokvpipe")


def worker_context() -> Any:
    """The multiprocessing context workers start in: a fork server that imported torch.

    A spawned interpreter spends ~2 s of CPU importing torch before it runs
    the first line of a case; on a 2-core machine that dominated the
    process-based tests and the start of every bench pair. The fork server is
    a process that only did those imports (no event loop, no threads, no CUDA
    context), so its forked children are as clean as spawned ones and start
    in milliseconds. Where there is no fork server (not Linux), spawn.
    """
    if "forkserver" not in mp.get_all_start_methods():  # pragma: no cover - Linux has it
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def placements() -> dict[str, tuple[int, int] | None]:
    """CPU placements for latency pairs: separate cores, one shared core.

    Latency between two processes depends on where the scheduler puts them
    (on these VMs light processes get packed onto one vCPU, and waking an
    idle vCPU costs 50-100 us), so latency cases pin both sides the same way
    for the measured case and its baselines. Empty on a single-core machine.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return {}
    return {"separate cores": (cpus[0], cpus[1]), "one shared core": (cpus[0], cpus[0])}


def _pinned(cpu: int, target: Callable[..., None], *args: Any) -> None:
    os.sched_setaffinity(0, {cpu})
    target(*args)


def run_pair(
    target: Callable[..., None],
    *args: Any,
    timeout: float = 300.0,
    pin: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Run ``target(rank, queue, *args)`` for ranks 0 and 1 in worker processes.

    ``pin``: the CPU of each rank (see :func:`placements`). Returns the union
    of the dicts both put on the queue; raises RuntimeError with the worker's
    message if either reported ``{"error": ...}``.
    """
    ctx = worker_context()
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(rank, queue, *args), daemon=True)
        if pin is None
        else ctx.Process(target=_pinned, args=(pin[rank], target, rank, queue, *args), daemon=True)
        for rank in (0, 1)
    ]
    for p in procs:
        p.start()
    results: dict[str, Any] = {}
    try:
        for _ in procs:
            results.update(queue.get(timeout=timeout))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    if "error" in results:
        raise RuntimeError(results["error"])
    return results


def run_loop(loop_name: str, main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main()`` on a fresh asyncio or uvloop event loop."""

    async def wrapped() -> T:
        return await main()

    if loop_name == "uvloop":
        import uvloop

        result: T = uvloop.run(wrapped())
        return result
    return asyncio.run(wrapped())


def report(queue: Any, fn: Callable[[], dict[str, Any]]) -> None:
    """Put ``fn()``'s result, or the error it raised, on ``queue``."""
    try:
        queue.put(fn())
    except BaseException as exc:  # the parent turns this into a failure
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
