"""Entry points for the ring tests' child processes (spawn start method).

Kept in a plain module (not a test file) so spawned children import it
cheaply and without collecting tests. Children report over a Connection.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

from aiokvpipe.bench.procs import run_loop, worker_context
from aiokvpipe.shm import ShmRingBuffer, ShmRingBufferIO, ShmRingHandle


def start_resource_tracker() -> None:
    """Spawning starts multiprocessing's resource tracker once per session, and
    it keeps a pipe open; start it before a test's fd snapshot, not during it."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()


def writer_send(
    handle: ShmRingHandle, loop_name: str, messages: list[Any], conn: Connection
) -> None:
    """Attach as the writer, wait for "go", send ``messages``, close cleanly."""
    io = ShmRingBufferIO.attach(handle, -1)
    try:
        conn.send("attached")
        conn.recv()

        async def body() -> None:
            for m in messages:
                await io.enqueue(m, timeout=20)

        run_loop(loop_name, body)
        conn.send("sent")
    finally:
        io.close()
        conn.close()


def rhythm_message(i: int) -> dict[str, Any]:
    """The ``i``-th message of a rhythm test: small, and distinct in content and size."""
    return {"i": i, "data": bytes([i % 251]) * (8 + i % 40)}


def writer_rhythm(handle: ShmRingHandle, count: int, gap: float, conn: Connection) -> None:
    """Attach as the writer; on "go" publish ``count`` messages ``gap`` apart (a
    steady rhythm, as a scheduler's steps), report "sent", then publish what it
    is sent until told "exit"."""
    io = ShmRingBufferIO.attach(handle, -1)
    try:
        conn.send("attached")
        conn.recv()
        start = time.monotonic()
        for i in range(count):
            io.enqueue_sync(rhythm_message(i), timeout=20)
            delay = start + (i + 1) * gap - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        conn.send("sent")
        # Still attached: a reader waiting now times out, not "writer gone".
        while (extra := conn.recv()) != "exit":
            io.enqueue_sync(extra, timeout=20)  # one more message, when the test asks
            conn.send("sent")
    finally:
        io.close()
        conn.close()


def reader_rhythm(
    handle: ShmRingHandle,
    rank: int,
    loop_name: str,
    count: int,
    anticipate: bool,
    conn: Connection,
) -> None:
    """Reader ``rank``: dequeue ``count`` messages; send them back, whether a
    rhythm was learned, and this reader's spinning byte before it closes."""
    from aiokvpipe.shm.ring import READER_SLOTS_OFF, SLOT_BYTES, SLOT_SPINNING

    io = ShmRingBufferIO.attach(handle, rank, anticipate=anticipate)
    try:
        conn.send("attached")

        async def body() -> list[Any]:
            return [await io.dequeue(timeout=20) for _ in range(count)]

        got = run_loop(loop_name, body)
        learned = io._cadence is not None and io._cadence.window() is not None
        flag = io.buffer.header[READER_SLOTS_OFF + SLOT_BYTES * rank + SLOT_SPINNING]
        conn.send((got, learned, flag))
    finally:
        io.close()
        conn.close()


def writer_send_then_hang(handle: ShmRingHandle, messages: list[Any], conn: Connection) -> None:
    """Send ``messages`` and then wait to be killed (a writer that crashes)."""
    io = ShmRingBufferIO.attach(handle, -1)
    for m in messages:
        io.enqueue_sync(m, timeout=20)
    conn.send("sent")
    time.sleep(60)


def writer_on_cue(handle: ShmRingHandle, messages: list[Any], conn: Connection) -> None:
    """Attach as the writer; on cue publish ``messages``, then go: "close" closes
    the endpoint, "hang" waits to be killed. Reports "sent" once published."""
    io = ShmRingBufferIO.attach(handle, -1)
    conn.send("attached")
    how = conn.recv()
    for m in messages:
        io.enqueue_sync(m, timeout=20)
    if how == "close":
        io.close()
    conn.send("sent")
    if how == "hang":
        time.sleep(60)
    conn.close()


def reader_until_gone(handle: ShmRingHandle, rank: int, conn: Connection) -> None:
    """Attach reader ``rank``, read until the writer is gone, send back what it read."""
    from aiokvpipe.errors import WriterGoneError

    io = ShmRingBufferIO.attach(handle, rank)
    try:
        conn.send("attached")
        got: list[Any] = []
        with contextlib.suppress(WriterGoneError):
            while True:
                got.append(io.dequeue_sync(timeout=20))
        conn.send(got)
    finally:
        io.close()
        conn.close()


def writer_nowait(handle: ShmRingHandle, messages: list[Any], conn: Connection) -> None:
    """Send ``messages`` with enqueue_nowait, retrying while the ring is full;
    report how often it was refused, then close (the readers see the writer go)."""
    from aiokvpipe.errors import SlowReaderError

    io = ShmRingBufferIO.attach(handle, -1)
    try:
        conn.send("attached")
        conn.recv()  # go
        refused = 0
        for m in messages:
            while True:
                try:
                    io.enqueue_nowait(m)
                    break
                except SlowReaderError:
                    refused += 1
                    time.sleep(0.0005)
        conn.send(("sent", refused))
    finally:
        io.close()
        conn.close()


def create_and_hang(conn: Connection) -> None:
    """Create a ring plus its writer, publish one message, wait to be killed."""
    ring = ShmRingBuffer(1, 256, 4)
    io = ShmRingBufferIO(ring, -1)
    io.enqueue_sync(b"before the crash")
    conn.send(io.export_handle())
    time.sleep(60)


def create_and_exit(conn: Connection) -> None:
    """Create a ring, hand out its name, exit without closing anything."""
    ring = ShmRingBuffer(1, 256, 4)
    conn.send(ring.name)
    conn.recv()  # parent saw the segment; now exit normally
    conn.close()


def attach_and_exit(handle: ShmRingHandle, rank: int, conn: Connection) -> None:
    """Attach a reader and exit without closing: must not unlink the segment."""
    io = ShmRingBufferIO.attach(handle, rank)
    conn.send(io.dequeue_sync(timeout=20))
    conn.close()


def reader_collect(
    handle: ShmRingHandle, rank: int, loop_name: str, count: int, conn: Connection
) -> None:
    """Attach reader ``rank``, dequeue ``count`` messages, send them back."""
    io = ShmRingBufferIO.attach(handle, rank)
    try:
        conn.send("attached")

        async def body() -> list[Any]:
            return [await io.dequeue(timeout=20) for _ in range(count)]

        conn.send(run_loop(loop_name, body))
    finally:
        io.close()
        conn.close()


def reader_stall(handle: ShmRingHandle, rank: int, conn: Connection) -> None:
    """Attach reader ``rank`` and never read (until told to exit)."""
    io = ShmRingBufferIO.attach(handle, rank)
    try:
        conn.send("attached")
        conn.recv()
    finally:
        io.close()
        conn.close()


def process_group_rank(
    rank: int, world: int, init_file: str, loop_name: str, conn: Connection
) -> None:
    """One rank of a gloo group: build a ring with create_from_process_group."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:

        async def body() -> list[Any]:
            io = await ShmRingBufferIO.create_from_process_group(
                dist.group.WORLD, 1024, 4, writer_rank=1
            )
            got = []
            async with io:
                for obj in ({"step": 1}, torch.arange(600, dtype=torch.float32), b"end"):
                    got.append(await io.broadcast_object(obj if io.is_writer else None, timeout=20))
                if io.is_writer:  # the name is gone as soon as everyone attached
                    got.append(io.buffer.name in os.listdir("/dev/shm"))
            return got

        got = run_loop(loop_name, body)
        dist.barrier()
        conn.send([g.tolist() if isinstance(g, torch.Tensor) else g for g in got])
    finally:
        dist.destroy_process_group()
        conn.close()


@contextlib.contextmanager
def child(target: Callable[..., None], *args: Any) -> Iterator[tuple[Any, Connection]]:
    """Run ``target(*args, conn)`` in a worker process; always reap it and its fds."""
    ctx = worker_context()
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, theirs), daemon=True)
    try:
        proc.start()
        theirs.close()
        yield proc, mine
    finally:
        theirs.close()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        mine.close()
        proc.close()
