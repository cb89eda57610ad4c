"""Recycled receive buffers, so large payloads land in warm memory.

Receiving into freshly allocated memory makes the kernel fault in and zero
every page while it copies, which measured here as 15-60 % of the receive
cost for 4-64 MiB tensors. The pool hands out numpy views of cached blocks
and takes a block back only when the last object using it (the tensor the
user got, and every view of it) has been garbage collected, so a returned
tensor never shares memory with a later one.

Blocks are anonymous mappings marked ``MADV_NOHUGEPAGE``. numpy asks for
transparent huge pages on big arrays, and a huge page is faulted in whole:
one ``recv_into`` touching a fresh 2 MiB page zeroes (on these VMs, also
host-faults) all of it, which measured as 4-5 ms event-loop stalls while a
1 GiB tensor streamed in, against ~1 ms with 4 KiB pages (docs/latency.md).
The price of small pages is unmapping: one ``munmap`` of a 1 GiB block took
60 ms here, so big blocks are given back in steps between loop callbacks.
"""

from __future__ import annotations

import asyncio
import mmap
import weakref

import numpy

MIN_POOLED = 1 << 20  # smaller payloads are cheaper to allocate fresh
_RELEASE_STEP = 8 << 20  # bytes unmapped per loop callback (~0.5 ms here)


def allocate(nbytes: int) -> numpy.ndarray:
    """A uint8 array of ``nbytes`` that faults in page by page (no huge pages).

    Small sizes come from numpy's allocator; from ``MIN_POOLED`` up, a
    private anonymous mapping (freed when the last view dies).
    """
    if nbytes < MIN_POOLED:
        return numpy.empty(nbytes, dtype=numpy.uint8)
    block = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_NOHUGEPAGE", None)
    if advice is not None:
        try:
            block.madvise(advice)
        except OSError:
            pass  # THP compiled out: pages are small anyway
    array = numpy.frombuffer(block, dtype=numpy.uint8)
    if nbytes > _RELEASE_STEP:
        weakref.finalize(array, _release_later, block)
    return array


def _release_later(block: mmap.mmap) -> None:
    """Give a dead array's pages back a step per loop callback.

    Runs as the array's finalizer, while the array may still hold its
    buffer; the steps start on the next loop iteration. With no running
    loop, the mapping is simply unmapped when the last reference goes.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    loop.call_soon(_release_step, loop, block, 0)


def _release_step(loop: asyncio.AbstractEventLoop, block: mmap.mmap, offset: int) -> None:
    try:
        size = len(block)  # raises ValueError once the block was closed
        end = min(offset + _RELEASE_STEP, size)
        block.madvise(mmap.MADV_DONTNEED, offset, end - offset)
        if end < size:
            loop.call_soon(_release_step, loop, block, end)
        else:
            block.close()
    except (OSError, ValueError, BufferError, RuntimeError):
        return  # closed under us, or the loop stopped: unmapped when dropped


class RecvBufferPool:
    """Blocks by power-of-two size class, at most ``max_bytes`` kept idle.

    A block given back to a full pool evicts the blocks idle longest, of any
    class: when the traffic changes size (16 MiB messages, then 64 MiB
    ones), the new size gets warm blocks instead of the old one keeping the
    pool for good. ``take`` hands out the warmest block of its class.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._idle_bytes = 0
        self._free: dict[int, list[numpy.ndarray]] = {}  # per class, oldest first
        self._order: dict[int, int] = {}  # id(block) -> class, every idle block, oldest first
        self._closed = False

    @staticmethod
    def _size_class(nbytes: int) -> int:
        return 1 << (nbytes - 1).bit_length()

    def take(self, nbytes: int) -> numpy.ndarray:
        """A uint8 array of ``nbytes`` whose block returns here when it dies."""
        if nbytes < MIN_POOLED or self._size_class(nbytes) > self._max_bytes:
            return allocate(nbytes)
        size = self._size_class(nbytes)
        blocks = self._free.get(size)
        if blocks:
            block = blocks.pop()
            del self._order[id(block)]
            self._idle_bytes -= size
        else:
            block = allocate(size)
        view = block[:nbytes]
        weakref.finalize(view, self._give_back, block)
        return view

    def _give_back(self, block: numpy.ndarray) -> None:
        size = block.nbytes
        if self._closed or size > self._max_bytes:
            return
        while self._idle_bytes + size > self._max_bytes:
            # The oldest idle block overall is the oldest of its class.
            oldest = self._free[next(iter(self._order.values()))].pop(0)
            del self._order[id(oldest)]
            self._idle_bytes -= oldest.nbytes  # unmapped when it dies (now)
        self._free.setdefault(size, []).append(block)
        self._order[id(block)] = size
        self._idle_bytes += size

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def close(self) -> None:
        """Drop every idle block; blocks still in use are freed when they die."""
        self._closed = True
        self._free.clear()
        self._order.clear()
        self._idle_bytes = 0
