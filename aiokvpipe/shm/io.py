"""ShmRingBufferIO: async (and blocking) access to a ShmRingBuffer.

One writer endpoint (``reader_rank=-1``) and up to ``n_reader`` reader
endpoints, each in its own process. Chunks are used strictly in sequence
(chunk ``seq`` lives at index ``seq % max_chunks``; sequences start at 1, 0
marks a chunk never published), so every reader sees every message in order.

Chunk protocol, per chunk flags ``[written, read_0 .. read_{n-1}]``:

* writer claims a chunk when it was never written or every reader has read
  it; it clears ``written``, fills the chunk and its descriptor, clears the
  read flags, **fences**, sets ``written``, **fences**, then rings every
  reader whose park word is odd (parked) and differs from the value it had
  when last rung (so one ring per park, however many chunks follow);
* a reader may read when ``written`` is set and its read flag is not; after
  a **fence** it reads the descriptor and bytes, **fences**, sets its read
  flag, **fences**, and rings the writer if the writer is parked.

Waiting: spin with ``asyncio.sleep(0)`` for ``spin_seconds``; then announce
"parked", fence, recheck, and only then wait on the doorbell fd (plus the
writer's pidfd, for readers) for at most a safety interval growing from 2 ms
to 50 ms, so even a lost ring costs bounded latency, and an idle waiter wakes
~20 times a second.

Security: rings are for processes of one user on one host (the segment is
mode 0600) and :meth:`ShmRingBufferIO.dequeue` unpickles what the writer
sent: only attach to rings whose writer you trust to run code as you.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar, cast

from ..backoff import Backoff
from ..errors import (
    HandleError,
    PipeClosedError,
    RingUsageError,
    SequenceError,
    SlowReaderError,
    TransferTimeout,
    WriterGoneError,
)
from . import codec
from .doorbell import RUNG, Doorbell, doorbell_address
from .fence import fence
from .liveness import ProcessIdentity, open_pidfd, pidfd_exited
from .ring import (
    DESC,
    IDENTITY,
    READER_SLOTS_OFF,
    SLOT_BYTES,
    SLOT_ID,
    SLOT_PARKED,
    SLOT_STATE,
    STATE_ATTACHED,
    STATE_CLOSED,
    STATE_NONE,
    WRITER_ID_OFF,
    WRITER_PARKED_OFF,
    WRITER_STATE_OFF,
    ShmRingBuffer,
    ShmRingHandle,
)

__all__ = ["ShmRingBufferIO"]

T = TypeVar("T")
_DESC_SIZE = DESC.size
_unpack_desc = DESC.unpack_from
_pack_desc = DESC.pack_into
_monotonic = time.monotonic
_WRITER_PARK_WORD = WRITER_PARKED_OFF // 4


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0 or None, got {timeout}")
    return _monotonic() + timeout


def _run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that never suspends (blocking=True paths) to its end."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return cast(T, stop.value)
    coro.close()
    raise RuntimeError("a blocking ring call tried to suspend")  # pragma: no cover


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


class ShmRingBufferIO:
    """One endpoint of a ring: the writer (``reader_rank=-1``) or reader ``reader_rank``.

    Use one endpoint from one task at a time (a second concurrent call raises
    :class:`RingUsageError`). ``owns_buffer`` closes the ring with the
    endpoint (set by :meth:`attach` and :meth:`create_from_process_group`).

    ``backoff`` is the waiting policy: its ``spin_seconds`` is the spin phase
    (bare yields to the loop), its growing sleeps are the safety intervals a
    parked call waits on the doorbell before rechecking on its own. The
    default spins 50 us, then parks for 2 ms growing to 50 ms.
    """

    def __init__(
        self,
        buffer: ShmRingBuffer,
        reader_rank: int,
        *,
        backoff: Backoff | None = None,
        owns_buffer: bool = False,
    ) -> None:
        buffer._check_open()
        n = buffer.n_reader
        if reader_rank != -1 and not (isinstance(reader_rank, int) and 0 <= reader_rank < n):
            raise HandleError(
                f"reader_rank {reader_rank!r} is invalid for ring {buffer.name!r} "
                f"with {n} readers (use 0..{n - 1}, or -1 for the writer)"
            )
        self.buffer = buffer
        self.reader_rank = reader_rank
        self.is_writer = reader_rank == -1
        self._owns = owns_buffer
        self._closed = False
        self._busy = False
        self._idle = True  # open and not busy: the synchronous fast paths may run
        self._hdr = buffer.header
        self._words = buffer.header_words
        self._flags = buffer.flags
        self._desc = buffer.descriptors
        self._chunks = buffer.chunks
        self._nflag = 1 + n
        self._nchunks = buffer.max_chunks
        self._cap = buffer.max_chunk_bytes
        self._backoff = backoff or Backoff(spin_seconds=50e-6, initial_sleep=2e-3, max_sleep=50e-3)
        self._pidfd: int | None = None
        self._writer: ProcessIdentity | None = None
        self._partial: _Assembly | None = None
        name = buffer.name
        if self.is_writer:
            state = self._hdr[WRITER_STATE_OFF]
            if state != STATE_NONE:
                pid = IDENTITY.unpack_from(self._hdr, WRITER_ID_OFF)[0]
                raise HandleError(
                    f"ring {name!r} already has a writer (pid {pid}, "
                    f"{'closed' if state == STATE_CLOSED else 'attached'}); "
                    "a ring takes exactly one writer for its lifetime"
                )
            self._bell = Doorbell(doorbell_address(name, "w"))
            self._park_word = WRITER_PARKED_OFF // 4
            self._ones = b"\1" * n
            self._zeros = bytes(n)
            self._reader_bells = [
                (
                    r,
                    (READER_SLOTS_OFF + SLOT_BYTES * r + SLOT_PARKED) // 4,
                    doorbell_address(name, f"r{r}"),
                )
                for r in range(n)
            ]
            self._rung = [0] * n  # the park word each reader had when last rung
            self._seq = 1
            self._park_gen = self._words[self._park_word] & ~1
            self._announce(WRITER_ID_OFF, WRITER_STATE_OFF)
        else:
            slot = READER_SLOTS_OFF + SLOT_BYTES * reader_rank
            if self._hdr[slot + SLOT_STATE] == STATE_ATTACHED:
                other = ProcessIdentity(*IDENTITY.unpack_from(self._hdr, slot + SLOT_ID))
                if other.is_alive():
                    raise HandleError(
                        f"reader rank {reader_rank} of ring {name!r} is already attached "
                        f"(pid {other.pid})"
                    )
            self._bell = Doorbell(doorbell_address(name, f"r{reader_rank}"))
            self._park_word = (slot + SLOT_PARKED) // 4
            self._rflag = 1 + reader_rank
            self._writer_bell = doorbell_address(name, "w")
            self._rung_writer = 0
            self._seq = self._resume_position()
            self._park_gen = self._words[self._park_word] & ~1
            self._announce(slot + SLOT_ID, slot + SLOT_STATE)

    def _announce(self, id_off: int, state_off: int) -> None:
        me = ProcessIdentity.current()
        IDENTITY.pack_into(self._hdr, id_off, me.pid, me.start, me.namespace)
        fence()  # identity before state: whoever sees "attached" sees the pid
        self._hdr[state_off] = STATE_ATTACHED

    def _resume_position(self) -> int:
        """The first sequence this reader has not read (1 for a fresh ring).

        Unread chunks cannot be overwritten, so it is the oldest unread
        published chunk, or one past the newest chunk ever published.
        """
        fl, rflag, nflag = self._flags, self._rflag, self._nflag
        fence()
        unread: list[int] = []
        newest = 0
        for i in range(self._nchunks):
            seq = _unpack_desc(self._desc, i * _DESC_SIZE)[0]
            newest = max(newest, seq)
            if fl[i * nflag] and not fl[i * nflag + rflag]:
                unread.append(seq)
        return min(unread) if unread else newest + 1

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
        """
        from .group import create_from_process_group

        return await create_from_process_group(cls, pg, max_chunk_bytes, max_chunks, writer_rank)

    # -- state checks ----------------------------------------------------------

    def _enter(self, writer: bool) -> None:
        if self._closed or self.buffer.closed:
            raise PipeClosedError(f"ring endpoint on {self.buffer.name!r} is closed")
        if writer != self.is_writer:
            role = "writer" if self.is_writer else f"reader {self.reader_rank}"
            raise RingUsageError(f"the {role} endpoint cannot {'write' if writer else 'read'}")
        if self._busy:
            raise RingUsageError("another task is already using this ring endpoint")
        self._busy = True
        self._idle = False

    def _leave(self) -> None:
        self._busy = False
        self._idle = not self._closed

    def _released(self, exc: ValueError) -> PipeClosedError:
        """Translate "released memoryview" after the ring was closed under us."""
        if not self.buffer.closed:
            raise exc
        return PipeClosedError(f"ring {self.buffer.name!r} was closed")

    def _check_peer(self, reason: str | None) -> None:
        """Raise WriterGoneError when a reader's writer closed or exited.

        ``reason`` is why the last park ended (None: first park of this call).
        With a pidfd the loop callback or poll already reported an exit; the
        slower pid check runs only when the safety timer, not a ring, woke us.
        """
        if self.is_writer:
            return
        hdr = self._hdr
        state = hdr[WRITER_STATE_OFF]
        if state == STATE_CLOSED:
            raise WriterGoneError(f"the writer closed ring {self.buffer.name!r}")
        if state != STATE_ATTACHED:
            return
        writer = self._writer
        if writer is None:
            fence()
            writer = self._writer = ProcessIdentity(*IDENTITY.unpack_from(hdr, WRITER_ID_OFF))
            try:
                self._pidfd = open_pidfd(writer)
            except ProcessLookupError:
                raise self._writer_gone(writer) from None
        pidfd = self._pidfd
        if pidfd is not None:
            if self._bell.exited(pidfd) or (reason is None and pidfd_exited(pidfd)):
                raise self._writer_gone(writer)
        elif reason != RUNG and not writer.is_alive():
            raise self._writer_gone(writer)

    def _writer_gone(self, writer: ProcessIdentity) -> WriterGoneError:
        return WriterGoneError(f"the writer of ring {self.buffer.name!r} (pid {writer.pid}) exited")

    def _timeout_error(self, timeout: float | None) -> TransferTimeout:
        name = self.buffer.name
        if not self.is_writer:
            return TransferTimeout(
                f"reader {self.reader_rank} of ring {name!r}: no message within {timeout:g} s"
            )
        fl, hdr = self._flags, self._hdr
        base = (self._seq % self._nchunks) * self._nflag
        lagging = [r for r in range(self._nflag - 1) if not fl[base + 1 + r]]
        notes = []
        for r in lagging:
            slot = READER_SLOTS_OFF + SLOT_BYTES * r
            state = hdr[slot + SLOT_STATE]
            who = ProcessIdentity(*IDENTITY.unpack_from(hdr, slot + SLOT_ID))
            if state == STATE_NONE:
                notes.append(f"reader {r}: never attached")
            elif state == STATE_CLOSED:
                notes.append(f"reader {r}: closed (pid {who.pid})")
            else:
                notes.append(f"reader {r}: pid {who.pid}{'' if who.is_alive() else ' exited'}")
        return SlowReaderError(
            f"ring {name!r}: no free chunk within {timeout:g} s; readers {lagging} have not "
            f"consumed chunk #{self._seq - self._nchunks} ({'; '.join(notes)})",
            lagging,
        )

    # -- the chunk protocol (hot path: keep lean) ------------------------------

    def _try_claim(self) -> int | None:
        """Writer: the index of the next chunk if it is free (and mark it unwritten)."""
        idx = self._seq % self._nchunks
        fl = self._flags
        base = idx * self._nflag
        if fl[base] and fl[base + 1 : base + self._nflag] != self._ones:
            return None
        fence()  # observe the read flags before overwriting what they guard
        fl[base] = 0
        return idx

    def _publish(self, idx: int, total: int, offset: int, kind: int) -> None:
        _pack_desc(self._desc, idx * _DESC_SIZE, self._seq, total, offset, kind)
        fl = self._flags
        base = idx * self._nflag
        fl[base + 1 : base + self._nflag] = self._zeros
        fence()  # bytes, descriptor and cleared read flags before "written"
        fl[base] = 1
        fence()  # "written" before reading park words (pairs with the reader's park)
        words, rung = self._words, self._rung
        for r, word, address in self._reader_bells:
            w = words[word]
            if w & 1 and w != rung[r]:  # parked, and not yet rung during this park
                rung[r] = w
                self._bell.ring(address)
        self._seq += 1

    def _poll_readable(self) -> int | None:
        """Reader: the index of the next chunk if it is published and unread."""
        idx = self._seq % self._nchunks
        fl = self._flags
        base = idx * self._nflag
        if fl[base] and not fl[base + self._rflag]:
            fence()  # observe "written" before the bytes it guards
            return idx
        return None

    def _consume(self, idx: int) -> None:
        fl = self._flags
        fence()  # finish reading the bytes before giving the chunk back
        fl[idx * self._nflag + self._rflag] = 1
        fence()  # read flag before reading the park word (pairs with the writer's park)
        w = self._words[_WRITER_PARK_WORD]
        if w & 1 and w != self._rung_writer:  # parked, and not yet rung during this park
            self._rung_writer = w
            self._bell.ring(self._writer_bell)
        self._seq += 1

    def _descriptor(self, idx: int) -> tuple[int, int, int]:
        seq, total, offset, kind = _unpack_desc(self._desc, idx * _DESC_SIZE)
        if seq != self._seq:
            raise SequenceError(
                f"reader {self.reader_rank} of ring {self.buffer.name!r} expected chunk "
                f"#{self._seq}, found #{seq}"
            )
        return total, offset, kind

    # -- waiting ---------------------------------------------------------------

    async def _wait(
        self,
        poll: Callable[[], int | None],
        timeout: float | None,
        deadline: float | None,
        blocking: bool,
    ) -> int:
        """Spin, then park on the doorbell until ``poll()`` yields a chunk index."""
        backoff = self._backoff
        backoff.reset()
        words, word, bell = self._words, self._park_word, self._bell
        reason: str | None = None
        while True:
            delay = backoff.next_delay()
            if delay == 0.0:
                if not blocking:
                    await asyncio.sleep(0)
            else:
                if deadline is not None:
                    left = deadline - _monotonic()
                    if left <= 0:
                        raise self._timeout_error(timeout)
                    delay = min(delay, left)
                # Announce with a fresh odd value: peers ring once per park, not per chunk.
                gen = self._park_gen = (self._park_gen + 1) & 0xFFFFFFFF
                words[word] = gen
                fence()  # announce, then recheck: the peer either sees us or we see it
                try:
                    idx = poll()
                    if idx is not None:
                        return idx
                    self._check_peer(reason)
                    if blocking:
                        reason = bell.wait_blocking(delay, self._pidfd)
                    else:
                        reason = await bell.wait(delay, self._pidfd)
                finally:
                    if not (self._closed or self.buffer.closed):
                        self._unpark()
                if self._closed or self.buffer.closed:
                    raise PipeClosedError(f"ring endpoint on {self.buffer.name!r} was closed")
            idx = poll()
            if idx is not None:
                return idx
            if deadline is not None and _monotonic() >= deadline:
                raise self._timeout_error(timeout)

    def _unpark(self) -> None:
        if self._park_gen & 1:
            self._park_gen = (self._park_gen + 1) & 0xFFFFFFFF
            self._words[self._park_word] = self._park_gen

    # -- writer ----------------------------------------------------------------

    def acquire_write(self, timeout: float | None = None) -> _WriteSlot:
        """``async with io.acquire_write(timeout) as buf``: fill one whole chunk.

        ``buf`` is a writable memoryview of ``max_chunk_bytes``; the chunk is
        published when the block exits normally and abandoned (not
        published) when it raises. ``buf`` is released on exit.
        """
        return _WriteSlot(self, timeout)

    async def enqueue(self, obj: Any, timeout: float | None = None) -> None:
        """Send ``obj`` to every reader (bytes as-is, arrays out of band, else pickle).

        Objects larger than one chunk span consecutive chunks. Raises
        SlowReaderError when no chunk frees up within ``timeout``; the
        message is copied before this returns.
        """
        if self._idle and self.is_writer and type(obj) is bytes and len(obj) <= self._cap:
            try:
                idx = self._try_claim()
                if idx is not None:  # fast path: a free chunk, nothing to wait for
                    n = len(obj)
                    self._chunks[idx][:n] = obj
                    self._publish(idx, n, 0, codec.BYTES)
                    return
            except ValueError as exc:
                raise self._released(exc) from exc
        await self._enqueue(obj, timeout, False)

    def enqueue_sync(self, obj: Any, timeout: float | None = None) -> None:
        """Blocking :meth:`enqueue` for non-async callers (never inside a loop)."""
        _run_blocking(self._enqueue(obj, timeout, True))

    async def _enqueue(self, obj: Any, timeout: float | None, blocking: bool) -> None:
        self._enter(True)
        try:
            if type(obj) is bytes and len(obj) <= self._cap:
                idx = self._try_claim()
                if idx is None:
                    idx = await self._wait(self._try_claim, timeout, _deadline(timeout), blocking)
                n = len(obj)
                self._chunks[idx][:n] = obj
                self._publish(idx, n, 0, codec.BYTES)
                return
            await self._write_message(codec.encode(obj), timeout, blocking)
        finally:
            self._leave()

    async def _write_message(
        self, enc: codec.Encoded, timeout: float | None, blocking: bool
    ) -> None:
        deadline = _deadline(timeout)
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
        again by the next call when it raises. ``buf`` is released on exit.
        """
        return _ReadSlot(self, timeout)

    async def dequeue(self, timeout: float | None = None) -> Any:
        """The next message, in order. Raises WriterGoneError once the writer
        closed or died and every message it published has been read."""
        if self._idle and not self.is_writer:
            try:
                idx = self._poll_readable()
                if idx is not None:  # fast path: a whole message is waiting
                    seq, total, offset, kind = _unpack_desc(self._desc, idx * _DESC_SIZE)
                    if offset == 0 and total <= self._cap and seq == self._seq:
                        self._partial = None
                        try:
                            if kind == codec.BYTES:
                                return bytes(self._chunks[idx][:total])
                            return codec.decode(kind, self._chunks[idx][:total])
                        finally:
                            self._consume(idx)
            except ValueError as exc:
                raise self._released(exc) from exc
        return await self._dequeue(timeout, False)

    def dequeue_sync(self, timeout: float | None = None) -> Any:
        """Blocking :meth:`dequeue` for non-async callers (never inside a loop)."""
        return _run_blocking(self._dequeue(timeout, True))

    async def _dequeue(self, timeout: float | None, blocking: bool) -> Any:
        self._enter(False)
        try:
            deadline: float | None = None
            while True:
                idx = self._poll_readable()
                if idx is None:
                    if deadline is None:
                        deadline = _deadline(timeout)
                    idx = await self._wait(self._poll_readable, timeout, deadline, blocking)
                total, offset, kind = self._descriptor(idx)
                cap = self._cap
                if offset == 0 and total <= cap:
                    self._partial = None
                    try:
                        return codec.decode(kind, self._chunks[idx][:total])
                    finally:
                        self._consume(idx)
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
                    for _, _, address in self._reader_bells:
                        self._bell.ring(address)
                else:
                    slot = READER_SLOTS_OFF + SLOT_BYTES * self.reader_rank
                    hdr[slot + SLOT_STATE] = STATE_CLOSED
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


class _WriteSlot:
    __slots__ = ("_idx", "_io", "_timeout", "_view")

    def __init__(self, io: ShmRingBufferIO, timeout: float | None) -> None:
        self._io = io
        self._timeout = timeout

    async def __aenter__(self) -> memoryview:
        io, timeout = self._io, self._timeout
        io._enter(True)
        try:
            idx = io._try_claim()
            if idx is None:
                idx = await io._wait(io._try_claim, timeout, _deadline(timeout), False)
        except BaseException:
            io._leave()
            raise
        self._idx = idx
        self._view = io._chunks[idx][:]
        return self._view

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        io = self._io
        try:
            with contextlib.suppress(BufferError):  # the caller kept a slice of it
                self._view.release()
            # On error the chunk stays claimed-but-unwritten; the next claim reuses it.
            if et is None and not io._closed:
                io._publish(self._idx, io._cap, 0, codec.RAW)
        finally:
            io._leave()


class _ReadSlot:
    __slots__ = ("_idx", "_io", "_timeout", "_view")

    def __init__(self, io: ShmRingBufferIO, timeout: float | None) -> None:
        self._io = io
        self._timeout = timeout

    async def __aenter__(self) -> memoryview:
        io, timeout = self._io, self._timeout
        io._enter(False)
        try:
            idx = io._poll_readable()
            if idx is None:
                idx = await io._wait(io._poll_readable, timeout, _deadline(timeout), False)
            total, offset, _ = io._descriptor(idx)
        except BaseException:
            io._leave()
            raise
        self._idx = idx
        self._view = io._chunks[idx][: min(io._cap, total - offset)]
        return self._view

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        io = self._io
        try:
            with contextlib.suppress(BufferError):  # the caller kept a slice of it
                self._view.release()
            if et is None and not io._closed:
                io._consume(self._idx)
        finally:
            io._leave()
