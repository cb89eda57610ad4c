"""The ``async with`` chunk leases behind ``acquire_write`` and ``acquire_read``.

:meth:`~aiokvpipe.shm.io.ShmRingBufferIO.acquire_write` and
:meth:`~aiokvpipe.shm.io.ShmRingBufferIO.acquire_read` return one of these:
entering claims the next chunk (waiting as the endpoint waits) and lends the
caller a view of it; leaving publishes it or marks it read, unless the block
raised or a view made from the lent one is still alive. They live apart from
the endpoint because they are a separate object with its own job (the view
accounting), and only use the chunk protocol of
:class:`~aiokvpipe.shm.endpoint.RingEndpoint`.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from types import TracebackType

from ..errors import RingViewError
from . import codec
from .endpoint import RingEndpoint, deadline_after


class _Slot:
    """One chunk held by an ``async with``: claimed on enter, released on exit."""

    __slots__ = ("_base", "_idx", "_io", "_timeout", "_view")
    _idx: int
    _base: memoryview
    _view: memoryview

    def __init__(self, io: RingEndpoint, timeout: float | None) -> None:
        self._io = io
        self._timeout = timeout

    async def _take(self, writer: bool, poll: Callable[[], int | None]) -> int:
        """The chunk index ``poll`` yields, waiting for it; the endpoint is busy after."""
        io, timeout = self._io, self._timeout
        io._enter(writer)
        try:
            idx = poll()
            if idx is None:
                idx = await io._wait(poll, timeout, deadline_after(timeout), False)
        except BaseException:
            io._leave()
            raise
        self._idx = idx
        return idx

    def _lend(self, base: memoryview) -> memoryview:
        """The caller's view of ``base`` (this slot's own view of the chunk).

        Re-exported through a PickleBuffer, so the view, and every slice,
        cast or array made from it, holds a buffer export of ``base``:
        ``base.release()`` then fails while any of them lives. (A slice of a
        plain memoryview shares its parent's buffer instead, and would
        outlive the parent's release unseen.)
        """
        self._base = base
        lender = pickle.PickleBuffer(base)
        self._view = memoryview(lender)
        lender.release()  # the view holds its own export of base
        return self._view

    def _give(self, done: Callable[[int], None] | None) -> None:
        """Release the views; ``done(idx)`` unless the block raised or the ring closed.

        A view the caller kept (a slice, an array) would see the chunk
        overwritten once it is published or marked read: then nothing is
        marked and RingViewError says so. (``torch.frombuffer`` holds a plain
        reference instead of a buffer export, which no release can see: copy
        such a tensor before the block ends.)
        """
        io = self._io
        try:
            alive = False
            for view in (self._view, self._base):
                try:
                    view.release()
                except BufferError:
                    alive = True
                    break
            if done is None or io._closed:
                return
            if alive:
                raise self._view_error()
            done(self._idx)
        finally:
            io._leave()

    def _view_error(self) -> RingViewError:
        io = self._io
        if io.is_writer:
            where, what = "acquire_write", "was not published (the next acquire_write hands it out"
        else:
            where = f"reader {io.reader_rank}'s acquire_read"
            what = "was not marked read (the next acquire_read hands it out"
        return RingViewError(
            f"ring {io.buffer.name!r}: a view of the chunk (a slice, cast, array or "
            f"tensor made from the buffer) is still alive after the {where} block, so the "
            f"chunk {what} again); copy what you need inside the block, release or delete "
            "those views, then acquire again"
        )


class _WriteSlot(_Slot):
    __slots__ = ()

    async def __aenter__(self) -> memoryview:
        io = self._io
        idx = await self._take(True, io._try_claim)
        return self._lend(io._chunks[idx][:])

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        io = self._io
        # On error the chunk stays claimed-but-unwritten; the next claim reuses it.
        self._give(None if et is not None else lambda idx: io._publish(idx, io._cap, 0, codec.RAW))


class _ReadSlot(_Slot):
    __slots__ = ()

    async def __aenter__(self) -> memoryview:
        io = self._io
        idx = await self._take(False, io._poll_readable)
        try:
            total, offset, _ = io._descriptor(idx)
        except BaseException:
            io._leave()
            raise
        return self._lend(io._chunks[idx][: min(io._cap, total - offset)])

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._give(None if et is not None else self._io._consume)
