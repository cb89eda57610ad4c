"""The transport conformance suite for every CPU transport in ``TRANSPORTS``,
plus TCP-specific behaviour."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import torch
from transport_conformance import (
    CHECKS,
    TRANSPORTS,
    MakePipes,
    assert_all_same,
    opened,
    pipe_factory,
    recv_n,
    tagged,
)

from aiokvpipe import rendezvous


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
