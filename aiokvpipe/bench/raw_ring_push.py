"""The layer-wise push through a bare shared-memory ring: what the copy and the loop give.

A same-run baseline for ``bench blocks`` on shm, as :mod:`.raw_push` is on
tcp. The writer copies the request's bytes (one contiguous tensor) into a
ring of the block path's geometry, once whole and once layer by layer, each
layer started after its simulated compute, in call order; the reader copies
each chunk out and answers through the Pipe after the whole request and
after each layer. No block lists, leases, REQUEST/REPLY or scatter: its
ratio of layer-wise to whole is what copying on the loop, beside compute
timers on the same loop, costs a layer-wise push here.
"""

from __future__ import annotations

import time
from typing import Any

from ..blocks.shmpath import RING_BYTES
from ..loop_turns import yield_turn
from ..shm.io import ShmRingBufferIO
from ..shm.ring import ShmRingBuffer
from ..transport._shm_setup import SLICE_SECONDS, ring_geometry
from .raw_push import timed_rounds


def create_ring() -> ShmRingBufferIO:
    """The writer's end of a one-reader ring shaped like a block connection's."""
    piece, chunks = ring_geometry(RING_BYTES)  # the block path's ring per direction
    ring = ShmRingBuffer(1, piece, chunks)
    try:
        return ShmRingBufferIO(ring, -1, owns_buffer=True)
    except BaseException:
        ring.close()
        raise


async def _copy(io: ShmRingBufferIO, view: memoryview, *, into_ring: bool) -> None:
    """Chunk by chunk through the ring, yielding the loop as the block path does."""
    until = time.perf_counter() + SLICE_SECONDS
    at = 0
    while at < len(view):
        async with io.acquire_write() if into_ring else io.acquire_read() as buf:
            n = min(len(buf), len(view) - at)
            if into_ring:
                buf[:n] = view[at : at + n]
            else:
                view[at : at + n] = buf[:n]
        at += n
        if time.perf_counter() >= until:
            await yield_turn()
            until = time.perf_counter() + SLICE_SECONDS


async def receive_rounds(
    io: ShmRingBufferIO, pipe: Any, nbytes: int, layers: int, rounds: int
) -> None:
    """The reader's side: per round, the whole request, then its layers one by one,
    each answered through ``pipe``."""
    dst = memoryview(bytearray(nbytes))
    dst[:] = b"\x01" * nbytes  # fault the pages in before timing
    per_layer = nbytes // layers
    for _ in range(rounds):
        await _copy(io, dst, into_ring=False)
        await pipe.send(None)
        for layer in range(layers):
            await _copy(io, dst[layer * per_layer : (layer + 1) * per_layer], into_ring=False)
            await pipe.send(None)


async def send_rounds(
    io: ShmRingBufferIO,
    pipe: Any,
    src: memoryview,
    layers: int,
    rounds: int,
    compute_ms: float,
) -> dict[str, list[float]]:
    """The writer's side: ``{"whole": [...], "wise": [...]}`` seconds per round."""
    per_layer = len(src) // layers

    async def whole() -> None:
        await _copy(io, src[: per_layer * layers], into_ring=True)
        await pipe.recv()

    async def one_layer(layer: int) -> None:
        await _copy(io, src[layer * per_layer : (layer + 1) * per_layer], into_ring=True)

    async def answers() -> None:
        for _ in range(layers):
            await pipe.recv()

    return await timed_rounds(whole, one_layer, answers, layers, rounds, compute_ms)
