"""ShmRingBufferIO: async (and blocking) access to a ShmRingBuffer.

One writer endpoint (``reader_rank=-1``) and up to ``n_reader`` reader
endpoints, each in its own process. The chunk protocol lives in
:mod:`aiokvpipe.shm.endpoint`, the waiting scheme in
:mod:`aiokvpipe.shm.waiting`; this module turns them into
the public calls: ``acquire_write``/``acquire_read`` (one chunk in place,
through the leases of :mod:`aiokvpipe.shm.slots`), ``enqueue``/``dequeue``
(whole objects, spanning chunks when large: :mod:`aiokvpipe.shm.messages`),
``broadcast_object``, the chunk calls of the shm transport, and the
endpoint's construction and closing.

Security: rings are for processes of one user on one host (the segment is
mode 0600) and :meth:`ShmRingBufferIO.dequeue` unpickles what the writer
sent: only attach to rings whose writer you trust to run code as you.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..backoff import Backoff
from ..errors import RingUsageError
from . import codec
from .endpoint import TAKEN, deadline_after
from .fence import ORDERING_FENCE_NEEDED, fence
from .messages import _NOT_WHOLE, RingMessages, _run_blocking, _run_now
from .ring import (
    READER_SLOTS_OFF,
    SLOT_BYTES,
    SLOT_SPINNING,
    SLOT_STATE,
    STATE_CLOSED,
    WRITER_PARKED_OFF,
    WRITER_STATE_OFF,
    ShmRingBuffer,
    ShmRingHandle,
)
from .slots import _ReadSlot, _WriteSlot

__all__ = ["ShmRingBufferIO"]

_ORDERING_FENCE = ORDERING_FENCE_NEEDED


class ShmRingBufferIO(RingMessages):
    """One endpoint of a ring: the writer (``reader_rank=-1``) or reader ``reader_rank``.

    Use one endpoint from one task at a time (a second concurrent call raises
    :class:`RingUsageError`). ``owns_buffer`` closes the ring with the
    endpoint (set by :meth:`attach` and :meth:`create_from_process_group`).

    ``backoff`` is the waiting policy: its ``spin_seconds`` is the spin phase
    (bare yields to the loop), its growing sleeps are the safety intervals a
    parked call waits on the doorbell before rechecking on its own. The
    default spins 50 us, then parks for 20 ms growing to 50 ms (to 1 s
    for a reader that watches the writer's pidfd).

    ``anticipate`` (readers): learn the writer's rhythm from the publish
    times of recent messages and spin through a short window around the next
    expected one instead of sleeping through it (a parked reader's wake-up
    costs 70-150 us on a VM). The window is capped at 20% of the gap (at
    least 250 us, at most 1 ms), so while messages flow a reader uses at most
    that share of a core, and nothing once they stop. ``False``: always park.
    """

    def __init__(
        self,
        buffer: ShmRingBuffer,
        reader_rank: int,
        *,
        backoff: Backoff | None = None,
        owns_buffer: bool = False,
        anticipate: bool = True,
    ) -> None:
        super().__init__(
            buffer, reader_rank, backoff=backoff, owns_buffer=owns_buffer, anticipate=anticipate
        )
        self._partial = None  # a multi-chunk message being gathered

    # -- construction helpers ------------------------------------------------

    def export_handle(self) -> ShmRingHandle:
        """A small picklable handle; readers pass it to :meth:`attach`."""
        return self.buffer.export_handle()

    @classmethod
    def attach(cls, handle: ShmRingHandle, reader_rank: int, **kwargs: Any) -> ShmRingBufferIO:
        """Map the ring ``handle`` names and open endpoint ``reader_rank`` on it."""
        ring = ShmRingBuffer.attach(handle)
        try:
            return cls(ring, reader_rank, owns_buffer=True, **kwargs)
        except BaseException:
            ring.close()
            raise

    @classmethod
    async def create_from_process_group(
        cls, pg: Any, max_chunk_bytes: int, max_chunks: int, writer_rank: int = 0
    ) -> ShmRingBufferIO:
        """Writer ``writer_rank`` creates a ring; the others attach as readers.

        The handle travels with ``torch.distributed.broadcast_object_list`` on
        ``pg`` (all ranks must share a host), run in a helper thread so the
        event loop never blocks. Must be called by every rank of ``pg``.
        Every rank returns only once all readers are attached, or all fail
        together with HandleError naming the ranks that could not attach
        (see :mod:`aiokvpipe.shm.group`).
        """
        from .group import ring_over_group

        return await ring_over_group(
            lambda ring: cls(ring, -1, owns_buffer=True),
            cls.attach,
            pg,
            max_chunk_bytes,
            max_chunks,
            writer_rank,
        )

    # -- writer ----------------------------------------------------------------

    def acquire_write(self, timeout: float | None = None) -> _WriteSlot:
        """``async with io.acquire_write(timeout) as buf``: fill one whole chunk.

        ``buf`` is a writable memoryview of ``max_chunk_bytes``; the chunk is
        published when the block exits normally and abandoned (not
        published) when it raises. ``buf`` is released on exit; a view made
        from it that outlives the block (slice, array) raises RingViewError
        there instead of publishing.
        """
        return _WriteSlot(self, timeout)

    async def enqueue(self, obj: Any, timeout: float | None = None) -> None:
        """Send ``obj`` to every reader (bytes as-is, arrays out of band, else pickle).

        Objects larger than one chunk span consecutive chunks. Raises
        SlowReaderError when no chunk frees up within ``timeout``, and
        ReaderGoneError, whatever the timeout, when a reader holding the chunk
        needed closed (seen at once) or exited (seen on a safety recheck,
        within 50 ms); the message is copied before this returns.
        """
        if self._idle and self.is_writer and type(obj) is bytes and len(obj) <= self._cap:
            try:
                # Fast path: the next chunk is free. This is _try_claim inlined
                # (on a VM a cold call costs ~2 us, a tenth of a sparse
                # message's latency; fences as there: none needed on x86).
                idx = self._seq % self._nchunks
                fl = self._flags
                base = idx * self._nflag
                if not fl[base] or fl[base + 1 : base + self._nflag] == self._ones:
                    if _ORDERING_FENCE:
                        fence()
                    fl[base] = 0
                    self._publish(idx, len(obj), 0, codec.BYTES, obj)
                    return
            except ValueError as exc:
                raise self._released(exc) from exc
        await self._enqueue(obj, timeout, False)

    def enqueue_nowait(self, obj: Any) -> None:
        """Send ``obj`` now, or raise without writing anything.

        Like ``asyncio.Queue.put_nowait``: no ``await``, so it also runs in
        plain functions and loop callbacks (as fast as :meth:`enqueue`'s own
        fast path: measured equal).
        Raises SlowReaderError, naming the readers that hold the chunks,
        when fewer chunks are free than the message needs (ReaderGoneError
        when one of them closed or exited: retrying cannot help); RingUsageError
        when the message needs more chunks than the ring has (use
        :meth:`enqueue`, which streams it as readers consume).
        """
        if self._idle and self.is_writer and type(obj) is bytes and len(obj) <= self._cap:
            # One chunk, and nothing can interleave with a call that never
            # awaits: no need to mark the endpoint busy.
            try:
                idx = self._try_claim()
                if idx is not None:
                    self._publish(idx, len(obj), 0, codec.BYTES, obj)
                    return
            except ValueError as exc:
                raise self._released(exc) from exc
            raise self._timeout_error(0)
        self._enter(True)
        try:
            enc = codec.encode(obj)
            need = max(1, -(-enc.total // self._cap))
            if need > self._nchunks:
                raise RingUsageError(
                    f"a message of {enc.total} bytes spans {need} chunks of "
                    f"{self._cap} bytes, but ring {self.buffer.name!r} has "
                    f"{self._nchunks}: use enqueue(), which streams it"
                )
            held = self._first_held(need)
            if held is not None:
                raise self._timeout_error(0, held)
            _run_now(self._write_message(enc, 0, False))
        finally:
            self._leave()

    def write_chunk_nowait(self, fill: Callable[[memoryview], object]) -> bool:
        """Writer: fill and publish the next chunk now if it is free; False if not.

        ``fill(buf)`` writes into the whole chunk (``max_chunk_bytes``) and must
        not keep ``buf`` or any view of it: unlike :meth:`acquire_write` there
        is no view accounting, which is what makes this the cheap path for a
        caller that copies into the chunk and lets go (the shm transport's
        small messages). Nothing is published when ``fill`` raises; the chunk
        stays claimed and the next write reuses it. Never waits, never awaits.
        """
        if not (self._idle and self.is_writer):
            self._enter(True)  # raises: closed, a reader endpoint, or busy
        try:
            idx = self._try_claim()
            if idx is None:
                return False
            fill(self._chunks[idx])
            self._publish(idx, self._cap, 0, codec.RAW)
            return True
        except ValueError as exc:
            raise self._released(exc) from exc

    async def wait_readable(
        self,
        timeout: float | None = None,
        take: Callable[[memoryview], object] | None = None,
        keep: Callable[[], bool] | None = None,
        rehearse: Callable[[], object] | None = None,
    ) -> bool:
        """Reader: return once the next chunk is published (taking nothing).

        Waits the way :meth:`dequeue` does (anticipation, spin, doorbell);
        pair it with :meth:`read_chunk_nowait`. Raises TransferTimeout after
        ``timeout`` and WriterGoneError once the writer is gone with nothing
        left to read, as :meth:`acquire_read` does.

        ``take``: if the wait parked and the writer's doorbell ring ends it,
        the chunk is handed to ``take`` (as :meth:`read_chunk_nowait` would)
        inside the doorbell's fd callback, and True is returned. Whatever
        ``take`` wakes (a consumer's future) then runs in the loop's next
        turn, not after this task's own: one loop iteration of cold code
        less between the ring and the consumer. An exception from ``take``
        is raised here, with the chunk not marked read. False: the chunk is
        published, not taken.

        ``keep`` (with ``take``; a reader with ``anticipate=False``): after
        each take in the callback, while ``keep()`` is true the wait stays
        parked and serves the next rings in the callback too, so a sparse
        stream costs one fd callback per message and no task wake-up; it
        returns (True) when ``keep()`` says stop, or on its safety interval
        (20 ms to 1 s). ``keep`` must be cheap and must not wait.

        ``rehearse`` (a reader that anticipates): called once when the window
        in which the next chunk is due opens after the wait parked (in a
        stream the spin catches chunks with the code still warm), while the
        reader spins anyway.
        A caller passes a dry run of what it does with a chunk (decode,
        allocate, look at the tensor): after a gap of milliseconds that code
        and its objects are out of the caches, and the real take, run cold,
        costs several times more than warm. It must not wait, and its
        exceptions are raised here.
        """
        self._enter(False)
        try:
            if self._poll_readable() is not None:
                return False
            hand = None if take is None else lambda idx: self._hand_over(idx, take)
            idx = await self._wait(
                self._poll_readable, timeout, deadline_after(timeout), False, hand, keep, rehearse
            )
            return idx == TAKEN
        finally:
            self._leave()

    def read_chunk_nowait(self, take: Callable[[memoryview], object]) -> bool:
        """Reader: hand the next published chunk to ``take`` now; False if none yet.

        ``take(buf)`` gets the chunk's payload (the bytes the writer declared)
        and must copy what it needs and not keep ``buf``: the chunk is marked
        read when ``take`` returns, and the writer may then overwrite it. When
        ``take`` raises, the chunk is not marked read. Never waits.
        """
        if not (self._idle and not self.is_writer):
            self._enter(False)  # raises: closed, the writer endpoint, or busy
        try:
            idx = self._poll_readable()
        except ValueError as exc:
            raise self._released(exc) from exc
        if idx is None:
            return False
        self._hand_over(idx, take)
        return True

    def _hand_over(self, idx: int, take: Callable[[memoryview], object]) -> None:
        """Published chunk ``idx``'s payload to ``take``, then marked read."""
        try:
            total, offset, _ = self._descriptor(idx)
            take(self._chunks[idx][: min(self._cap, total - offset)])
            self._consume(idx)
        except ValueError as exc:
            raise self._released(exc) from exc

    def enqueue_sync(self, obj: Any, timeout: float | None = None) -> None:
        """Blocking :meth:`enqueue` for non-async callers (never inside a loop)."""
        _run_blocking(self._enqueue(obj, timeout, True))

    # -- reader ----------------------------------------------------------------

    def acquire_read(self, timeout: float | None = None) -> _ReadSlot:
        """``async with io.acquire_read(timeout) as buf``: read the next chunk in place.

        ``buf`` is a read-only-by-convention view of the chunk's payload; the
        chunk is marked read when the block exits normally, and handed out
        again by the next call when it raises. ``buf`` is released on exit; a
        view made from it that outlives the block (slice, array) raises
        RingViewError there, and the chunk is not marked read (the writer
        would overwrite what that view shows).
        """
        return _ReadSlot(self, timeout)

    async def dequeue(self, timeout: float | None = None) -> Any:
        """The next message, in order. Raises WriterGoneError once the writer
        closed or died and every message it published has been read."""
        if self._idle and not self.is_writer:
            try:
                idx = self._poll_readable()
                if idx is not None:  # fast path: a message is waiting
                    msg = self._take_whole(idx)
                    if msg is not _NOT_WHOLE:
                        return msg
            except ValueError as exc:
                raise self._released(exc) from exc
        return await self._dequeue(timeout, False)

    def dequeue_sync(self, timeout: float | None = None) -> Any:
        """Blocking :meth:`dequeue` for non-async callers (never inside a loop)."""
        return _run_blocking(self._dequeue(timeout, True))

    def dequeue_nowait(self) -> Any:
        """The next message if all of it has arrived, without waiting.

        Like ``asyncio.Queue.get_nowait``. Raises RingEmptyError when it has
        not (chunks of a larger message that did arrive are taken and kept
        for the next call, so a writer streaming it is never stuck), and
        WriterGoneError once the writer is gone and everything was read.
        """
        return _run_now(self._dequeue(None, True, nowait=True))

    # -- both ------------------------------------------------------------------

    async def broadcast_object(self, obj: Any = None, timeout: float | None = None) -> Any:
        """Writer: send ``obj`` and return it. Reader: return the writer's object."""
        if self.is_writer:
            await self._enqueue(obj, timeout, False)
            return obj
        return await self._dequeue(timeout, False)

    def broadcast_object_sync(self, obj: Any = None, timeout: float | None = None) -> Any:
        """Blocking :meth:`broadcast_object` for non-async callers."""
        if self.is_writer:
            self.enqueue_sync(obj, timeout)
            return obj
        return self.dequeue_sync(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release this endpoint; wakes (and fails) a parked call. Idempotent.

        The writer marks the ring closed and rings every reader, so they get
        WriterGoneError once they have read what was published.
        """
        if self._closed:
            return
        self._closed = True
        self._idle = False
        try:
            if not self.buffer.closed:
                hdr = self._hdr
                self._unpark()
                if self.is_writer:
                    hdr[WRITER_STATE_OFF] = STATE_CLOSED
                    fence()
                    for _, _, address, _ in self._readers:
                        self._bell.ring(address)
                else:
                    slot = READER_SLOTS_OFF + SLOT_BYTES * self.reader_rank
                    hdr[slot + SLOT_SPINNING] = 0  # a call closed mid-spin cannot clear it
                    hdr[slot + SLOT_STATE] = STATE_CLOSED
                    # A writer parked on a chunk this reader holds can never get
                    # it now: wake it to see "closed" (ReaderGoneError) at once.
                    fence()  # "closed" before reading its park word (as in _consume)
                    if self._words[WRITER_PARKED_OFF // 4] & 1:
                        self._bell.ring(self._writer_bell)
        finally:
            self._bell.close()
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
            self._partial = None
            if self._owns:
                self.buffer.close()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> ShmRingBufferIO:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __enter__(self) -> ShmRingBufferIO:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        role = "writer" if self.is_writer else f"reader {self.reader_rank}"
        return f"<ShmRingBufferIO {role} of {self.buffer.name!r} seq={self._seq}>"
