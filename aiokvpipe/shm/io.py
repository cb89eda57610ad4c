"""ShmRingBufferIO: async (and blocking) access to a ShmRingBuffer.

One writer endpoint (``reader_rank=-1``) and up to ``n_reader`` reader
endpoints, each in its own process. The chunk protocol and the waiting
scheme live in :mod:`aiokvpipe.shm.endpoint`; this module turns them into
``acquire_write``/``acquire_read`` (one chunk in place), ``enqueue``/
``dequeue`` (whole objects, spanning chunks when large) and
``broadcast_object``.

Security: rings are for processes of one user on one host (the segment is
mode 0600) and :meth:`ShmRingBufferIO.dequeue` unpickles what the writer
sent: only attach to rings whose writer you trust to run code as you.
"""

from __future__ import annotations

import asyncio
import os
import pickle
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar, cast

from ..backoff import Backoff
from ..errors import (
    AiokvpipeError,
    ConfigError,
    HandleError,
    RingEmptyError,
    RingUsageError,
    RingViewError,
)
from . import codec
from .endpoint import DESC_SIZE, TAKEN, RingEndpoint, deadline_after, unpack_desc
from .fence import ORDERING_FENCE_NEEDED, fence
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
from .threads import call_in_thread

__all__ = ["ShmRingBufferIO"]

T = TypeVar("T")
_NOT_WHOLE = object()  # _take_whole: the chunk is part of a larger message
_ORDERING_FENCE = ORDERING_FENCE_NEEDED


def _run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that never suspends (blocking=True paths) to its end."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass  # no loop in this thread: blocking is fine
    else:
        coro.close()
        raise RingUsageError(
            "the *_sync ring calls block; inside a running event loop await the async ones"
        )
    return _run_now(coro)


def _run_now(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that finishes without suspending (the *_sync and
    *_nowait paths) to its end."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return cast(T, stop.value)
    coro.close()
    raise RuntimeError("a ring call that must not wait tried to suspend")  # pragma: no cover


def _copy_parts(parts: list[codec.Part], lo: int, hi: int, dst: memoryview) -> None:
    """Copy message bytes [lo, hi) from ``parts`` into ``dst`` (the chunk)."""
    for start, data in parts:
        end = start + data.nbytes
        s = lo if lo > start else start
        e = hi if hi < end else end
        if s < e:
            dst[s - lo : e - lo] = data[s - start : e - start]


class _Assembly:
    """A message spanning chunks, being gathered (survives a cancelled dequeue)."""

    __slots__ = ("data", "filled", "kind", "total", "view")

    def __init__(self, kind: int, total: int) -> None:
        self.kind = kind
        self.total = total
        self.filled = 0
        self.data = codec.aligned_empty(total)
        self.view = self.data.data.cast("B")


class ShmRingBufferIO(RingEndpoint):
    """One endpoint of a ring: the writer (``reader_rank=-1``) or reader ``reader_rank``.

    Use one endpoint from one task at a time (a second concurrent call raises
    :class:`RingUsageError`). ``owns_buffer`` closes the ring with the
    endpoint (set by :meth:`attach` and :meth:`create_from_process_group`).

    ``backoff`` is the waiting policy: its ``spin_seconds`` is the spin phase
    (bare yields to the loop), its growing sleeps are the safety intervals a
    parked call waits on the doorbell before rechecking on its own. The
    default spins 50 us, then parks for 20 ms growing to 50 ms.

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
        self._partial: _Assembly | None = None  # a multi-chunk message being gathered

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
        together with HandleError naming the ranks that could not attach.
        """
        import torch.distributed as dist  # only here: spawned ring workers need no torch

        rank = dist.get_rank(pg)
        world = dist.get_world_size(pg)
        if not 0 <= writer_rank < world:
            raise ConfigError("writer_rank", f"must be in [0, {world}), got {writer_rank}")
        src = dist.get_process_group_ranks(pg)[writer_rank]
        box: list[Any] = [None]
        endpoint: ShmRingBufferIO | None = None
        if rank == writer_rank:
            ring = ShmRingBuffer(world - 1, max_chunk_bytes, max_chunks)
            try:
                endpoint = cls(ring, -1, owns_buffer=True)
            except BaseException:
                ring.close()
                raise
            box[0] = endpoint.export_handle()
        try:
            await call_in_thread(lambda: dist.broadcast_object_list(box, src=src, group=pg))
            problem: str | None = None
            if endpoint is None:
                readers = [r for r in range(world) if r != writer_rank]
                try:
                    endpoint = cls.attach(box[0], readers.index(rank))
                except AiokvpipeError as exc:  # e.g. this rank is on another host
                    problem = f"rank {rank}: {exc}"
            # Nobody returns before every reader is attached (the writer may
            # close, and unlink, right after sending), and a rank that failed
            # to attach fails the call everywhere instead of leaving the
            # others waiting.
            problems: list[str | None] = [None] * world
            await call_in_thread(lambda: dist.all_gather_object(problems, problem, group=pg))
            failed = [p for p in problems if p]
            if failed:
                raise HandleError("cannot build the ring over the group: " + "; ".join(failed))
            if rank == writer_rank and endpoint is not None:
                # Every reader has mapped the segment: drop its name now, so even
                # a writer killed by a signal leaves nothing behind in /dev/shm.
                endpoint.buffer.unlink()
        except BaseException:
            if endpoint is not None:
                endpoint.close()
            raise
        assert endpoint is not None
        return endpoint

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
        (20-50 ms). ``keep`` must be cheap and must not wait.
        """
        self._enter(False)
        try:
            if self._poll_readable() is not None:
                return False
            hand = None if take is None else lambda idx: self._hand_over(idx, take)
            idx = await self._wait(
                self._poll_readable, timeout, deadline_after(timeout), False, hand, keep
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

    def _first_held(self, count: int) -> int | None:
        """Writer: how far past the next chunk the first of the next ``count``
        that readers still hold is (None: all ``count`` can be claimed now)."""
        fl, nflag, ones, seq = self._flags, self._nflag, self._ones, self._seq
        for k in range(count):
            base = ((seq + k) % self._nchunks) * nflag
            if fl[base] and fl[base + 1 : base + nflag] != ones:
                return k
        return None

    def enqueue_sync(self, obj: Any, timeout: float | None = None) -> None:
        """Blocking :meth:`enqueue` for non-async callers (never inside a loop)."""
        _run_blocking(self._enqueue(obj, timeout, True))

    async def _enqueue(self, obj: Any, timeout: float | None, blocking: bool) -> None:
        self._enter(True)
        try:
            if type(obj) is bytes and len(obj) <= self._cap:
                idx = self._try_claim()
                if idx is None:
                    idx = await self._wait(
                        self._try_claim, timeout, deadline_after(timeout), blocking
                    )
                self._publish(idx, len(obj), 0, codec.BYTES, obj)
                return
            await self._write_message(codec.encode(obj), timeout, blocking)
        finally:
            self._leave()

    async def _write_message(
        self, enc: codec.Encoded, timeout: float | None, blocking: bool
    ) -> None:
        deadline = deadline_after(timeout)
        cap, total, offset = self._cap, enc.total, 0
        while True:
            idx = self._try_claim()
            if idx is None:
                idx = await self._wait(self._try_claim, timeout, deadline, blocking)
            n = min(cap, total - offset)
            _copy_parts(enc.parts, offset, offset + n, self._chunks[idx])
            self._publish(idx, total, offset, enc.kind)
            offset += n
            if offset >= total:
                return

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

    def _take_whole(self, idx: int) -> Any:
        """Chunk ``idx`` decoded and consumed if it holds a whole message, else
        :data:`_NOT_WHOLE` (one call on the hot path: on a VM every cold call
        after a wake-up costs about a microsecond)."""
        seq, total, offset, kind = unpack_desc(self._desc, idx * DESC_SIZE)
        if seq != self._seq:
            self._descriptor(idx)  # raises SequenceError
        if offset != 0 or total > self._cap:
            return _NOT_WHOLE
        self._partial = None
        try:
            if kind == codec.BYTES:
                return bytes(self._chunks[idx][:total])
            return codec.decode(kind, self._chunks[idx][:total])
        finally:
            self._consume(idx)

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

    async def _dequeue(self, timeout: float | None, blocking: bool, nowait: bool = False) -> Any:
        self._enter(False)
        try:
            deadline: float | None = None
            while True:
                idx = self._poll_readable()
                if idx is None and nowait:
                    # The writer gone and all read: say so (a chunk it published
                    # right before it went is still read first).
                    idx = self._check_peer_or_poll(self._poll_readable, None)
                    if idx is None:
                        raise RingEmptyError(
                            f"reader {self.reader_rank} of ring {self.buffer.name!r}: "
                            "no complete message waiting"
                        )
                if idx is None:
                    if deadline is None:
                        deadline = deadline_after(timeout)
                    idx = await self._wait(self._poll_readable, timeout, deadline, blocking)
                msg = self._take_whole(idx)
                if msg is not _NOT_WHOLE:
                    return msg
                total, offset, kind = self._descriptor(idx)
                cap = self._cap
                n = min(cap, total - offset)
                part = self._partial
                if offset == 0:
                    part = self._partial = _Assembly(kind, total)
                elif part is None or (part.kind, part.total, part.filled) != (kind, total, offset):
                    # The tail of a message whose start we never saw (the writer
                    # abandoned it, or this reader joined late): skip it.
                    self._consume(idx)
                    continue
                part.view[offset : offset + n] = self._chunks[idx][:n]
                part.filled += n
                self._consume(idx)
                if part.filled == total:
                    self._partial = None
                    return codec.decode(kind, part.view, part.data)
        finally:
            self._leave()

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


class _Slot:
    """One chunk held by an ``async with``: claimed on enter, released on exit."""

    __slots__ = ("_base", "_idx", "_io", "_timeout", "_view")
    _idx: int
    _base: memoryview
    _view: memoryview

    def __init__(self, io: ShmRingBufferIO, timeout: float | None) -> None:
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
