"""Conformance suite every Pipe transport must pass.

In the style of trio's ``testing/_check_streams.py``: each ``check_*`` is a
plain coroutine function taking ``make_pipes``, an async factory
``make_pipes(world_size=2, **config_overrides) -> list[Pipe]`` that returns
connected Pipes for ranks ``0..world_size-1`` over one transport. A transport's
test module runs ``CHECKS`` for every name in ``TRANSPORTS``; a new backend
gets the whole suite by adding its name to ``TRANSPORTS``.

Also holds the small helpers the Pipe test modules share (opening pipes,
running coroutines together, comparing tensors bit for bit).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
import torch
from conftest import free_port

from aiokvpipe import PipeConfig, UnsupportedTensorError
from aiokvpipe.pipe import Pipe, Transfer
from aiokvpipe.wire import DTYPE_CODES, MAX_DIMS

# The one place that lists the transports the conformance suite runs against.
TRANSPORTS = ["tcp", "shm"]

MakePipes = Callable[..., Awaitable[list[Pipe]]]


# --------------------------------------------------------------------- helpers


def pipe_factory(transport: str) -> MakePipes:
    """``make_pipes`` for ``transport``: every rank in this process, on 127.0.0.1."""

    async def make_pipes(world_size: int = 2, **overrides: Any) -> list[Pipe]:
        port = free_port()
        overrides.setdefault("connect_timeout", 10.0)
        configs = [
            PipeConfig(rank=r, world_size=world_size, port=port, transport=transport, **overrides)  # type: ignore[arg-type]
            for r in range(world_size)
        ]
        results = await asyncio.gather(*(Pipe.connect(c) for c in configs), return_exceptions=True)
        pipes = [r for r in results if isinstance(r, Pipe)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await close_all(pipes)
            raise errors[0]
        return pipes

    return make_pipes


async def close_all(pipes: Sequence[Pipe]) -> None:
    """Close every pipe even if one fails; re-raise the first failure."""
    results = []
    for pipe in pipes:
        try:
            await pipe.aclose()
        except BaseException as exc:
            results.append(exc)
    if results:
        raise results[0]


@contextlib.asynccontextmanager
async def opened(
    make_pipes: MakePipes, world_size: int = 2, **overrides: Any
) -> AsyncIterator[list[Pipe]]:
    pipes = await make_pipes(world_size, **overrides)
    try:
        yield pipes
    finally:
        await close_all(pipes)


async def together(*aws: Awaitable[Any]) -> list[Any]:
    """Run concurrently; if one fails, cancel and reap the rest (no leaked tasks)."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def send_all(pipe: Pipe, items: Sequence[torch.Tensor | None]) -> list[Transfer]:
    transfers = [await pipe.send(item) for item in items]
    await pipe.flush()
    return transfers


async def recv_n(pipe: Pipe, n: int) -> list[torch.Tensor | None]:
    return [await pipe.recv() for _ in range(n)]


async def exchange(
    sender: Pipe, receiver: Pipe, items: Sequence[torch.Tensor | None]
) -> list[torch.Tensor | None]:
    """Send ``items`` while the receiver reads them; return what arrived."""
    _, got = await together(send_all(sender, items), recv_n(receiver, len(items)))
    return list(got)


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's values as uint8, in logical (row-major) order."""
    t = tensor.detach().resolve_conj().resolve_neg().contiguous()
    return t.reshape(-1).view(torch.uint8)


def assert_same(got: torch.Tensor | None, expected: torch.Tensor | None, where: str = "") -> None:
    """``got`` is what ``expected`` should arrive as: dense CPU, same dtype/shape, same bits."""
    if expected is None:
        assert got is None, f"{where}: expected None, got {got!r}"
        return
    assert isinstance(got, torch.Tensor), f"{where}: expected a tensor, got {got!r}"
    assert got.dtype == expected.dtype, where
    assert tuple(got.shape) == tuple(expected.shape), where
    assert got.device.type == "cpu", where
    assert got.is_contiguous(), where
    assert not got.is_conj() and not got.is_neg(), where
    assert not got.requires_grad, where
    assert torch.equal(raw_bytes(got), raw_bytes(expected)), f"{where}: payload differs"


def assert_all_same(
    got: Sequence[torch.Tensor | None], expected: Sequence[torch.Tensor | None]
) -> None:
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert_same(g, e, f"message {i}")


def random_tensor(dtype: torch.dtype, shape: Sequence[int], rng: random.Random) -> torch.Tensor:
    """Random bits of ``dtype`` (NaNs, denormals and all), from random uint8 bytes."""
    shape = tuple(shape)
    k = dtype.itemsize
    nbytes = k
    for d in shape:
        nbytes *= d
    gen = torch.Generator().manual_seed(rng.getrandbits(63))
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def tagged(i: int, n: int = 4) -> torch.Tensor:
    return torch.full((n,), i, dtype=torch.int64)


# --------------------------------------------------------------------- the checks


async def check_order_both_directions(make_pipes: MakePipes) -> None:
    """Hundreds of tensors of varied sizes arrive in order, both ways at once."""
    rng = random.Random(1)
    fwd = [torch.arange(rng.randrange(1, 5000), dtype=torch.int32) + i for i in range(300)]
    back = [tagged(-i, rng.randrange(1, 64)) for i in range(300)]
    async with opened(make_pipes) as (a, b):
        got_fwd, got_back = await together(exchange(a, b, fwd), exchange(b, a, back))
        assert_all_same(got_fwd, fwd)
        assert_all_same(got_back, back)
        assert a.pending_bytes == 0 and b.pending_bytes == 0
        assert a.bytes_sent == sum(t.numel() * 4 for t in fwd) == b.bytes_received


async def check_none_messages(make_pipes: MakePipes) -> None:
    items: list[torch.Tensor | None] = []
    for i in range(50):
        items += [None, tagged(i)] if i % 3 else [None, None]
    async with opened(make_pipes) as (a, b):
        assert_all_same(await exchange(a, b, items), items)
        transfer = await a.send(None)
        assert transfer.nbytes == 0
        await transfer
        assert await b.recv() is None


async def check_every_dtype_bit_exact(make_pipes: MakePipes) -> None:
    """Every dtype of the wire table round-trips its exact bits (contiguous or not)."""
    rng = random.Random(2)
    items: list[torch.Tensor | None] = []
    for dtype in DTYPE_CODES:
        t = random_tensor(dtype, (5, 7), rng)
        items += [t, t.t(), t[::2, 1::3], t[3, 4], t[:0]]
    async with opened(make_pipes) as (a, b):
        got = await exchange(a, b, items)
    assert_all_same(got, items)
    assert [g.dtype for g in got if g is not None] == [i.dtype for i in items if i is not None]


async def check_tensor_shapes_and_views(make_pipes: MakePipes) -> None:
    """0-dim, empty, non-contiguous, conj/neg bits, expanded, requires_grad."""
    rng = random.Random(3)
    base = random_tensor(torch.float32, (6, 8, 4), rng)
    cplx = torch.randn(5, 3, dtype=torch.complex64)
    conj = cplx.conj()
    neg = cplx.conj().imag  # a view with the neg bit
    assert conj.is_conj() and neg.is_neg()
    grad = torch.randn(3, 4, requires_grad=True)
    items: list[torch.Tensor | None] = [
        torch.tensor(3.5),
        torch.tensor(7, dtype=torch.int64),
        torch.empty(0),
        torch.empty(3, 0, 5, dtype=torch.float16),
        torch.empty(0, 2**62, 1, dtype=torch.int8),  # huge dim, no bytes
        base.transpose(0, 2),
        base[::2, 1::3],
        base.permute(2, 0, 1)[1],
        base[0, :1].expand(9, 4),  # stride 0
        conj,
        conj.t(),
        neg,
        torch.randn(4, 4, dtype=torch.complex128).conj().t(),
        grad,
        grad * 2,
    ]
    async with opened(make_pipes) as (a, b):
        got = await exchange(a, b, items)
    assert_all_same(got, items)
    assert torch.equal(got[9], conj.resolve_conj())  # type: ignore[arg-type]
    assert torch.equal(got[11], neg.resolve_neg())  # type: ignore[arg-type]
    assert torch.equal(got[13], grad.detach())  # type: ignore[arg-type]


async def check_max_dims(make_pipes: MakePipes) -> None:
    """14 dims pass; 15 are refused before anything is written, and the pipe goes on."""
    ok = torch.arange(2 * 3 * 4, dtype=torch.int16).reshape((1,) * (MAX_DIMS - 3) + (2, 3, 4))
    assert ok.dim() == MAX_DIMS
    too_many = torch.zeros((1,) * (MAX_DIMS + 1))
    async with opened(make_pipes) as (a, b):
        await a.send(ok)
        with pytest.raises(UnsupportedTensorError, match="15 dims"):
            await a.send(too_many)
        with pytest.raises(UnsupportedTensorError):
            await a.send(too_many.transpose(0, 14))
        transfer = await a.send(tagged(1))
        assert transfer.seq == 1  # the refused tensors took no sequence number
        assert_same(await b.recv(), ok)
        assert_same(await b.recv(), tagged(1))


async def check_large_tensor(make_pipes: MakePipes) -> None:
    """A 64 MiB tensor (and a few odd-sized big ones) arrive intact."""
    gen = torch.Generator().manual_seed(4)
    big = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, generator=gen)
    odd = torch.randint(0, 256, ((3 << 20) + 7,), dtype=torch.uint8, generator=gen).view(torch.int8)
    items: list[torch.Tensor | None] = [
        tagged(0),
        big,
        odd,
        big[: 16 << 20].view(-1, 16)[:, 1:15],
        tagged(1),
    ]
    async with opened(make_pipes) as (a, b):
        got = await exchange(a, b, items)
        assert_all_same(got, items)
        assert b.bytes_received == sum(t.numel() * t.element_size() for t in items if t is not None)


async def check_many_small_messages(make_pipes: MakePipes) -> None:
    n = 3000
    items: list[torch.Tensor | None] = [
        torch.tensor([i], dtype=torch.int32) if i % 5 else None for i in range(n)
    ]
    async with opened(make_pipes) as (a, b):
        got = await exchange(a, b, items)
    assert [None if g is None else int(g[0]) for g in got] == [
        None if t is None else int(t[0]) for t in items
    ]
    assert all(g is None or (g.dtype == torch.int32 and g.shape == (1,)) for g in got)


async def check_concurrent_senders_and_receivers(make_pipes: MakePipes) -> None:
    """Many tasks send and many receive on one pipe: nothing lost, each task's order kept."""
    n_senders, n_receivers, per_sender = 6, 4, 80
    total = n_senders * per_sender
    received: dict[int, list[tuple[int, int]]] = {r: [] for r in range(n_receivers)}

    async with opened(make_pipes, buffer_bytes=4096) as (a, b):

        async def produce(s: int) -> None:
            for i in range(per_sender):
                await a.send(torch.tensor([s, i] * (1 + (i % 50)), dtype=torch.int64))
                if i % 7 == 0:
                    await asyncio.sleep(0)

        count = 0

        async def consume(r: int) -> None:
            nonlocal count
            while count < total:
                count += 1
                t = await b.recv()
                assert t is not None
                received[r].append((int(t[0]), int(t[1])))

        await together(
            *(produce(s) for s in range(n_senders)), *(consume(r) for r in range(n_receivers))
        )
        await a.flush()
    everything = sorted(x for r in received.values() for x in r)
    assert everything == sorted((s, i) for s in range(n_senders) for i in range(per_sender))
    for per_receiver in received.values():
        for s in range(n_senders):
            seq = [i for (s2, i) in per_receiver if s2 == s]
            assert seq == sorted(seq), "a sender's messages arrived out of order"


async def check_transfer_awaiting(make_pipes: MakePipes) -> None:
    async with opened(make_pipes) as (a, b):
        small = await a.send(tagged(7))
        await asyncio.wait_for(small, 5)  # handed over without the receiver reading
        assert small.done() and small.seq == 0 and small.nbytes == 32
        assert "done" in repr(small)
        await small  # awaiting again is fine
        big = torch.ones(8 << 20, dtype=torch.uint8)
        transfers = [await a.send(big), await a.send(None), await a.send(tagged(8))]
        assert [t.seq for t in transfers] == [1, 2, 3]
        assert [t.nbytes for t in transfers] == [8 << 20, 0, 32]
        got = await recv_n(b, 4)
        await asyncio.gather(*transfers)
        assert all(t.done() for t in transfers)
        assert_all_same(got, [tagged(7), big, None, tagged(8)])


async def check_flush(make_pipes: MakePipes) -> None:
    async with opened(make_pipes) as (a, b):
        await a.flush()  # nothing pending: returns at once
        chunk = torch.ones(1 << 20, dtype=torch.uint8)
        reader = asyncio.ensure_future(recv_n(b, 20))
        try:
            transfers = [await a.send(chunk) for _ in range(20)]
            await asyncio.wait_for(a.flush(), 10)
            assert all(t.done() for t in transfers)
            assert a.pending_bytes == 0
            assert len(await reader) == 20
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def check_ring_of_three(make_pipes: MakePipes) -> None:
    """world_size=3: each rank sends to the next and receives from the previous."""
    async with opened(make_pipes, world_size=3) as pipes:

        async def run(rank: int) -> list[torch.Tensor | None]:
            pipe = pipes[rank]
            items = [torch.tensor([rank, i]) for i in range(40)]
            _, got = await together(send_all(pipe, items), recv_n(pipe, len(items)))
            return list(got)

        results = await together(*(run(r) for r in range(3)))
    for rank, got in enumerate(results):
        prev = (rank - 1) % 3
        assert_all_same(got, [torch.tensor([prev, i]) for i in range(40)])


CHECKS: list[Callable[[MakePipes], Awaitable[None]]] = [
    check_order_both_directions,
    check_none_messages,
    check_every_dtype_bit_exact,
    check_tensor_shapes_and_views,
    check_max_dims,
    check_large_tensor,
    check_many_small_messages,
    check_concurrent_senders_and_receivers,
    check_transfer_awaiting,
    check_flush,
    check_ring_of_three,
]
