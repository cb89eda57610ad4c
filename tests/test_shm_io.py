"""ShmRingBufferIO in one process: protocol, big objects, errors, cancellation.

Writer and readers run as tasks on the test's loop (asyncio and uvloop);
cross-process behaviour is in test_shm_processes.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest

from aiokvpipe.backoff import Backoff
from aiokvpipe.cadence import Cadence
from aiokvpipe.errors import (
    HandleError,
    PipeClosedError,
    ReaderGoneError,
    RingEmptyError,
    RingUsageError,
    RingViewError,
    SlowReaderError,
    TransferTimeout,
    WriterGoneError,
)
from aiokvpipe.shm import ShmRingBuffer, ShmRingBufferIO
from aiokvpipe.shm.doorbell import (
    RUNG,
    TIMEOUT,
    TIMER,
    Doorbell,
    check_private_dir,
    doorbell_address,
)
from aiokvpipe.shm.ring import (
    READER_SLOTS_OFF,
    SLOT_BYTES,
    SLOT_PARKED,
    SLOT_SPINNING,
    WRITER_PARKED_OFF,
)

# Only the doorbell may wake a parked call: a lost wake-up then shows as a hang.
NO_SAFETY_NET = Backoff(spin_seconds=20e-6, initial_sleep=30.0, max_sleep=30.0)


@contextlib.asynccontextmanager
async def ring_of(
    n_reader: int = 1,
    chunk: int = 256,
    chunks: int = 4,
    backoff: Backoff | None = None,
    anticipate: bool = True,
) -> AsyncIterator[tuple[ShmRingBufferIO, list[ShmRingBufferIO]]]:
    ring = ShmRingBuffer(n_reader, chunk, chunks)
    writer = ShmRingBufferIO(ring, -1, backoff=backoff, owns_buffer=True)
    readers: list[ShmRingBufferIO] = []
    try:
        for r in range(n_reader):
            rb = (
                None
                if backoff is None
                else Backoff(backoff.spin_seconds, backoff.initial_sleep, backoff.max_sleep)
            )
            readers.append(
                ShmRingBufferIO.attach(writer.export_handle(), r, backoff=rb, anticipate=anticipate)
            )
        yield writer, readers
    finally:
        for endpoint in readers:
            await endpoint.aclose()
        await writer.aclose()


def spinning(io: ShmRingBufferIO, ring: ShmRingBuffer | None = None) -> int:
    """Reader ``io``'s SLOT_SPINNING byte (through ``ring`` once io's own mapping is closed)."""
    header = (ring or io.buffer).header
    return int(header[READER_SLOTS_OFF + SLOT_BYTES * io.reader_rank + SLOT_SPINNING])


async def assert_settled_then_reads(
    writer: ShmRingBufferIO, reader: ShmRingBufferIO, message: bytes
) -> None:
    """The reader's spinning hint and park word are down, and it reads on."""
    assert spinning(reader) == 0
    assert parked(reader) == 0
    await writer.enqueue(message, timeout=1)
    assert await reader.dequeue(timeout=1) == message


def parked(io: ShmRingBufferIO) -> int:
    """1 while the endpoint is parked (its park word is odd)."""
    if io.is_writer:
        offset = WRITER_PARKED_OFF
    else:
        offset = READER_SLOTS_OFF + SLOT_BYTES * io.reader_rank + SLOT_PARKED
    return int(io.buffer.header_words[offset // 4] & 1)


async def test_messages_arrive_in_order_at_every_reader() -> None:
    async with ring_of(n_reader=3, chunks=4) as (writer, readers):
        msgs: list[Any] = [b"x" * i for i in range(40)] + [None, {"k": [1, 2]}, np.arange(5)]

        async def read_all(r: ShmRingBufferIO) -> list[Any]:
            return [await r.dequeue(timeout=10) for _ in msgs]

        tasks = [asyncio.create_task(read_all(r)) for r in readers]
        for m in msgs:
            await writer.enqueue(m, timeout=10)
        for got in await asyncio.gather(*tasks):
            assert got[:41] == msgs[:41] and got[41] == msgs[41]
            np.testing.assert_array_equal(got[42], msgs[42])


@pytest.mark.parametrize("size", [257, 256 * 3, 256 * 10 + 17])
async def test_objects_larger_than_a_chunk_span_chunks(size: int) -> None:
    # The ring is smaller than the message: writer and reader must interleave.
    async with ring_of(n_reader=2, chunk=256, chunks=2) as (writer, readers):
        payload = bytes(random.getrandbits(8) for _ in range(size))
        arr = np.arange(size, dtype=np.float64)
        reads = [asyncio.create_task(r.dequeue(timeout=10)) for r in readers]
        await writer.enqueue(payload, timeout=10)
        assert [await t for t in reads] == [payload, payload]
        reads = [asyncio.create_task(r.dequeue(timeout=10)) for r in readers]
        await writer.enqueue({"arr": arr, "tag": "big"}, timeout=10)
        for t in reads:
            out = await t
            assert out["tag"] == "big" and out["arr"].ctypes.data % 64 == 0
            np.testing.assert_array_equal(out["arr"], arr)


async def test_large_tensor_spans_chunks() -> None:
    import torch

    async with ring_of(n_reader=1, chunk=1024, chunks=3) as (writer, (reader,)):
        t = torch.randn(64, 33)
        read = asyncio.create_task(reader.dequeue(timeout=10))
        await writer.broadcast_object(t, timeout=10)
        out = await read
        assert isinstance(out, torch.Tensor) and torch.equal(out, t)


async def test_raw_chunks_and_broadcast_object() -> None:
    async with ring_of(n_reader=2) as (writer, readers):
        async with writer.acquire_write(timeout=1) as buf:
            assert len(buf) == 256
            buf[:5] = b"hello"
        for r in readers:
            async with r.acquire_read(timeout=1) as buf:
                assert len(buf) == 256 and bytes(buf[:5]) == b"hello"
        assert await writer.broadcast_object({"a": 1}) == {"a": 1}
        for r in readers:
            assert await r.broadcast_object() == {"a": 1}


async def test_buffers_are_released_after_the_block() -> None:
    async with ring_of() as (writer, (reader,)):
        async with writer.acquire_write() as wbuf:
            wbuf[:1] = b"z"
        with pytest.raises(ValueError, match="released"):
            wbuf[0]
        async with reader.acquire_read() as rbuf:
            pass
        with pytest.raises(ValueError, match="released"):
            rbuf[0]


async def test_failed_blocks_do_not_publish_or_consume() -> None:
    async with ring_of(n_reader=1) as (writer, (reader,)):
        with pytest.raises(RuntimeError, match="boom"):
            async with writer.acquire_write() as buf:
                buf[:3] = b"bad"
                raise RuntimeError("boom")
        with pytest.raises(TransferTimeout):
            await reader.dequeue(timeout=0.02)  # nothing was published
        await writer.enqueue(b"good")
        with pytest.raises(RuntimeError, match="again"):
            async with reader.acquire_read() as buf:
                raise RuntimeError("again")
        assert await reader.dequeue(timeout=1) == b"good", "a failed read hands the chunk out again"


async def test_a_view_kept_past_acquire_read_is_refused_and_the_chunk_stays_unread() -> None:
    async with ring_of(n_reader=1, chunk=64, chunks=2) as (writer, (reader,)):
        await writer.enqueue(b"first")
        await writer.enqueue(b"second")
        with pytest.raises(RingViewError, match=r"reader 0.*not marked read") as info:
            async with reader.acquire_read(timeout=1) as buf:
                kept = buf[:5]  # a slice outlives the block
        assert isinstance(info.value, BufferError) and isinstance(info.value, RingUsageError)
        # Not marked read, so the writer cannot overwrite what the slice shows.
        with pytest.raises(SlowReaderError):
            await writer.enqueue(b"third", timeout=0.05)
        assert bytes(kept) == b"first"
        del kept
        with pytest.raises(RingViewError):
            async with reader.acquire_read(timeout=1) as buf:
                arr = np.frombuffer(buf, dtype=np.uint8)  # an array of the chunk, too
        assert arr.tobytes() == b"first"
        del arr
        async with reader.acquire_read(timeout=1) as buf:  # views gone: handed out again
            assert bytes(buf) == b"first"
        assert await reader.dequeue(timeout=1) == b"second"
        await writer.enqueue(b"third", timeout=1)
        assert await reader.dequeue(timeout=1) == b"third"


async def test_a_view_kept_past_acquire_write_is_refused_and_nothing_is_published() -> None:
    async with ring_of(n_reader=1, chunk=64, chunks=2) as (writer, (reader,)):
        with pytest.raises(RingViewError, match=r"acquire_write.*not published"):
            async with writer.acquire_write(timeout=1) as buf:
                buf[:4] = b"half"
                kept = buf.cast("B", (8, 8))  # a cast view outlives the block
        with pytest.raises(TransferTimeout):
            await reader.dequeue(timeout=0.02)
        del kept
        async with writer.acquire_write(timeout=1) as buf:  # the same chunk, to fill again
            buf[:4] = b"full"
        async with reader.acquire_read(timeout=1) as buf:
            assert bytes(buf[:4]) == b"full"
        # A block that raises keeps its own error, views or not (nothing is marked).
        with pytest.raises(KeyError):
            async with writer.acquire_write(timeout=1) as buf:
                kept = buf[:1]
                raise KeyError("mine")
        del kept
        await writer.enqueue(b"after", timeout=1)
        assert await reader.dequeue(timeout=1) == b"after"


async def test_roles_and_concurrent_use_are_checked() -> None:
    async with ring_of(n_reader=1) as (writer, (reader,)):
        with pytest.raises(RingUsageError, match="cannot write"):
            await reader.enqueue(b"x")
        with pytest.raises(RingUsageError, match="cannot read"):
            await writer.dequeue()
        first = asyncio.create_task(reader.dequeue(timeout=5))
        await asyncio.sleep(0.01)
        with pytest.raises(RingUsageError, match="another task"):
            await reader.dequeue(timeout=1)
        await writer.enqueue(b"one")
        assert await first == b"one"


async def test_wrong_reader_ranks_are_refused() -> None:
    async with ring_of(n_reader=2) as (writer, _readers):
        handle = writer.export_handle()
        for rank in (2, -2, 7):
            with pytest.raises(HandleError, match=f"reader_rank {rank}"):
                ShmRingBufferIO.attach(handle, rank)
        with pytest.raises(HandleError, match="already attached"):
            ShmRingBufferIO.attach(handle, 0)
        with pytest.raises(HandleError, match="already has a writer"):
            ShmRingBufferIO.attach(handle, -1)


async def test_slow_reader_is_named_and_nothing_is_lost() -> None:
    async with ring_of(n_reader=3, chunks=4) as (writer, readers):
        fast = readers[0]
        for i in range(4):
            await writer.enqueue(b"%d" % i)
            assert await fast.dequeue(timeout=1) == b"%d" % i
        started = time.monotonic()
        with pytest.raises(SlowReaderError) as info:
            async with writer.acquire_write(timeout=0.1):
                pass
        assert 0.09 <= time.monotonic() - started < 2
        assert info.value.lagging_readers == (1, 2)
        assert "readers [1, 2]" in str(info.value) and "pid" in str(info.value)
        assert parked(writer) == 0
        # Everything written is still there, in order, for the slow readers.
        assert [await readers[1].dequeue(timeout=1) for _ in range(4)] == [b"0", b"1", b"2", b"3"]
        assert [await readers[2].dequeue(timeout=1) for _ in range(4)] == [b"0", b"1", b"2", b"3"]
        await writer.enqueue(b"4", timeout=1)
        assert [await r.dequeue(timeout=1) for r in readers] == [b"4"] * 3


async def test_a_closed_reader_stops_the_writer_only_where_it_holds_a_chunk() -> None:
    async with ring_of(n_reader=2, chunks=2) as (writer, (fast, leaving)):
        await writer.enqueue(b"0")
        assert await leaving.dequeue(timeout=1) == b"0"
        handle = writer.export_handle()
        leaving.close()  # read everything so far, then closed: holds nothing yet
        await writer.enqueue(b"1", timeout=1)  # chunk 1 was never written
        assert [await fast.dequeue(timeout=1) for _ in range(2)] == [b"0", b"1"]
        # Chunk 0 is free (both read it): reuse it. Then chunk 1 is held by the closed reader.
        await writer.enqueue(b"2", timeout=1)
        with pytest.raises(ReaderGoneError, match="reader 1 is gone") as info:
            await writer.enqueue(b"3", timeout=20)  # at once, not after the timeout
        assert info.value.rank == 1 and info.value.lagging_readers == (1,)
        # Not final: a reader re-attached at that rank resumes where it left off.
        with ShmRingBufferIO.attach(handle, 1) as back:
            assert await back.dequeue(timeout=1) == b"1"
            await writer.enqueue(b"3", timeout=1)
            assert [await back.dequeue(timeout=1) for _ in range(2)] == [b"2", b"3"]
            assert [await fast.dequeue(timeout=1) for _ in range(2)] == [b"2", b"3"]


# -- nowait ------------------------------------------------------------------------


async def test_nowait_round_trip_of_every_kind() -> None:
    async with ring_of(n_reader=2, chunk=256, chunks=16) as (writer, readers):
        arr = np.arange(100, dtype=np.float32)  # 400 B and its header: several chunks
        msgs: list[Any] = [b"raw", {"k": [1, 2]}, None, bytes(700)]
        for m in [*msgs, arr]:
            writer.enqueue_nowait(m)
        for r in readers:
            assert [r.dequeue_nowait() for _ in msgs] == msgs
            np.testing.assert_array_equal(r.dequeue_nowait(), arr)
            with pytest.raises(RingEmptyError, match=f"reader {r.reader_rank}"):
                r.dequeue_nowait()
        # the async calls go on from where the nowait ones left off
        await writer.enqueue(b"after", timeout=1)
        assert [await r.dequeue(timeout=1) for r in readers] == [b"after", b"after"]


async def test_enqueue_nowait_on_a_full_ring_writes_nothing_and_names_the_readers() -> None:
    async with ring_of(n_reader=2, chunk=256, chunks=4) as (writer, (fast, slow)):
        for i in range(3):
            writer.enqueue_nowait(b"%d" % i)
            assert fast.dequeue_nowait() == b"%d" % i
        # One chunk is free: a two-chunk message does not fit, a one-chunk one does.
        with pytest.raises(SlowReaderError) as info:
            writer.enqueue_nowait(bytes(300))
        assert info.value.lagging_readers == (1,), "the chunk after the free one is slow's"
        writer.enqueue_nowait(b"3")
        with pytest.raises(SlowReaderError) as info:
            writer.enqueue_nowait(b"4")
        assert info.value.lagging_readers == (1,)
        assert "readers [1]" in str(info.value)
        # Nothing half-written: both readers see exactly 0..3, then the ring moves on.
        assert fast.dequeue_nowait() == b"3"
        assert [slow.dequeue_nowait() for _ in range(4)] == [b"0", b"1", b"2", b"3"]
        writer.enqueue_nowait(bytes(300))
        assert fast.dequeue_nowait() == slow.dequeue_nowait() == bytes(300)


async def test_enqueue_nowait_refuses_a_message_bigger_than_the_ring() -> None:
    async with ring_of(n_reader=1, chunk=256, chunks=2) as (writer, (reader,)):
        with pytest.raises(RingUsageError, match=r"spans 3 chunks of 256 bytes.*has 2"):
            writer.enqueue_nowait(bytes(600))
        writer.enqueue_nowait(b"still fine")
        assert reader.dequeue_nowait() == b"still fine"


async def test_dequeue_nowait_keeps_the_part_of_a_message_that_arrived() -> None:
    # A message bigger than the ring: the writer streams it as the reader takes
    # chunks, and a reader polling with dequeue_nowait must not stall it.
    async with ring_of(n_reader=1, chunk=256, chunks=2) as (writer, (reader,)):
        payload = os.urandom(256 * 5 + 3)
        sending = asyncio.create_task(writer.enqueue(payload, timeout=10))
        empties = 0
        while True:
            try:
                got = reader.dequeue_nowait()
                break
            except RingEmptyError:
                empties += 1
                await asyncio.sleep(0)
        assert got == payload and empties > 0
        await sending


async def test_nowait_roles_and_closed_endpoints() -> None:
    async with ring_of(n_reader=1) as (writer, (reader,)):
        with pytest.raises(RingUsageError, match="cannot read"):
            writer.dequeue_nowait()
        with pytest.raises(RingUsageError, match="cannot write"):
            reader.enqueue_nowait(b"x")
        with pytest.raises(RingUsageError, match="cannot write"):
            reader.enqueue_nowait({"not": "bytes"})
        pending = asyncio.create_task(reader.dequeue(timeout=5))
        await asyncio.sleep(0.01)  # parked in dequeue: the endpoint is busy
        with pytest.raises(RingUsageError, match="another task"):
            reader.dequeue_nowait()
        writer.enqueue_nowait(b"for the parked one")
        assert await pending == b"for the parked one"
        writer.close()
        with pytest.raises(PipeClosedError):
            writer.enqueue_nowait(b"late")
        with pytest.raises(PipeClosedError):
            writer.enqueue_nowait([1, 2])
        with pytest.raises(WriterGoneError):
            reader.dequeue_nowait()
        reader.close()
        with pytest.raises(PipeClosedError):
            reader.dequeue_nowait()


async def test_enqueue_nowait_from_a_plain_loop_callback() -> None:
    async with ring_of(n_reader=1) as (writer, (reader,)):
        loop = asyncio.get_running_loop()
        loop.call_soon(writer.enqueue_nowait, b"from a callback")
        assert await reader.dequeue(timeout=1) == b"from a callback"


async def test_reader_timeout_is_a_transfer_timeout() -> None:
    async with ring_of() as (_writer, (reader,)):
        with pytest.raises(TransferTimeout) as info:
            await reader.dequeue(timeout=0.05)
        assert not isinstance(info.value, WriterGoneError)
        assert parked(reader) == 0


async def test_no_lost_wakeups_without_the_safety_recheck() -> None:
    # Parked calls wait 30 s unless rung; every message must still arrive at once.
    async with ring_of(n_reader=2, chunks=2, backoff=NO_SAFETY_NET) as (writer, readers):
        rng = random.Random(7)
        count = 150

        async def consume(r: ShmRingBufferIO) -> list[bytes]:
            out = []
            for _ in range(count):
                out.append(await r.dequeue(timeout=5))
                if rng.random() < 0.3:
                    await asyncio.sleep(rng.random() * 2e-4)
            return out

        tasks = [asyncio.create_task(consume(r)) for r in readers]
        for i in range(count):
            await writer.enqueue(i.to_bytes(2, "little"), timeout=5)
            if rng.random() < 0.3:
                await asyncio.sleep(rng.random() * 2e-4)
        expected = [i.to_bytes(2, "little") for i in range(count)]
        assert await asyncio.gather(*tasks) == [expected, expected]


async def test_cancel_parked_read_then_read_again() -> None:
    async with ring_of(backoff=NO_SAFETY_NET) as (writer, (reader,)):
        task = asyncio.create_task(reader.dequeue())
        await asyncio.sleep(0.02)
        assert parked(reader) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert parked(reader) == 0
        await writer.enqueue(b"after")
        assert await reader.dequeue(timeout=1) == b"after"
        # Same for the context-manager form.
        task = asyncio.create_task(reader.acquire_read().__aenter__())
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await writer.enqueue(b"again")
        async with reader.acquire_read(timeout=1) as buf:
            assert bytes(buf) == b"again"


async def test_cancel_parked_write_then_write_again() -> None:
    async with ring_of(chunks=2, backoff=NO_SAFETY_NET) as (writer, (reader,)):
        await writer.enqueue(b"a")
        await writer.enqueue(b"b")
        task = asyncio.create_task(writer.enqueue(b"c"))
        await asyncio.sleep(0.02)
        assert parked(writer) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert parked(writer) == 0
        assert await reader.dequeue(timeout=1) == b"a"
        await writer.enqueue(b"d", timeout=1)
        assert [await reader.dequeue(timeout=1) for _ in range(2)] == [b"b", b"d"]


async def test_cancelled_dequeue_mid_message_resumes(monkeypatch: pytest.MonkeyPatch) -> None:
    slow_writer = Backoff(spin_seconds=0, initial_sleep=0.2, max_sleep=0.2)
    async with ring_of(chunk=64, chunks=1, backoff=slow_writer) as (writer, (reader,)):
        # The reader never rings the writer, so the writer only notices a free
        # chunk on its 0.2 s safety recheck: a window to cancel mid-message.
        monkeypatch.setattr(reader._bell, "ring", lambda address: None)
        payload = bytes(range(200))  # 4 chunks through a 1-chunk ring
        send = asyncio.create_task(writer.enqueue(payload, timeout=5))
        first = asyncio.create_task(reader.dequeue(timeout=5))
        await asyncio.sleep(0.05)
        assert reader._partial is not None and reader._partial.filled == 64
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await reader.dequeue(timeout=5) == payload, "the next dequeue resumes the message"
        await send


async def test_tiny_deadlines_never_lose_or_reorder() -> None:
    async with ring_of(chunk=64, chunks=2) as (writer, (reader,)):
        msgs = [bytes([i]) * (i % 150 + 1) for i in range(60)]

        async def produce() -> None:
            for m in msgs:
                await writer.enqueue(m, timeout=5)

        producer = asyncio.create_task(produce())
        got: list[bytes] = []
        while len(got) < len(msgs):
            with contextlib.suppress(asyncio.TimeoutError):
                got.append(await asyncio.wait_for(reader.dequeue(), 0.0002))
        await producer
        assert got == msgs


async def test_abandoned_multi_chunk_message_is_skipped() -> None:
    async with ring_of(chunk=64, chunks=2) as (writer, (reader,)):
        send = asyncio.create_task(writer.enqueue(bytes(500), timeout=5))  # needs 8 chunks
        await asyncio.sleep(0.01)
        send.cancel()  # the writer gives up after 2 fragments
        with pytest.raises(asyncio.CancelledError):
            await send
        following = asyncio.create_task(writer.enqueue(b"next", timeout=5))
        assert await reader.dequeue(timeout=5) == b"next"
        await following


async def test_writer_close_wakes_readers_after_the_backlog() -> None:
    async with ring_of(n_reader=2, backoff=NO_SAFETY_NET) as (writer, readers):
        await writer.enqueue(b"last words")
        waiting = asyncio.create_task(readers[1].dequeue(timeout=10))
        assert await waiting == b"last words"
        parked_read = asyncio.create_task(readers[1].dequeue(timeout=10))
        await asyncio.sleep(0.02)
        started = time.monotonic()
        writer.close()
        with pytest.raises(WriterGoneError, match="closed"):
            await parked_read
        assert time.monotonic() - started < 1.0
        assert await readers[0].dequeue(timeout=1) == b"last words"
        with pytest.raises(WriterGoneError):
            await readers[0].dequeue(timeout=1)


async def test_close_fails_a_parked_call_and_later_calls() -> None:
    async with ring_of(backoff=NO_SAFETY_NET) as (writer, (reader,)):
        task = asyncio.create_task(reader.dequeue())
        await asyncio.sleep(0.02)
        await reader.aclose()
        with pytest.raises(PipeClosedError):
            await asyncio.wait_for(task, 2)
        with pytest.raises(PipeClosedError):
            await reader.dequeue()
        await reader.aclose()  # idempotent
        await writer.enqueue(b"readers may come and go")


async def test_blocking_calls_refuse_to_block_a_running_loop() -> None:
    async with ring_of() as (writer, (reader,)):
        with pytest.raises(RingUsageError, match="running event loop"):
            writer.enqueue_sync(b"x")
        with pytest.raises(RingUsageError, match="running event loop"):
            reader.dequeue_sync(timeout=0)
        await writer.enqueue(b"still usable")
        assert await reader.dequeue(timeout=1) == b"still usable"


async def test_closing_the_ring_under_an_endpoint() -> None:
    ring = ShmRingBuffer(1, 64, 2)
    writer = ShmRingBufferIO(ring, -1)
    ring.close()
    with pytest.raises(PipeClosedError):
        await writer.enqueue(b"x")
    writer.close()


def _exited_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


async def test_dead_writer_is_detected_without_pidfd(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiokvpipe.shm import peers as peers_module
    from aiokvpipe.shm.liveness import ProcessIdentity
    from aiokvpipe.shm.ring import IDENTITY, WRITER_ID_OFF

    monkeypatch.setattr(peers_module, "open_pidfd", lambda identity: None)  # _check_peer's
    async with ring_of(backoff=Backoff(20e-6, 0.01, 0.02)) as (writer, (reader,)):
        # Pretend the writer is a process that has since exited.
        pid = _exited_pid()
        ghost = ProcessIdentity(pid, 1, ProcessIdentity.current().namespace)
        IDENTITY.pack_into(writer.buffer.header, WRITER_ID_OFF, *vars(ghost).values())
        started = time.monotonic()
        with pytest.raises(WriterGoneError, match=f"pid {pid}"):
            await reader.dequeue(timeout=10)
        assert time.monotonic() - started < 1.0


def test_zombies_count_as_exited() -> None:
    from aiokvpipe.shm.liveness import ProcessIdentity

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    ident = ProcessIdentity(proc.pid, 0, ProcessIdentity.current().namespace)
    deadline = time.monotonic() + 10
    while ident.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)  # exits, but stays a zombie: kill(pid, 0) still succeeds
    assert not ident.is_alive()
    proc.wait()
    assert ProcessIdentity.current().is_alive()


def test_blocking_api() -> None:
    import threading

    ring = ShmRingBuffer(1, 128, 2)
    with (
        ShmRingBufferIO(ring, -1, owns_buffer=True) as writer,
        ShmRingBufferIO.attach(writer.export_handle(), 0) as reader,
    ):
        writer.enqueue_sync({"sync": True})
        assert reader.dequeue_sync(timeout=1) == {"sync": True}
        with pytest.raises(TransferTimeout):
            reader.dequeue_sync(timeout=0.02)
        # A blocked reader is woken by the doorbell from another thread.

        def send_late() -> None:
            time.sleep(0.05)
            writer.enqueue_sync(b"late" * 100)

        sender = threading.Thread(target=send_late)
        sender.start()
        assert reader.dequeue_sync(timeout=5) == b"late" * 100
        sender.join()
        assert writer.broadcast_object_sync(7) == 7 and reader.broadcast_object_sync() == 7


def test_filesystem_doorbells(tmp_path: Any) -> None:
    addr = doorbell_address("aiokv_fs_test", "w", abstract=False)
    assert isinstance(addr, str)
    bell, other = Doorbell(addr), Doorbell(doorbell_address("aiokv_fs_test", "r0", abstract=False))
    try:
        with pytest.raises(HandleError, match="already attached"):
            Doorbell(addr)
        other.ring(addr)
        started = time.monotonic()
        bell.wait_blocking(5.0)
        assert time.monotonic() - started < 1.0
        other.ring(doorbell_address("aiokv_nobody", "w", abstract=False))  # ignored
    finally:
        bell.close()
        other.close()
    assert not os.path.exists(addr)


def test_doorbell_directory_must_be_private(tmp_path: Any) -> None:
    # Filesystem doorbells (non-Linux) live in <tempdir>/aiokvpipe-<uid>; one
    # that another user made, or could enter, or a symlink, is refused.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    check_private_dir(str(private))  # ours, 0700: fine
    private.chmod(0o755)
    with pytest.raises(HandleError, match=r"mode 0755.*must be a directory owned by uid"):
        check_private_dir(str(private))
    private.chmod(0o700)
    link = tmp_path / "link"
    link.symlink_to(private)
    with pytest.raises(HandleError, match="a symlink"):
        check_private_dir(str(link))
    plain = tmp_path / "file"
    plain.write_bytes(b"")
    plain.chmod(0o600)
    with pytest.raises(HandleError, match="not a directory"):
        check_private_dir(str(plain))
    with pytest.raises(HandleError, match="cannot be checked"):
        check_private_dir(str(tmp_path / "missing"))
    if os.getuid() == 0:  # only root can give a directory to another user
        os.chown(private, 65534, -1)
        with pytest.raises(HandleError, match="owned by uid 65534"):
            check_private_dir(str(private))


def test_filesystem_doorbells_refuse_a_foreign_directory(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # what TMPDIR would set
    # The directory does not exist yet: it is created private, and used.
    addr = doorbell_address("aiokv_fs_dir", "w", abstract=False)
    assert isinstance(addr, str) and os.path.dirname(addr) == str(
        tmp_path / f"aiokvpipe-{os.getuid()}"
    )
    assert os.stat(os.path.dirname(addr)).st_mode & 0o777 == 0o700
    Doorbell(addr).close()
    # Someone else's (here: an open one) is refused before anything is bound in it.
    os.chmod(os.path.dirname(addr), 0o777)
    with pytest.raises(HandleError, match="mode 0777"):
        doorbell_address("aiokv_fs_dir", "w", abstract=False)


async def test_spin_window_adapts_to_streams_and_is_dropped_for_sparse_traffic() -> None:
    async with ring_of() as (_writer, (reader,)):
        base = reader._backoff.spin_seconds
        for _ in range(10):
            reader._adapt_spin(base)  # parks that ended right after the spin window
        assert reader._backoff.spin_seconds == 8 * base, "streams stop parking"
        reader._adapt_spin(0.002)  # a real wait, as between sparse messages
        assert reader._backoff.spin_seconds == 0, "sparse: the next wait parks at once"
        reader._adapt_spin(base)  # a short park again: spinning pays
        assert reader._backoff.spin_seconds == base


# -- the doorbell's precise wake-up (wake_at) -----------------------------------


@contextlib.contextmanager
def doorbell_pair() -> Iterator[tuple[Doorbell, Doorbell]]:
    """A doorbell and a peer that rings it (abstract sockets on Linux)."""
    name = f"aiokv_bell_{os.getpid()}_{next(_bell_ids)}"
    bell = Doorbell(doorbell_address(name, "r0"))
    try:
        peer = Doorbell(doorbell_address(name, "w"))
        try:
            yield bell, peer
        finally:
            peer.close()
    finally:
        bell.close()


_bell_ids = itertools.count()


@pytest.mark.timeout(20)
async def test_doorbell_wake_at_returns_timer_when_nobody_rings() -> None:
    with doorbell_pair() as (bell, _peer):
        for _ in range(3):  # the timer is re-armed for every wait
            wake_at = time.monotonic() + 0.005
            assert await bell.wait(10.0, wake_at=wake_at) == TIMER
            assert time.monotonic() >= wake_at
        assert await bell.wait(10.0, wake_at=time.monotonic() - 1.0) == TIMER  # already due


@pytest.mark.timeout(20)
async def test_doorbell_ring_before_wake_at_and_no_stale_timer_later() -> None:
    # The wake_at instants are far behind the rings, so even a loop stalled
    # for a while on a loaded box sees the ring first.
    with doorbell_pair() as (bell, peer):
        # A ring queued before the wait.
        wake_at = time.monotonic() + 0.5
        peer.ring(bell.address)
        assert await bell.wait(10.0, wake_at=wake_at) == RUNG
        # A ring during the wait.
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, peer.ring, bell.address)
        wake_at2 = time.monotonic() + 0.5
        assert await bell.wait(10.0, wake_at=wake_at2) == RUNG
        # Both wake_at instants pass during this wait: neither may end it.
        last = max(wake_at, wake_at2)
        assert await bell.wait(last + 0.2 - time.monotonic()) == TIMEOUT
        assert time.monotonic() >= last
        assert bell._timer.timer is not None and not bell._timer.timer.clear()


@pytest.mark.timeout(20)
def test_doorbell_wait_blocking_wake_at() -> None:
    with doorbell_pair() as (bell, peer):
        wake_at = time.monotonic() + 0.005
        assert bell.wait_blocking(10.0, wake_at=wake_at) == TIMER
        assert time.monotonic() >= wake_at
        wake_at = time.monotonic() + 0.2
        peer.ring(bell.address)
        assert bell.wait_blocking(10.0, wake_at=wake_at) == RUNG
        timeout = wake_at + 0.2 - time.monotonic()
        assert bell.wait_blocking(timeout) == TIMEOUT, "the first wait's timer must not fire later"
        assert time.monotonic() >= wake_at
        assert bell._timer.timer is not None and not bell._timer.timer.clear()
        assert bell.wait_blocking(0.01, wake_at=time.monotonic() + 5.0) == TIMEOUT


@pytest.mark.timeout(20)
def test_doorbell_wait_blocking_ring_from_another_thread_beats_wake_at() -> None:
    import threading

    with doorbell_pair() as (bell, peer):
        ringer = threading.Timer(0.02, peer.ring, (bell.address,))
        ringer.start()
        try:
            wake_at = time.monotonic() + 1.0
            assert bell.wait_blocking(10.0, wake_at=wake_at) == RUNG
        finally:
            ringer.join()
        assert bell.wait_blocking(wake_at + 0.2 - time.monotonic()) == TIMEOUT
        assert time.monotonic() >= wake_at
        assert bell._timer.timer is not None and not bell._timer.timer.clear()


@pytest.mark.timeout(20)
async def test_doorbell_without_timerfd_wakes_on_its_coarse_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiokvpipe import _timerfd

    monkeypatch.setattr(_timerfd, "open_timer", lambda: None)  # as on a non-Linux box
    with doorbell_pair() as (bell, _peer):
        wake_at = time.monotonic() + 0.02
        assert await bell.wait(10.0, wake_at=wake_at) == TIMEOUT
        assert bell.wait_blocking(10.0, wake_at=time.monotonic() + 0.02) == TIMEOUT
        assert bell._timer.timer is None


# -- readers anticipating the writer's rhythm -----------------------------------


def expect_next_in(reader: ShmRingBufferIO, due: float, width: float) -> tuple[float, float]:
    """Give ``reader`` a rhythm whose next window opens ``due`` from now, ``width`` wide.

    A real Cadence fed the arrivals of a steady stream that ended now; the
    window is far wider than the defaults, so even a very late timer wake-up
    on a loaded VM lands inside it. Returns the window.
    """
    cadence = reader._cadence = Cadence(
        budget=1.0, lead=0.0, tail=width, min_window=width, max_window=width
    )
    now = time.monotonic()
    for k in range(4, -1, -1):
        cadence.arrived(now - k * due)
    window = cadence.window()
    assert window is not None
    return window


@contextlib.asynccontextmanager
async def flag_watch(*readers: ShmRingBufferIO) -> AsyncIterator[list[int]]:
    """Sample the readers' spinning bytes on every loop iteration; yields [seen up]."""
    ring = readers[0].buffer
    seen = [0]

    async def watch() -> None:
        while True:
            for r in readers:
                seen[0] |= spinning(r, ring)
            await asyncio.sleep(0)

    task = asyncio.create_task(watch())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until_spinning(reader: ShmRingBufferIO, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not spinning(reader):
        assert time.monotonic() < deadline, "the reader never spun in its window"
        await asyncio.sleep(0.001)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("anticipate", [True, False], ids=["anticipate", "park"])
async def test_readers_follow_an_in_process_rhythm(anticipate: bool) -> None:
    async with ring_of(n_reader=2, chunks=4, anticipate=anticipate) as (writer, readers):
        msgs = [b"%02d:" % i + bytes(range(i % 50)) for i in range(40)]

        async def produce() -> None:
            for m in msgs:
                await writer.enqueue(m, timeout=10)
                await asyncio.sleep(0.002)

        async def consume(r: ShmRingBufferIO) -> list[bytes]:
            return [await r.dequeue(timeout=10) for _ in msgs]

        async with flag_watch(*readers) as seen:
            producer = asyncio.create_task(produce())
            got = await asyncio.gather(*(consume(r) for r in readers))
            await producer
        assert got == [msgs, msgs]
        for r in readers:
            assert spinning(r) == 0
            assert parked(r) == 0
            if anticipate:
                assert r._cadence is not None and r._cadence.window() is not None
            else:
                assert r._cadence is None
        if not anticipate:
            assert seen == [0], "a reader that does not anticipate never raises the flag"


@pytest.mark.timeout(30)
async def test_wait_readable_rehearses_once_when_the_window_opens() -> None:
    """``rehearse`` runs when the window for the next chunk opens (the
    spinning hint is up), once however long the spin lasts, and not again
    for the chunk that ends it; a wait with no window never rehearses."""
    async with ring_of(n_reader=1) as (writer, (reader,)):
        calls: list[int] = []
        rehearse = lambda: calls.append(spinning(reader))  # noqa: E731
        expect_next_in(reader, 0.01, 5.0)
        waiting = asyncio.ensure_future(reader.wait_readable(timeout=10, rehearse=rehearse))
        await until_spinning(reader)
        await asyncio.sleep(0.05)  # many spin steps
        assert calls == [1]
        assert writer.write_chunk_nowait(lambda buf: buf.__setitem__(0, 5))
        await asyncio.wait_for(waiting, 5)
        assert calls == [1]
        assert reader.read_chunk_nowait(lambda buf: None)
        # No rhythm: the wait parks until rung and never rehearses.
        assert reader._cadence is not None
        reader._cadence.reset()
        waiting = asyncio.ensure_future(reader.wait_readable(timeout=10, rehearse=rehearse))
        await asyncio.sleep(0.05)
        assert writer.write_chunk_nowait(lambda buf: buf.__setitem__(0, 6))
        await asyncio.wait_for(waiting, 5)
        assert calls == [1]


@pytest.mark.timeout(30)
async def test_a_rehearsal_that_raises_fails_the_wait_and_frees_the_endpoint() -> None:
    async with ring_of(n_reader=1) as (writer, (reader,)):

        def broken() -> None:
            raise KeyError("rehearsal")

        expect_next_in(reader, 0.01, 5.0)
        with pytest.raises(KeyError, match="rehearsal"):
            await asyncio.wait_for(reader.wait_readable(timeout=10, rehearse=broken), 5)
        assert spinning(reader) == 0 and parked(reader) == 0
        assert writer.write_chunk_nowait(lambda buf: buf.__setitem__(0, 7))
        got: list[int] = []
        assert reader.read_chunk_nowait(lambda buf: got.append(buf[0]))
        assert got == [7]


@pytest.mark.timeout(30)
async def test_writer_keeps_publishing_while_a_reader_spins() -> None:
    async with ring_of(n_reader=2) as (writer, (spinner, other)):
        expect_next_in(spinner, 0.01, 5.0)
        task = asyncio.create_task(spinner.dequeue(timeout=10))
        await until_spinning(spinner)
        for i in range(3):  # the hand-off yield must not stall or reorder the writer
            await writer.enqueue(b"m%d" % i, timeout=5)
        assert await task == b"m0"
        assert spinning(spinner) == 0
        assert [await spinner.dequeue(timeout=5) for _ in range(2)] == [b"m1", b"m2"]
        assert [await other.dequeue(timeout=5) for _ in range(3)] == [b"m0", b"m1", b"m2"]


@pytest.mark.timeout(30)
async def test_timeout_inside_the_window_clears_the_spinning_flag() -> None:
    async with ring_of() as (writer, (reader,)):
        _opens, closes = expect_next_in(reader, 0.02, 5.0)
        async with flag_watch(reader) as seen:
            with pytest.raises(TransferTimeout):
                await reader.dequeue(timeout=0.3)  # the deadline falls inside the window
        assert time.monotonic() < closes
        assert seen == [1], "the reader spun in its window"
        await assert_settled_then_reads(writer, reader, b"later")


@pytest.mark.timeout(30)
async def test_timeout_after_the_window_clears_the_spinning_flag() -> None:
    async with ring_of() as (writer, (reader,)):
        _opens, closes = expect_next_in(reader, 0.02, 0.02)
        started = time.monotonic()
        with pytest.raises(TransferTimeout):
            await reader.dequeue(timeout=0.25)
        assert time.monotonic() - started >= 0.249, "a passing window does not end the wait"
        assert time.monotonic() > closes
        await assert_settled_then_reads(writer, reader, b"later")


@pytest.mark.timeout(30)
async def test_cancelled_while_spinning_then_read_again() -> None:
    async with ring_of(backoff=NO_SAFETY_NET) as (writer, (reader,)):
        expect_next_in(reader, 0.01, 5.0)
        task = asyncio.create_task(reader.dequeue(timeout=20))
        await until_spinning(reader)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await assert_settled_then_reads(writer, reader, b"next")
        # Cancelled again while spinning, then a message published while nobody waits.
        expect_next_in(reader, 0.01, 5.0)
        task = asyncio.create_task(reader.dequeue(timeout=20))
        await until_spinning(reader)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert spinning(reader) == 0
        await writer.enqueue(b"after", timeout=1)
        await writer.enqueue(b"and more", timeout=1)
        assert [await reader.dequeue(timeout=1) for _ in range(2)] == [b"after", b"and more"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("own_mapping", [True, False], ids=["attached", "shared-mapping"])
async def test_closed_while_spinning(own_mapping: bool) -> None:
    # Found by this test: a reader closed by another task mid-spin went on
    # spinning, on released memory (ValueError) or until its deadline
    # (TransferTimeout), and left its flag up for the writer for good.
    async with ring_of(n_reader=2) as (writer, (attached, other)):
        if own_mapping:
            reader = attached
        else:  # an endpoint on the writer's own mapping: closing it leaves the memory mapped
            await attached.aclose()
            reader = ShmRingBufferIO(writer.buffer, 0)
        expect_next_in(reader, 0.01, 5.0)
        task = asyncio.create_task(reader.dequeue(timeout=20))
        await until_spinning(reader)
        await reader.aclose()
        with pytest.raises(PipeClosedError):
            await asyncio.wait_for(task, 2)
        assert spinning(reader, writer.buffer) == 0
        await writer.enqueue(b"still flowing", timeout=1)
        assert await other.dequeue(timeout=1) == b"still flowing"


@pytest.mark.timeout(30)
def test_blocking_dequeue_timing_out_in_the_window_clears_the_flag() -> None:
    import threading

    ring = ShmRingBuffer(1, 128, 2)
    with (
        ShmRingBufferIO(ring, -1, owns_buffer=True) as writer,
        ShmRingBufferIO.attach(writer.export_handle(), 0) as reader,
    ):
        seen, stop = [0], threading.Event()

        def watch() -> None:
            while not stop.is_set():
                seen[0] |= spinning(reader, ring)
                time.sleep(0.0005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            expect_next_in(reader, 0.02, 5.0)
            with pytest.raises(TransferTimeout):
                reader.dequeue_sync(timeout=0.3)
        finally:
            stop.set()
            watcher.join()
        assert seen == [1]
        assert spinning(reader) == 0
        writer.enqueue_sync(b"sync")
        assert reader.dequeue_sync(timeout=1) == b"sync"


# -- chunk calls that never wait (the shm transport's small-message path) ----------


async def test_write_and_read_chunk_nowait_round_trip_in_order() -> None:
    async with ring_of(n_reader=1, chunk=256, chunks=2) as (writer, (reader,)):
        for i in range(2):
            assert writer.write_chunk_nowait(lambda buf, i=i: buf.__setitem__(0, 65 + i))
        # both chunks are held by the reader: nothing is written, nothing published
        assert not writer.write_chunk_nowait(lambda buf: pytest.fail("must not be called"))
        got: list[int] = []
        assert reader.read_chunk_nowait(lambda buf: got.append(buf[0]))
        assert len(got) == 1
        assert reader.read_chunk_nowait(lambda buf: got.append(buf[0]) or len(buf))
        assert got == [65, 66]
        assert not reader.read_chunk_nowait(lambda buf: pytest.fail("nothing is published"))
        # the async calls go on from where these left off
        await writer.enqueue(b"after", timeout=1)
        assert await reader.dequeue(timeout=1) == b"after"


async def test_chunk_nowait_calls_that_raise_publish_or_consume_nothing() -> None:
    async with ring_of(n_reader=1, chunk=256, chunks=2) as (writer, (reader,)):

        def broken(buf: memoryview) -> None:
            buf[0] = 1
            raise ValueError("filling failed")

        with pytest.raises(ValueError, match="filling failed"):
            writer.write_chunk_nowait(broken)
        assert not reader.read_chunk_nowait(lambda buf: pytest.fail("nothing was published"))
        assert writer.write_chunk_nowait(lambda buf: buf.__setitem__(0, 7))
        with pytest.raises(KeyError):
            reader.read_chunk_nowait(lambda buf: {}[buf[0]])
        got: list[int] = []
        assert reader.read_chunk_nowait(lambda buf: got.append(buf[0]))  # handed out again
        assert got == [7]


async def test_chunk_nowait_calls_refuse_the_wrong_role_a_busy_or_closed_endpoint() -> None:
    async with ring_of(n_reader=1, chunk=256, chunks=2) as (writer, (reader,)):
        with pytest.raises(RingUsageError, match="cannot read"):
            writer.read_chunk_nowait(lambda buf: None)
        with pytest.raises(RingUsageError, match="cannot write"):
            reader.write_chunk_nowait(lambda buf: None)
        waiting = asyncio.ensure_future(reader.wait_readable(timeout=5))
        await asyncio.sleep(0.01)
        with pytest.raises(RingUsageError, match="already using"):
            reader.read_chunk_nowait(lambda buf: None)
        assert writer.write_chunk_nowait(lambda buf: None)
        await asyncio.wait_for(waiting, 2)
        assert reader.read_chunk_nowait(lambda buf: None)
        writer.close()
        with pytest.raises(PipeClosedError):
            writer.write_chunk_nowait(lambda buf: None)


async def test_wait_readable_waits_times_out_and_reports_the_writer_gone() -> None:
    async with ring_of(n_reader=1, chunk=256, chunks=2, backoff=NO_SAFETY_NET) as (
        writer,
        (reader,),
    ):
        with pytest.raises(TransferTimeout, match="reader 0"):
            await reader.wait_readable(timeout=0.02)
        waiting = asyncio.ensure_future(reader.wait_readable())
        await asyncio.sleep(0.01)
        assert not waiting.done()
        assert writer.write_chunk_nowait(lambda buf: buf.__setitem__(0, 9))
        await asyncio.wait_for(waiting, 2)  # rung: no safety timer could have ended it
        # waiting took nothing: the chunk is still there, once
        got: list[int] = []
        assert reader.read_chunk_nowait(lambda buf: got.append(buf[0]))
        assert got == [9] and not reader.read_chunk_nowait(lambda buf: None)
        # cancelled mid-wait: the endpoint is free again
        waiting = asyncio.ensure_future(reader.wait_readable())
        await asyncio.sleep(0.01)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        writer.close()
        with pytest.raises(WriterGoneError):
            await reader.wait_readable(timeout=1)


async def test_wait_readable_take_hands_the_chunk_over_in_the_doorbell_callback() -> None:
    """A parked wait ended by a ring gives the chunk to ``take`` inside the
    doorbell's fd callback: whatever ``take`` wakes runs before the waiter."""
    async with ring_of(n_reader=1, chunk=256, chunks=2, backoff=NO_SAFETY_NET) as (
        writer,
        (reader,),
    ):
        loop = asyncio.get_running_loop()
        order: list[str] = []
        got: list[int] = []
        delivered: asyncio.Future[None] = loop.create_future()

        def take(buf: memoryview) -> None:
            got.append(buf[0])
            delivered.set_result(None)  # as the transport wakes a parked recv()

        async def consumer() -> None:
            await delivered
            order.append("consumer")

        async def waiter() -> bool:
            took = await reader.wait_readable(timeout=5, take=take)
            order.append("waiter")
            return took

        consuming = asyncio.ensure_future(consumer())
        waiting = asyncio.ensure_future(waiter())
        await asyncio.sleep(0.02)
        assert parked(reader) == 1
        assert writer.write_chunk_nowait(lambda buf: buf.__setitem__(0, 42))
        assert await asyncio.wait_for(waiting, 2) is True  # rung: no safety timer ended it
        await consuming
        assert got == [42]
        assert order == ["consumer", "waiter"]
        assert parked(reader) == 0
        assert not reader.read_chunk_nowait(lambda buf: pytest.fail("it was marked read"))
        # Not parked (a chunk is already there): nothing is taken, as without ``take``.
        assert writer.write_chunk_nowait(lambda buf: buf.__setitem__(0, 43))
        assert await reader.wait_readable(timeout=1, take=lambda buf: pytest.fail("taken")) is False
        assert reader.read_chunk_nowait(lambda buf: got.append(buf[0]))
        assert got == [42, 43]


async def test_wait_readable_take_that_raises_fails_the_wait_and_keeps_the_chunk() -> None:
    async with ring_of(n_reader=1, chunk=256, chunks=2, backoff=NO_SAFETY_NET) as (
        writer,
        (reader,),
    ):

        def broken(buf: memoryview) -> None:
            raise KeyError(buf[0])

        waiting = asyncio.ensure_future(reader.wait_readable(timeout=5, take=broken))
        await asyncio.sleep(0.02)
        assert parked(reader) == 1
        assert writer.write_chunk_nowait(lambda buf: buf.__setitem__(0, 5))
        with pytest.raises(KeyError):
            await asyncio.wait_for(waiting, 2)
        assert parked(reader) == 0
        got: list[int] = []
        assert reader.read_chunk_nowait(lambda buf: got.append(buf[0]))  # handed out again
        assert got == [5]


async def test_wait_readable_take_cancelled_while_parked_takes_nothing() -> None:
    async with ring_of(n_reader=1, chunk=256, chunks=2, backoff=NO_SAFETY_NET) as (
        writer,
        (reader,),
    ):
        waiting = asyncio.ensure_future(
            reader.wait_readable(timeout=5, take=lambda buf: pytest.fail("cancelled: no take"))
        )
        await asyncio.sleep(0.02)
        assert parked(reader) == 1
        # The ring lands in the same turn as the cancel: the callback must not take.
        waiting.cancel()
        assert writer.write_chunk_nowait(lambda buf: buf.__setitem__(0, 6))
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await asyncio.sleep(0.01)  # the ring's fd callback has run by now
        got: list[int] = []
        assert reader.read_chunk_nowait(lambda buf: got.append(buf[0]))
        assert got == [6]


@pytest.mark.parametrize("anticipate", [False, True])
async def test_wait_readable_keep_serves_rings_in_the_callback_until_told_to_stop(
    anticipate: bool,
) -> None:
    """With ``keep``, a parked reader (anticipate=False) stays parked after each
    take and serves the next rings in the callback alone; the wait returns once
    ``keep()`` is false. An anticipating reader returns after the first take."""
    async with ring_of(
        n_reader=1, chunk=256, chunks=2, backoff=NO_SAFETY_NET, anticipate=anticipate
    ) as (writer, (reader,)):
        got: list[int] = []
        waiting = asyncio.ensure_future(
            reader.wait_readable(
                timeout=5, take=lambda buf: got.append(buf[0]), keep=lambda: len(got) < 3
            )
        )
        for i in range(1 if anticipate else 3):
            for _ in range(2000):  # until the reader is parked (again)
                if parked(reader):
                    break
                await asyncio.sleep(0.001)
            assert parked(reader) == 1, f"parked before message {i}"
            assert not waiting.done()
            assert writer.write_chunk_nowait(lambda buf, i=i: buf.__setitem__(0, 70 + i))
            await asyncio.sleep(0.01)  # the ring's callback took it
        assert await asyncio.wait_for(waiting, 2) is True
        assert got == ([70] if anticipate else [70, 71, 72])
        assert parked(reader) == 0
        assert not reader.read_chunk_nowait(lambda buf: pytest.fail("all were taken"))


async def test_wait_readable_keep_hands_back_to_the_task_when_messages_come_close() -> None:
    """Two chunks published back to back while the reader is parked: the
    callback takes both, and the second, close behind the first, ends the
    wait even though ``keep()`` says go on: close messages are the task's to
    spin for (a wake-up per message would be slower)."""
    # "Close" is within 4x the base spin: 100 ms here, so that a loaded box
    # cannot stretch the two takes of one callback that far apart.
    backoff = Backoff(spin_seconds=0.025, initial_sleep=30.0, max_sleep=30.0)
    async with ring_of(n_reader=1, chunk=256, chunks=2, backoff=backoff, anticipate=False) as (
        writer,
        (reader,),
    ):
        got: list[int] = []
        waiting = asyncio.ensure_future(
            reader.wait_readable(timeout=5, take=lambda buf: got.append(buf[0]), keep=lambda: True)
        )
        for _ in range(2000):
            if parked(reader):
                break
            await asyncio.sleep(0.001)
        assert parked(reader) == 1
        await asyncio.sleep(0.15)  # the first message comes long after the park
        assert writer.write_chunk_nowait(lambda buf: buf.__setitem__(0, 1))
        assert writer.write_chunk_nowait(lambda buf: buf.__setitem__(0, 2))
        assert await asyncio.wait_for(waiting, 2) is True
        assert got == [1, 2]
        assert reader._backoff.spin_seconds > 0, "the task spins for the next one"
