"""Building a ring over a torch.distributed process group.

The seed broadcast the whole ring object with ``broadcast_object_list``; here
only the small handle travels. The collective blocks, so it runs in a
dedicated helper thread while the event loop keeps serving other tasks.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ..errors import AiokvpipeError, ConfigError, HandleError
from .ring import ShmRingBuffer

if TYPE_CHECKING:
    from .io import ShmRingBufferIO

__all__ = ["call_in_thread", "create_from_process_group"]

T = TypeVar("T")
IO = TypeVar("IO", bound="ShmRingBufferIO")


async def call_in_thread(fn: Callable[[], T], name: str = "aiokvpipe-blocking") -> T:
    """Run blocking ``fn`` in a fresh thread and await its result.

    A fresh thread (not a pool) so nothing lingers once the call is done.
    Cancelling the await does not stop ``fn``: the thread finishes on its own.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting task
            loop.call_soon_threadsafe(deliver, False, exc)
        else:
            loop.call_soon_threadsafe(deliver, True, result)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    result = await fut
    thread.join()  # it has already handed over its result: returns at once
    return result


async def create_from_process_group(
    cls: type[IO], pg: Any, max_chunk_bytes: int, max_chunks: int, writer_rank: int
) -> IO:
    import torch.distributed as dist

    rank = dist.get_rank(pg)
    world = dist.get_world_size(pg)
    if not 0 <= writer_rank < world:
        raise ConfigError("writer_rank", f"must be in [0, {world}), got {writer_rank}")
    src = dist.get_process_group_ranks(pg)[writer_rank]
    box: list[Any] = [None]
    endpoint: IO | None = None
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
                endpoint = cast(IO, cls.attach(box[0], readers.index(rank)))
            except AiokvpipeError as exc:  # e.g. this rank is on another host
                problem = f"rank {rank}: {exc}"
        # Nobody returns before every reader is attached (the writer may close,
        # and unlink, right after sending), and a rank that failed to attach
        # fails the call everywhere instead of leaving the others waiting.
        problems: list[str | None] = [None] * world
        await call_in_thread(lambda: dist.all_gather_object(problems, problem, group=pg))
        failed = [p for p in problems if p]
        if failed:
            raise HandleError("cannot build the ring over the group: " + "; ".join(failed))
        if rank == writer_rank and endpoint is not None:
            # Every reader has mapped the segment: drop its name now, so even a
            # writer killed by a signal leaves nothing behind in /dev/shm.
            endpoint.buffer.unlink()
    except BaseException:
        if endpoint is not None:
            endpoint.close()
        raise
    assert endpoint is not None
    return endpoint
