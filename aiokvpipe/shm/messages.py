"""Whole objects over a ring: the message layer under :class:`~aiokvpipe.shm.io.ShmRingBufferIO`.

A message is one object encoded by :mod:`aiokvpipe.shm.codec`; when it is
larger than a chunk it spans consecutive chunks (each chunk's descriptor
says the message's total size and this chunk's offset in it). This module
writes such messages chunk by chunk as readers free them, and gathers them
on the reader's side, keeping a half-gathered one across a cancelled
dequeue. The public calls (``enqueue``/``dequeue``, their ``_nowait`` and
``_sync`` forms, ``broadcast_object``) stay on ``ShmRingBufferIO`` with
their one-chunk fast paths inlined there (a cold call costs about a
microsecond on a VM); what they share lives here, mixed in, so calling it
costs no extra hop. The chunk protocol and the waiting are
:class:`~aiokvpipe.shm.endpoint.RingEndpoint`'s.

The ``*_sync`` and ``*_nowait`` calls drive the same coroutines with
``blocking=True``, which never suspend (:func:`_run_blocking`,
:func:`_run_now`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

from ..errors import RingEmptyError, RingUsageError
from . import codec
from .endpoint import DESC_SIZE, RingEndpoint, deadline_after, unpack_desc

__all__ = ["RingMessages"]

T = TypeVar("T")
_NOT_WHOLE = object()  # _take_whole: the chunk is part of a larger message


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


class RingMessages(RingEndpoint):
    """Writing and gathering whole objects, one chunk or many; mixed into ShmRingBufferIO."""

    _partial: _Assembly | None  # a multi-chunk message being gathered (reader)

    # -- writer ----------------------------------------------------------------

    def _first_held(self, count: int) -> int | None:
        """Writer: how far past the next chunk the first of the next ``count``
        that readers still hold is (None: all ``count`` can be claimed now)."""
        fl, nflag, ones, seq = self._flags, self._nflag, self._ones, self._seq
        for k in range(count):
            base = ((seq + k) % self._nchunks) * nflag
            if fl[base] and fl[base + 1 : base + nflag] != ones:
                return k
        return None

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
