"""Small frames queued behind each other share a ring chunk (shm transport).

With a few 2 MiB chunks, one frame per chunk kept four 4 KiB messages in
flight and cost a chunk hand-off per message: 4 KiB streaming ran at 0.4x
the tcp transport. A backlog is now packed; a lone message still goes alone.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import torch
from transport_conformance import (
    assert_all_same,
    opened,
    pipe_factory,
    random_tensor,
    together,
)

from aiokvpipe import PipeConfig
from aiokvpipe.errors import MalformedFrameError
from aiokvpipe.pipe import Pipe
from aiokvpipe.shm import ShmRingBuffer, ShmRingBufferIO
from aiokvpipe.tensors import header_for
from aiokvpipe.transport._shm_recv import ShmRecvChannel
from aiokvpipe.transport._shm_setup import (
    HEADER_SLOT,
    encode_handle,
    recv_control,
    ring_geometry,
    send_control,
)
from aiokvpipe.transport.shm import ShmTransport
from aiokvpipe.transport.testing import link_pair
from aiokvpipe.wire import HEADER_SIZE, FrameHeader, FrameKind, message_charge

KiB = 1 << 10


def chunks_published(pipe: Pipe) -> int:
    return int(pipe._sender._io._seq) - 1  # type: ignore[attr-defined]


def mixed_items(n: int, seed: int) -> list[torch.Tensor | None]:
    rng = random.Random(seed)
    kinds = [
        lambda: None,
        lambda: random_tensor(torch.float32, (1024,), rng),  # 4 KiB
        lambda: random_tensor(torch.int64, (1,), rng),
        lambda: torch.empty(0, 3, dtype=torch.bfloat16),
        lambda: random_tensor(torch.bool, (7, 3), rng),
        lambda: random_tensor(torch.uint8, (rng.randrange(1, 9000),), rng),
    ]
    return [rng.choice(kinds)() for _ in range(n)]


@pytest.mark.timeout(30)
async def test_a_backlog_of_small_messages_shares_chunks_and_arrives_in_order() -> None:
    items = mixed_items(600, seed=1)
    async with opened(pipe_factory("shm")) as (a, b):
        before = chunks_published(a)
        transfers = [await a.send(item) for item in items]  # the ring fills: a backlog
        got = [await b.recv() for _ in items]
        for t in transfers:
            await t
        assert_all_same(got, items)
        chunks = chunks_published(a) - before
        assert chunks < len(items) // 20, f"{len(items)} messages took {chunks} chunks"
        # The pipe goes on as before: a large message after the packed ones.
        big = torch.arange(3 << 20, dtype=torch.uint8)
        await a.send(big)
        assert_all_same([await b.recv()], [big])


@pytest.mark.timeout(30)
async def test_a_lone_message_still_goes_alone() -> None:
    async with opened(pipe_factory("shm")) as (a, b):
        for i in range(20):
            before = chunks_published(a)
            item = torch.full((1024,), float(i))
            await a.send(item)
            assert_all_same([await b.recv()], [item])
            assert chunks_published(a) - before == 1


@pytest.mark.timeout(30)
async def test_a_packed_chunk_the_queue_cannot_hold_is_taken_in_parts() -> None:
    """A slow consumer: the receiver's queue sits at its window, the ring fills,
    and the sender's backlog is packed. Each packed chunk holds more than the
    queue has room for, so the receiver takes it frame by frame as ``recv``
    makes room, never queueing more than its window (plus one message)."""
    window = 64 * KiB
    items: list[torch.Tensor | None] = [torch.full((256,), float(i)) for i in range(600)]
    charge = message_charge(1024)
    async with opened(pipe_factory("shm"), buffer_bytes=window) as (a, b):
        before = chunks_published(a)

        async def send_all() -> None:
            for item in items:
                await a.send(item)
            await a.flush()

        async def slow_consumer() -> list[torch.Tensor | None]:
            await asyncio.sleep(0.1)  # everything that fits is in flight by now
            got = []
            for _ in items:
                queued = b._receiver._queued_bytes  # type: ignore[attr-defined]
                assert queued < window + charge, f"{queued} bytes queued, window {window}"
                got.append(await b.recv())
            return got

        got = (await together(send_all(), slow_consumer()))[1]
        assert_all_same(got, items)
        chunks = chunks_published(a) - before
        assert chunks < len(items) // 4, f"{len(items)} messages took {chunks} chunks"


# --------------------------------------------------------------------- a lying sender


@asynccontextmanager
async def hand_played_sender() -> AsyncIterator[tuple[ShmRingBufferIO, ShmRecvChannel]]:
    """A real receiving channel whose sender is this test, writing chunks by hand."""
    config = PipeConfig(rank=0, connect_timeout=10.0)
    send_link, recv_link = link_pair(config)
    piece, chunks = ring_geometry(config.buffer_bytes)
    io = ShmRingBufferIO(ShmRingBuffer(1, piece + HEADER_SLOT, chunks), -1, owns_buffer=True)
    try:
        await send_control(send_link.sock, {"ring": encode_handle(io.export_handle())}, "t")
        channel = await ShmTransport.open_receiver(recv_link)
        assert (await recv_control(send_link.sock, "t"))["attached"] is True
        assert isinstance(channel, ShmRecvChannel)
        try:
            yield io, channel
        finally:
            await channel.aclose()
    finally:
        io.close()
        send_link.sock.close()
        recv_link.sock.close()


def record(buf: memoryview, pos: int, header: FrameHeader, payload: bytes = b"") -> int:
    buf[pos : pos + HEADER_SIZE] = header.encode()
    buf[pos + HEADER_SLOT : pos + HEADER_SLOT + len(payload)] = payload
    return -(-(pos + HEADER_SLOT + len(payload)) // 64) * 64


@pytest.mark.timeout(15)
async def test_a_packed_frame_that_overruns_its_chunk_is_a_malformed_frame() -> None:
    first = torch.arange(4, dtype=torch.int32)
    async with hand_played_sender() as (io, channel):

        def fill(buf: memoryview) -> None:
            pos = record(buf, 0, header_for(0, first), first.numpy().tobytes())
            # A second frame claiming more payload than the chunk has left.
            record(buf, pos, FrameHeader(FrameKind.TENSOR, 1, torch.uint8, (len(buf),), len(buf)))

        assert io.write_chunk_nowait(fill)
        assert_all_same([await channel.recv()], [first])  # the frame before the lie
        with pytest.raises(MalformedFrameError, match="overruns its chunk"):
            await channel.recv()


@pytest.mark.timeout(30)
async def test_stale_frames_of_a_reused_chunk_are_never_read() -> None:
    """A chunk that held a packed backlog is later reused for one frame: the
    frames after it are stale (old sequence numbers), hidden by the end mark."""
    async with opened(pipe_factory("shm")) as (a, b):
        backlog = mixed_items(300, seed=2)
        transfers = [await a.send(item) for item in backlog]
        assert_all_same([await b.recv() for _ in backlog], backlog)
        for t in transfers:
            await t
        chunks = a._sender._io.buffer.max_chunks  # type: ignore[attr-defined]
        for i in range(3 * chunks):  # around the ring, one small frame a chunk
            item = torch.full((16,), float(i))
            await a.send(item)
            assert_all_same([await b.recv()], [item])
