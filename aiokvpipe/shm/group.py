"""A ring over a ``torch.distributed`` process group: one writer, every other rank a reader.

Kept apart from :mod:`aiokvpipe.shm.io` because it is the one place the ring
meets ``torch.distributed`` (imported only when called: spawned ring
workers need no torch) and its collectives, which block their thread and so
run in a helper thread (:func:`~aiokvpipe.shm.threads.call_in_thread`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ..errors import AiokvpipeError, ConfigError, HandleError
from .ring import ShmRingBuffer, ShmRingHandle
from .threads import call_in_thread

__all__ = ["ring_over_group"]


class _Endpoint(Protocol):
    """What this module needs of a ring endpoint (``ShmRingBufferIO``, which
    imports this module: naming it here would make an import cycle)."""

    buffer: ShmRingBuffer

    def export_handle(self) -> ShmRingHandle: ...

    def close(self) -> None: ...


E = TypeVar("E", bound=_Endpoint)


async def ring_over_group(
    create: Callable[[ShmRingBuffer], E],
    attach: Callable[[ShmRingHandle, int], E],
    pg: Any,
    max_chunk_bytes: int,
    max_chunks: int,
    writer_rank: int = 0,
) -> E:
    """Rank ``writer_rank`` of ``pg`` creates a ring and the others attach to it.

    What :meth:`ShmRingBufferIO.create_from_process_group` does; every rank
    of ``pg`` calls it. ``create(ring)`` opens the writer's endpoint on the
    new ring (which it then owns), ``attach(handle, reader_rank)`` a
    reader's. The handle goes out with ``broadcast_object_list``; then every
    rank reports whether it attached (``all_gather_object``), so all return
    once every reader has mapped the segment, or all fail together with
    HandleError naming the ranks that could not attach.
    """
    import torch.distributed as dist

    rank = dist.get_rank(pg)
    world = dist.get_world_size(pg)
    if not 0 <= writer_rank < world:
        raise ConfigError("writer_rank", f"must be in [0, {world}), got {writer_rank}")
    src = dist.get_process_group_ranks(pg)[writer_rank]
    box: list[Any] = [None]
    endpoint: E | None = None
    if rank == writer_rank:
        ring = ShmRingBuffer(world - 1, max_chunk_bytes, max_chunks)
        try:
            endpoint = create(ring)
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
                endpoint = attach(box[0], readers.index(rank))
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
