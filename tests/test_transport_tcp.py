"""The transport conformance suite for every CPU transport in ``TRANSPORTS``,
plus TCP-specific behaviour."""

from __future__ import annotations

import asyncio
import errno
import random
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch
from transport_conformance import (
    CHECKS,
    TRANSPORTS,
    MakePipes,
    assert_all_same,
    assert_same,
    opened,
    pipe_factory,
    random_tensor,
    recv_n,
    tagged,
    together,
)

from aiokvpipe import rendezvous
from aiokvpipe.pipe import Pipe
from aiokvpipe.wire import HEADER_SIZE


@pytest.mark.timeout(30)
@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_") for c in CHECKS])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_conformance(transport: str, check: Callable[[MakePipes], Awaitable[None]]) -> None:
    await check(pipe_factory(transport))


@pytest.mark.timeout(10)
async def test_auto_picks_tcp_for_cpu_across_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks that cannot share memory (another host identity each) talk TCP."""
    hosts = iter(range(1000))
    monkeypatch.setattr(rendezvous, "host_identity", lambda: f"host-{next(hosts)}")
    async with opened(pipe_factory("auto")) as (a, b):
        assert (a.send_transport, a.recv_transport) == ("tcp", "tcp")
        assert (b.send_transport, b.recv_transport) == ("tcp", "tcp")
        assert "send=tcp->1" in repr(a) and "open" in repr(a)
        await a.send(tagged(1))
        assert_all_same([await b.recv()], [tagged(1)])
    assert "closed" in repr(a)


@pytest.mark.timeout(20)
async def test_receiver_queue_is_bounded_and_pushes_back() -> None:
    """A receiver that does not read stops reading the socket at ``buffer_bytes``:
    the sender's transfers stall instead of piling up in the receiver's memory."""
    chunk_bytes, n = 1 << 20, 96
    async with opened(pipe_factory("tcp"), buffer_bytes=chunk_bytes) as (a, b):
        transfers = []
        for i in range(n):
            t = torch.full((chunk_bytes // 8,), i, dtype=torch.int64)
            try:
                transfers.append(await a.send(t, timeout=0.5))
            except TimeoutError:
                break
        await asyncio.sleep(0.1)
        finished = sum(t.done() for t in transfers)
        # kernel buffers on loopback hold a few MiB; 96 MiB must not all have left
        assert finished < n, "receiver buffered everything: no backpressure"
        got = await asyncio.wait_for(recv_n(b, len(transfers)), 10)
        assert [int(g[0]) for g in got if g is not None] == list(range(len(transfers)))
        await asyncio.wait_for(a.flush(), 5)


# --------------------------------------------------------------------- the direct send path


def queue_empty(pipe: Pipe) -> bool:
    """Nothing queued on the TCP sender: the next send goes straight to sendmsg."""
    ch = pipe._sender
    return not (ch._pending or ch._segments or ch._writer_registered)  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
async def test_tensor_larger_than_the_socket_buffer_sent_with_nothing_queued() -> None:
    """64 MiB sent when nothing is queued: sendmsg takes a part, the pump the rest;
    it arrives intact, and the next small send leaves whole at once."""
    big = random_tensor(torch.uint8, (64 << 20,), random.Random(5))
    async with opened(pipe_factory("tcp")) as (a, b):
        assert queue_empty(a)
        transfer = await a.send(big)
        got = await asyncio.wait_for(b.recv(), 30)
        await asyncio.wait_for(transfer, 10)  # type: ignore[arg-type]
        assert_same(got, big)
        assert queue_empty(a) and a.pending_bytes == 0
        small = await a.send(tagged(1))
        assert small.done(), "a small send with nothing queued is written synchronously"
        await small
        assert_same(await asyncio.wait_for(b.recv(), 5), tagged(1))


@pytest.mark.timeout(60)
async def test_small_and_large_tensors_keep_their_order() -> None:
    """Small tensors, None, empty tensors and 1-9 MiB tensors, some sent with
    nothing queued (direct path) and some behind a large one (queued path):
    all arrive in order, bit for bit."""
    rng = random.Random(9)
    items: list[torch.Tensor | None] = []
    for i in range(60):
        kind = i % 6
        if kind == 0:
            items.append(random_tensor(torch.uint8, (rng.randrange(1 << 20, 9 << 20),), rng))
        elif kind == 1:
            items.append(None)
        elif kind == 2:
            items.append(torch.empty(0, 3, dtype=torch.float32))
        else:
            dtype = rng.choice([torch.float32, torch.int16, torch.float64, torch.bfloat16])
            items.append(random_tensor(dtype, (rng.randrange(1, 300),), rng))
    async with opened(pipe_factory("tcp")) as (a, b):
        direct = 0

        async def sender() -> None:
            nonlocal direct
            for i, item in enumerate(items):
                direct += queue_empty(a)
                await a.send(item)
                if i % 7 == 6:
                    await a.flush()
            await a.flush()

        _, got = await together(sender(), recv_n(b, len(items)))
        assert_all_same(got, items)
        assert direct >= 60 // 7, "flushes leave nothing queued"
        assert a.pending_bytes == 0 and a.bytes_sent == b.bytes_received


class StingySocket:
    """The sender's real socket, except that each send call takes at most the
    next number of bytes in ``plan`` (``0``: EAGAIN; ``None`` or an empty plan:
    what the kernel takes). The bytes taken really go out on the socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.real = sock
        self.plan: deque[int | None] = deque()

    def _limited(self, buffers: list[memoryview]) -> list[memoryview]:
        limit = self.plan.popleft() if self.plan else None
        if limit is None:
            return buffers
        if limit == 0:
            raise BlockingIOError(errno.EAGAIN, "stingy")
        out = []
        for buf in buffers:
            if limit <= 0:
                break
            out.append(buf[:limit])
            limit -= len(out[-1])
        return out

    def sendmsg(self, buffers: list[memoryview]) -> int:
        return self.real.sendmsg(self._limited([memoryview(b) for b in buffers]))

    def send(self, data: memoryview) -> int:
        return self.real.sendmsg(self._limited([memoryview(data)]))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.mark.timeout(30)
async def test_direct_send_partial_writes_are_completed_by_the_pump() -> None:
    """Every way the first sendmsg of the direct path can fall short: part of
    the header, exactly the header, part of the payload, nothing (EAGAIN, once
    and twice), for tensors, None and empty tensors, and a tensor above one
    send slice: the rest goes out through the pump, the stream stays intact."""
    t = torch.arange(250, dtype=torch.int32)  # 1000 payload bytes
    cases: list[tuple[str, torch.Tensor | None, list[int | None]]] = [
        ("part of the header", t, [10]),
        ("exactly the header", t, [HEADER_SIZE]),
        ("part of the payload", t, [HEADER_SIZE + 100]),
        ("EAGAIN", t, [0]),
        ("EAGAIN twice (writer callback)", t, [0, 0]),
        ("header byte by byte", t, [1, 1, 1, 1]),
        ("None, part of the header", None, [5]),
        ("None, EAGAIN", None, [0]),
        ("empty tensor, part of the header", torch.empty(0, dtype=torch.int64), [3]),
        ("above one send slice", random_tensor(torch.uint8, (3 << 20,), random.Random(4)), []),
        ("above one send slice, part of the header", torch.ones(3 << 20, dtype=torch.uint8), [7]),
        ("whole", t + 1, [None]),
    ]
    async with opened(pipe_factory("tcp")) as (a, b):
        channel: Any = a._sender
        real = channel._sock
        stingy = StingySocket(real)
        channel._sock = stingy
        try:
            for name, item, plan in cases:
                assert queue_empty(a), name
                stingy.plan.extend(plan)
                transfer = await a.send(item)
                # send itself made the first call: the direct path was taken
                assert len(stingy.plan) < len(plan) or not plan, name
                got = await asyncio.wait_for(b.recv(), 10)
                await asyncio.wait_for(transfer, 10)  # type: ignore[arg-type]
                assert not stingy.plan, name
                assert_same(got, item, name)
                await asyncio.wait_for(a.flush(), 10)
        finally:
            channel._sock = real  # the goodbye goes through the loop's sock_sendall
        assert a.bytes_sent == b.bytes_received
