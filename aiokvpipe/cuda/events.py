"""Awaiting CUDA work from the event loop without blocking it.

CUDA cannot signal an fd, and both obvious ways to learn that GPU work ended
are wrong on an event loop: ``synchronize()`` stalls every other task for as
long as the GPU is busy, and a host-function callback
(``cudaLaunchHostFunc``/``Stream.add_callback``) runs on a CUDA driver thread
that must take the GIL, which deadlocks as soon as the loop thread holds the
GIL while calling into CUDA. So completion is *polled* with the shared
:class:`~aiokvpipe.backoff.Backoff`: ``query()`` once, a few bare yields (work
that is about to finish answers in microseconds), then sleeps that grow to
about 1 ms (a long transfer costs ~1000 cheap queries a second).

Works with torch (``query()``) and cupy (``.done``) events and streams alike.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

from .._timeouts import deadline
from ..backoff import Backoff
from .runtime import cuda_errors


def is_complete(work: Any) -> bool:
    """Has the event/stream finished? torch spells it ``query()``, cupy ``.done``."""
    query = getattr(work, "query", None)
    if callable(query):
        return bool(query())
    done = getattr(work, "done", None)
    if done is None:
        raise TypeError(f"{type(work).__name__} is not a CUDA event or stream (no query()/done)")
    return bool(done)


async def wait_event(
    event: Any,
    *,
    backoff: Backoff | None = None,
    timeout: float | None = None,
    check: Callable[[], None] | None = None,
    what: str = "CUDA event",
) -> None:
    """Return once ``event`` (torch or cupy) has completed, polling with ``backoff``.

    ``check`` runs between polls while the event is pending, e.g. NCCL's
    ``check_async_error``, so a peer that failed is reported instead of waited
    for. Raises TransferTimeout after ``timeout`` seconds, CudaTransferError if
    the device reports an error; cancellable at every step.
    """
    await _poll(event, backoff, timeout, check, what)


async def wait_stream(
    stream: Any,
    *,
    backoff: Backoff | None = None,
    timeout: float | None = None,
    check: Callable[[], None] | None = None,
    what: str = "CUDA stream",
) -> None:
    """Return once all work queued on ``stream`` so far has completed (see wait_event)."""
    await _poll(stream, backoff, timeout, check, what)


def _completed(work: Any, check: Callable[[], None] | None, what: str) -> bool:
    with cuda_errors(what):
        if is_complete(work):
            return True
        if check is not None:
            check()
    return False


async def _poll(
    work: Any,
    backoff: Backoff | None,
    timeout: float | None,
    check: Callable[[], None] | None,
    what: str,
) -> None:
    if timeout is not None and (math.isnan(timeout) or timeout < 0):
        raise ValueError(f"timeout must be None or >= 0, got {timeout!r}")
    if _completed(work, check, what):
        return
    policy = backoff if backoff is not None else Backoff()
    policy.reset()
    async with deadline(timeout, lambda: f"waiting for {what}"):
        while True:
            await asyncio.sleep(policy.next_delay())
            if _completed(work, check, what):
                return
