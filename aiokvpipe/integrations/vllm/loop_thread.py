"""An event loop in a thread the connector owns, for a synchronous host.

vLLM's engine and model runner are synchronous: they call the connector
between forward passes and expect each call to return at once. aiokvpipe's
Endpoint is asyncio. :class:`LoopThread` runs one event loop in a daemon
thread; the connector hands it coroutines with :meth:`submit` (never waits)
and only blocks in :meth:`run` during start-up and shut-down, where vLLM
itself waits for the connector to be ready or gone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from ...errors import PipeClosedError, TransferTimeout

__all__ = ["LoopThread"]

T = TypeVar("T")


def _new_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


class LoopThread:
    """One event loop running in its own thread until :meth:`stop`.

    ``name`` names the thread (it shows up in py-spy and in vLLM's thread
    dumps). ``use_uvloop`` picks uvloop when it is installed.
    """

    def __init__(self, name: str, *, use_uvloop: bool = True) -> None:
        self._loop = _new_loop(use_uvloop)
        self._stopped = False
        self._thread = threading.Thread(target=self._run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def _run_forever(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            # Whatever is still pending was cancelled by stop(); let it unwind.
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; returns at once with its future."""
        if self._stopped:
            coro.close()
            raise PipeClosedError(f"{self._thread.name}: the connector's event loop is stopped")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait for it (start-up and shut-down only).

        On timeout the coroutine is cancelled and TransferTimeout raised.
        """
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("LoopThread.run called from its own loop thread would deadlock")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TransferTimeout(
                f"{self._thread.name}: gave up after {timeout:g}s waiting for the event loop"
            ) from None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop (cancelling what still runs) and join the thread. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._loop.is_running() or not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
