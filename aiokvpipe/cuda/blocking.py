"""Running the few CUDA/NCCL calls that block the host, off the event loop.

Communicator set-up (``ncclCommInitRank`` waits for every rank), its first
connection (warm-up), ``ncclCommDestroy``/``ncclCommAbort`` and
``ncclGetUniqueId`` can each block for a long or unbounded time, and none can
be interrupted. They run in a fresh *daemon* thread per call rather than in a
shared executor: a call that never returns (a peer that died during init)
then costs one parked thread instead of a worker that an executor would join
at interpreter exit, and nothing outlives the call in the normal case.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

from .._timeouts import deadline

T = TypeVar("T")


async def run_blocking(
    fn: Callable[[], T],
    *,
    timeout: float | None,
    what: str,
    on_abandoned: Callable[[T], object] | None = None,
) -> T:
    """Run ``fn()`` in a daemon thread and await its result.

    If the caller gives up (timeout -> TransferTimeout, or cancellation) the
    thread cannot be stopped; when it finishes later, ``on_abandoned`` gets
    the result it produced (e.g. to abort a communicator nobody will use).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    lock = threading.Lock()
    # "waiting" -> "delivered" (the thread handed its outcome to the loop) or
    # "abandoned" (the caller left first; the thread cleans up after itself).
    state = "waiting"
    produced: list[T] = []

    def cleanup(result: T) -> None:
        if on_abandoned is None:
            return
        try:
            on_abandoned(result)
        except Exception:  # best effort: nobody is left to report to
            pass

    def settle(setter: Callable[[], None]) -> None:
        if not future.done():
            setter()

    def body() -> None:
        nonlocal state
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting task, not lost
            error = exc
            with lock:
                if state == "waiting":
                    state = "delivered"
                    loop.call_soon_threadsafe(settle, lambda: future.set_exception(error))
            return
        with lock:
            if state == "waiting":
                state = "delivered"
                produced.append(result)
                loop.call_soon_threadsafe(settle, lambda: future.set_result(result))
                return
        cleanup(result)

    threading.Thread(target=body, name=f"aiokvpipe: {what}", daemon=True).start()
    try:
        async with deadline(timeout, lambda: what):
            return await future
    except BaseException:
        with lock:
            if state == "waiting":
                state = "abandoned"
                raise
        if produced:
            # The result arrived in the same instant we gave up; its cleanup may
            # block (an NCCL abort), so it gets a thread of its own.
            threading.Thread(
                target=cleanup, args=(produced[0],), name=f"aiokvpipe: undo {what}", daemon=True
            ).start()
        raise
