"""Awaiting a blocking call without blocking the event loop.

``torch.distributed`` collectives block their thread until every rank joins;
:func:`call_in_thread` runs one in a fresh helper thread, so the loop keeps
serving other tasks (and other ranks' rings) meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["call_in_thread"]

T = TypeVar("T")


async def call_in_thread(fn: Callable[[], T], name: str = "aiokvpipe-blocking") -> T:
    """Run blocking ``fn`` in a fresh thread and await its result.

    A fresh thread (not a pool) so nothing lingers once the call is done.
    Cancelling the await does not stop ``fn``: the thread finishes on its own.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting task
            loop.call_soon_threadsafe(deliver, False, exc)
        else:
            loop.call_soon_threadsafe(deliver, True, result)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    result = await fut
    thread.join()  # it has already handed over its result: returns at once
    return result
