"""What both halves of a GPU channel share: the in-flight cap and the failure helpers.

A module of its own so that the sending half (:mod:`aiokvpipe.cuda.channel`)
and the receiving half (:mod:`aiokvpipe.cuda.receiver`) follow the same
first-error-wins rules without importing each other.
"""

from __future__ import annotations

import asyncio

#: Messages with a payload that one channel may have queued on the device.
MAX_INFLIGHT = 128


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    """Resolve a set-up future once; a failure counts as seen (``ready`` may never be awaited)."""
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
        future.exception()


def _fail_future(future: asyncio.Future[None], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        try:
            await task
        except BaseException:  # cancelled on purpose; errors were recorded by _fail
            pass
