"""Process plumbing shared by the benchmark suites.

Every case runs in fresh spawned processes (no state shared with the parent,
one event loop each); workers report one dict through a queue, errors
included, so the parent fails loudly instead of hanging.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import resource
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_pair(target: Callable[..., None], *args: Any, timeout: float = 300.0) -> dict[str, Any]:
    """Run ``target(rank, queue, *args)`` for ranks 0 and 1 in spawned processes.

    Returns the union of the dicts both put on the queue; raises RuntimeError
    with the worker's message if either reported ``{"error": ...}``.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, queue, *args), daemon=True) for rank in (0, 1)]
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


def run_loop(loop_name: str, main: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """Run ``main()`` on a fresh asyncio or uvloop event loop."""

    async def wrapped() -> dict[str, Any]:
        return await main()

    if loop_name == "uvloop":
        import uvloop

        result: dict[str, Any] = uvloop.run(wrapped())
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
