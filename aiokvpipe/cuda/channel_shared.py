"""What both halves of a GPU channel share: the in-flight cap, the worker lifecycle.

A module of its own so that the sending half (:mod:`aiokvpipe.cuda.channel`)
and the receiving half (:mod:`aiokvpipe.cuda.receiver`) follow the same
first-error-wins rules without importing each other.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Coroutine
from typing import Any

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


class ChannelLifecycle(abc.ABC):
    """Two worker tasks, a set-up future, and a teardown that runs once.

    The first error wins. The teardown runs in a task of its own: it cancels
    the workers, one of which may be the caller, and must run to the end
    even if the caller is cancelled (only the caller's wait is interrupted).
    Subclasses set ``_error``, ``_tasks``, ``_teardown`` and
    ``_set_up_done`` in ``__init__`` (see :meth:`_init_lifecycle`).
    """

    _error: BaseException | None
    _tasks: list[asyncio.Task[None]]
    _teardown: asyncio.Future[None] | None
    _set_up_done: asyncio.Future[None]

    def _init_lifecycle(self) -> None:
        self._error = None
        self._tasks = []
        self._teardown = None
        self._set_up_done = asyncio.get_running_loop().create_future()

    @abc.abstractmethod
    def _workers(self) -> tuple[Coroutine[Any, Any, None], ...]:
        """The channel's worker coroutines, started by :meth:`start`."""

    @abc.abstractmethod
    async def _run_teardown(self, error: BaseException) -> None:
        """Settle set-up, stop the workers, free the device, fail what is left."""

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(worker) for worker in self._workers()]

    @property
    def error(self) -> BaseException | None:
        return self._error

    async def ready(self) -> None:
        """Return once set-up is done; raise what stopped it."""
        await asyncio.shield(self._set_up_done)

    async def _fail(self, error: BaseException) -> None:
        """First error wins: record it and start the teardown, without waiting for it.

        Called by the channel's own workers: the teardown waits for (cancels)
        them, and a worker whose cancellation a timeout turned into an error
        would otherwise wait for the teardown that waits for it.
        """
        if self._error is None:
            self._error = error
        if self._teardown is None:
            self._teardown = asyncio.ensure_future(self._run_teardown(self._error))

    async def _torn_down(self, error: BaseException) -> None:
        """Run the teardown once, in its own task, and wait for it."""
        if self._teardown is None:
            self._teardown = asyncio.ensure_future(self._run_teardown(error))
        await asyncio.shield(self._teardown)
