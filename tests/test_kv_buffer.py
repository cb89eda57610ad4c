"""KVLookupBuffer over real pipes on 127.0.0.1 (both loops, via conftest).

Pairs live in one process (two rendezvous on consecutive ports); the one
test that needs a peer to die runs the producer as a child process and kills
it with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import IO

import pytest
import torch
from forked import Forked

from aiokvpipe import (
    ConfigError,
    FrameTooLargeError,
    KVBufferError,
    KVLookupBuffer,
    PeerClosedError,
    Pipe,
    PipeClosedError,
    PipeConfig,
    ProtocolError,
    TransferTimeout,
)
from aiokvpipe.kv_buffer import Role
from aiokvpipe.ports import free_port

TIMEOUT = 10.0  # no single step below comes near this


def free_port_pair() -> int:
    """A port ``p`` with ``p`` and ``p + 1`` free (signal and data rendezvous)."""
    return free_port(count=2)


@contextlib.asynccontextmanager
async def kv_pair(
    buffer_bytes: int = 1 << 20,
) -> AsyncIterator[tuple[KVLookupBuffer, KVLookupBuffer]]:
    port = free_port_pair()
    async with contextlib.AsyncExitStack() as opened:

        async def connect(role: Role, **kwargs: int) -> KVLookupBuffer:
            buf = await KVLookupBuffer.connect(role, port=port, **kwargs)
            opened.push_async_callback(buf.aclose)
            return buf

        # A TaskGroup, not gather: when one side fails the other is cancelled
        # and closed here, instead of leaking its sockets into later tests.
        async with asyncio.timeout(TIMEOUT), asyncio.TaskGroup() as tg:
            producer = tg.create_task(connect("producer", buffer_bytes=buffer_bytes))
            consumer = tg.create_task(connect("consumer"))
        yield producer.result(), consumer.result()


@contextlib.asynccontextmanager
async def buffer_against_raw_pipes(
    rank: int = 1,
) -> AsyncIterator[tuple[KVLookupBuffer, Pipe, Pipe]]:
    """A buffer whose peer is two bare pipes: the test plays the peer by hand."""
    port = free_port_pair()
    async with contextlib.AsyncExitStack() as opened:

        async def pipes(r: int) -> tuple[Pipe, Pipe]:
            cfg = PipeConfig(rank=r, port=port, connect_timeout=TIMEOUT)
            signal = await Pipe.connect(cfg)
            opened.push_async_callback(signal.aclose)
            data = await Pipe.connect(cfg.with_changes(port=port + 1))
            opened.push_async_callback(data.aclose)
            return signal, data

        async with asyncio.TaskGroup() as tg:
            mine = tg.create_task(pipes(rank))
            theirs = tg.create_task(pipes(1 - rank))
        buf = KVLookupBuffer(*mine.result(), 1 << 20)
        opened.push_async_callback(buf.aclose)
        yield buf, *theirs.result()


def make_entry(
    seed: int, n_tokens: int = 16, dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct tokens and KV per ``seed``; random bits, so any corruption shows."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 32000, (n_tokens,), generator=gen) + seed * 100_000
    roi = torch.ones(n_tokens, dtype=torch.bool)
    key = torch.randn(2, n_tokens, 4, 8, generator=gen).to(dtype)
    value = torch.randn(2, n_tokens, 4, 8, generator=gen).to(dtype)
    hidden = torch.randn(n_tokens, 32, generator=gen).to(dtype)
    return tokens, roi, key, value, hidden


def entry_bytes(entry: tuple[torch.Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in entry)


def assert_bit_exact(got: list[torch.Tensor | None], want: tuple[torch.Tensor, ...]) -> None:
    assert len(got) == 5
    for name, g, w in zip(("tokens", "roi", "key", "value", "hidden"), got, want, strict=True):
        assert g is not None, name
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert g.contiguous().view(torch.uint8).equal(w.contiguous().view(torch.uint8)), name


async def test_insert_then_drop_select_returns_the_exact_tensors_and_removes_the_entry() -> None:
    async with kv_pair() as (producer, consumer):
        entry = make_entry(1, dtype=torch.bfloat16)
        await producer.insert(*entry)
        assert len(producer) == 1
        assert producer.buffered_bytes == entry_bytes(entry)

        got = await consumer.drop_select(entry[0], entry[1], timeout=TIMEOUT)
        assert_bit_exact(got, entry)
        assert len(producer) == 0
        assert await consumer.drop_select(entry[0], timeout=TIMEOUT) == [None] * 5
        stats = producer.stats
        assert (stats.inserted, stats.served_hits, stats.served_misses) == (1, 1, 1)
        assert stats.buffered_bytes == 0 and stats.entries == 0
        assert consumer.stats.pending_requests == 0


async def test_unknown_tokens_get_nones_promptly_and_leave_the_buffer_alone() -> None:
    async with kv_pair() as (producer, consumer):
        # Before the producer ever inserted: still answered.
        start = time.perf_counter()
        assert await consumer.drop_select(torch.arange(5), timeout=TIMEOUT) == [None] * 5
        entry = make_entry(2)
        await producer.insert(*entry)
        assert await consumer.drop_select(torch.arange(7), timeout=TIMEOUT) == [None] * 5
        assert time.perf_counter() - start < 2.0
        assert len(producer) == 1
        assert_bit_exact(await consumer.drop_select(entry[0], timeout=TIMEOUT), entry)


async def test_concurrent_drop_selects_each_get_their_own_answer() -> None:
    async with kv_pair(buffer_bytes=64 << 20) as (producer, consumer):
        entries = [make_entry(seed, n_tokens=8 + seed % 5) for seed in range(24)]
        for entry in entries:
            await producer.insert(*entry)
        # Issue them in a scrambled order, with misses in between.
        order = list(range(24))[::-1]
        order = order[::2] + order[1::2]
        misses = [torch.arange(3) + 7_000_000 + i for i in range(6)]
        queries = [entries[i][0] for i in order] + misses
        results = await asyncio.wait_for(
            asyncio.gather(*(consumer.drop_select(q) for q in queries)), TIMEOUT
        )
        for i, got in zip(order, results, strict=False):
            assert_bit_exact(got, entries[i])
        assert all(r == [None] * 5 for r in results[len(order) :])
        assert len(producer) == 0 and producer.buffered_bytes == 0


async def test_insert_waits_while_the_buffer_is_full_and_resumes_when_room_is_freed() -> None:
    first, second = make_entry(3), make_entry(4)
    async with kv_pair(buffer_bytes=entry_bytes(first) + 16) as (producer, consumer):
        await producer.insert(*first)
        blocked = asyncio.ensure_future(producer.insert(*second))
        done, _ = await asyncio.wait({blocked}, timeout=0.3)
        assert not done, "insert should wait while the buffer is full"
        assert len(producer) == 1 and producer.buffered_bytes == entry_bytes(first)

        freed_at = time.perf_counter()
        assert_bit_exact(await consumer.drop_select(first[0], timeout=TIMEOUT), first)
        await asyncio.wait_for(blocked, TIMEOUT)
        assert time.perf_counter() - freed_at < 2.0  # woken by the release, not a poll
        assert len(producer) == 1 and producer.buffered_bytes == entry_bytes(second)
        assert_bit_exact(await consumer.drop_select(second[0], timeout=TIMEOUT), second)


async def test_insert_timeout_raises_and_holds_nothing() -> None:
    first = make_entry(5)
    async with kv_pair(buffer_bytes=entry_bytes(first)) as (producer, _consumer):
        await producer.insert(*first)
        with pytest.raises(TransferTimeout, match="insert on rank 0"):
            await producer.insert(*make_entry(6), timeout=0.1)
        assert len(producer) == 1 and producer.buffered_bytes == entry_bytes(first)


async def test_wait_drained_returns_once_the_peer_took_everything() -> None:
    async with kv_pair() as (producer, consumer):
        await asyncio.wait_for(producer.wait_drained(), TIMEOUT)  # empty: at once
        first, second = make_entry(14), make_entry(15)
        await producer.insert(*first)
        await producer.insert(*second)
        drained = asyncio.ensure_future(producer.wait_drained(timeout=TIMEOUT))
        await consumer.drop_select(first[0], timeout=TIMEOUT)
        await asyncio.sleep(0.05)
        assert not drained.done(), "one entry is still in the buffer"
        await consumer.drop_select(second[0], timeout=TIMEOUT)
        await asyncio.wait_for(drained, TIMEOUT)
        assert producer.buffered_bytes == 0

        await producer.insert(*make_entry(16))
        with pytest.raises(TransferTimeout, match="wait_drained"):
            await producer.wait_drained(timeout=0.1)
        waiting = asyncio.ensure_future(producer.wait_drained())
        await consumer.aclose()
        with pytest.raises(PeerClosedError):
            await asyncio.wait_for(waiting, TIMEOUT)


async def test_an_entry_larger_than_the_buffer_is_accepted_when_the_buffer_is_empty() -> None:
    big = make_entry(7, n_tokens=64)
    async with kv_pair(buffer_bytes=1024) as (producer, consumer):
        await asyncio.wait_for(producer.insert(*big), TIMEOUT)
        assert producer.buffered_bytes == entry_bytes(big) > 1024
        assert_bit_exact(await consumer.drop_select(big[0], timeout=TIMEOUT), big)


async def test_matching_rule_selected_tokens_must_be_equal() -> None:
    async with kv_pair() as (producer, consumer):
        tokens = torch.tensor([11, 12, 13, 14], dtype=torch.int32)
        roi = torch.tensor([False, True, True, False])
        kv = torch.zeros(2, 4)
        await producer.insert(tokens, roi, kv, kv, None)
        # A prefix of the selected tokens is not a match (no prefix matching).
        assert await consumer.drop_select(torch.tensor([12])) == [None] * 5
        # Different tokens outside the mask, same selected ones: a match; ids
        # compare as values, so int64 queries match int32 entries.
        other = torch.tensor([99, 12, 13, 98])
        got = await consumer.drop_select(other, roi, timeout=TIMEOUT)
        assert got[0] is not None and got[0].equal(tokens) and got[0].dtype == torch.int32
        assert got[1] is not None and got[1].equal(roi)
        assert got[4] is None  # hidden inserted as None comes back as None

        # Same tokens twice: the oldest goes first. drop_select(None): any, oldest.
        for tag in (1.0, 2.0, 3.0):
            tagged = torch.full((2,), tag)
            await producer.insert(torch.tensor([5, 6]), None, tagged, tagged, None)
        first = await consumer.drop_select(torch.tensor([5, 6]), timeout=TIMEOUT)
        assert first[1] is None and first[2] is not None and first[2][0].item() == 1.0
        anything = await consumer.drop_select(None, timeout=TIMEOUT)
        assert anything[2] is not None and anything[2][0].item() == 2.0
        assert len(producer) == 1


@pytest.mark.parametrize(
    ("argument", "change"),
    [
        ("tokens", {"tokens": torch.zeros(4)}),
        ("tokens", {"tokens": torch.zeros(2, 2, dtype=torch.int64)}),
        ("tokens", {"tokens": [1, 2, 3, 4]}),
        ("roi", {"roi": torch.ones(3, dtype=torch.bool)}),
        ("roi", {"roi": torch.ones(4, dtype=torch.int64)}),
        ("key", {"key": "not a tensor"}),
        ("value", {"value": torch.zeros(2, 5, dtype=torch.float16)}),
        ("value", {"value": torch.zeros(2, 4, dtype=torch.float32)}),
        ("hidden", {"hidden": torch.zeros(4, device="meta")}),
    ],
)
async def test_insert_rejects_mismatched_tensors_naming_the_argument(
    argument: str, change: dict[str, object]
) -> None:
    good: dict[str, object] = {
        "tokens": torch.arange(4),
        "roi": torch.ones(4, dtype=torch.bool),
        "key": torch.zeros(2, 4, dtype=torch.float16),
        "value": torch.zeros(2, 4, dtype=torch.float16),
        "hidden": torch.zeros(4, 8, dtype=torch.float16),
    }
    async with buffer_against_raw_pipes(rank=0) as (buf, _signal, _data):
        with pytest.raises(KVBufferError, match=rf"^{argument}: ") as info:
            await buf.insert(**{**good, **change})  # type: ignore[arg-type]
        assert info.value.argument == argument
        assert isinstance(info.value, ValueError)
        assert len(buf) == 0 and buf.buffered_bytes == 0
        with pytest.raises(KVBufferError, match=r"^roi: "):
            await buf.drop_select(torch.arange(4), torch.ones(5, dtype=torch.bool))


async def test_constructor_and_connect_validate_their_arguments() -> None:
    with pytest.raises(ConfigError, match="role"):
        await KVLookupBuffer.connect("decoder", port=1)  # type: ignore[arg-type]
    async with buffer_against_raw_pipes() as (buf, peer_signal, peer_data):
        with pytest.raises(KVBufferError, match=r"^data_pipe: "):
            KVLookupBuffer(peer_signal, peer_signal, 1024)
        with pytest.raises(KVBufferError, match=r"^buffer_bytes: "):
            KVLookupBuffer(peer_signal, peer_data, 0)
        with pytest.raises(KVBufferError, match=r"^signal_pipe: "):
            KVLookupBuffer(buf, peer_data, 1024)  # type: ignore[arg-type]


async def test_peer_closing_while_drop_select_waits_raises_peer_closed() -> None:
    async with buffer_against_raw_pipes() as (buf, peer_signal, peer_data):
        waiting = asyncio.ensure_future(buf.drop_select(torch.arange(3)))
        request = await asyncio.wait_for(peer_signal.recv(), TIMEOUT)  # the peer sees it ...
        assert request is not None and request.dtype == torch.int64
        assert not waiting.done()
        await peer_signal.aclose()  # ... and goes away without answering
        await peer_data.aclose()
        start = time.perf_counter()
        with pytest.raises(PeerClosedError):
            await asyncio.wait_for(waiting, TIMEOUT)
        assert time.perf_counter() - start < 2.0
        with pytest.raises(PeerClosedError):  # and every later call
            await buf.drop_select(torch.arange(3))
        with pytest.raises(PeerClosedError):
            await buf.insert(torch.arange(2), None, torch.zeros(1), torch.zeros(1), None)


async def test_drop_select_timeout_and_a_peer_speaking_garbage() -> None:
    async with buffer_against_raw_pipes() as (buf, peer_signal, _data):
        with pytest.raises(TransferTimeout, match="drop_select on rank 1"):
            await buf.drop_select(torch.arange(3), timeout=0.1)
        assert buf.stats.pending_requests == 0
        waiting = asyncio.ensure_future(buf.drop_select(None))
        await peer_signal.send(torch.zeros(5))  # float, not a control tensor
        with pytest.raises(ProtocolError, match="control tensor"):
            await asyncio.wait_for(waiting, TIMEOUT)


async def test_closing_the_producer_fails_the_consumer_and_later_calls() -> None:
    async with kv_pair() as (producer, consumer):
        await producer.insert(*make_entry(8))
        await producer.aclose()
        await producer.aclose()  # idempotent
        assert producer.closed
        with pytest.raises(PipeClosedError):
            await producer.insert(*make_entry(9))
        with pytest.raises(PeerClosedError):
            await asyncio.wait_for(consumer.drop_select(torch.arange(3)), TIMEOUT)


async def test_closing_the_consumer_wakes_a_blocked_insert_with_peer_closed() -> None:
    first = make_entry(10)
    async with kv_pair(buffer_bytes=entry_bytes(first)) as (producer, consumer):
        await producer.insert(*first)
        blocked = asyncio.ensure_future(producer.insert(*make_entry(11)))
        await asyncio.sleep(0.05)
        assert not blocked.done()
        await consumer.aclose()
        with pytest.raises(PeerClosedError):
            await asyncio.wait_for(blocked, TIMEOUT)


async def test_aclose_fails_local_waiters_with_pipe_closed() -> None:
    async with buffer_against_raw_pipes() as (buf, peer_signal, _data):
        waiting = asyncio.ensure_future(buf.drop_select(torch.arange(3)))
        await asyncio.wait_for(peer_signal.recv(), TIMEOUT)
        await buf.aclose()
        with pytest.raises(PipeClosedError):
            await waiting
        with pytest.raises(PipeClosedError):
            await buf.drop_select(torch.arange(3))


async def test_a_cancelled_drop_select_keeps_the_stream_in_order() -> None:
    async with kv_pair() as (producer, consumer):
        lost, kept = make_entry(12), make_entry(13)
        await producer.insert(*lost)
        cancelled = asyncio.ensure_future(consumer.drop_select(lost[0]))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await producer.insert(*kept)
        assert_bit_exact(await consumer.drop_select(kept[0], timeout=TIMEOUT), kept)
        # The abandoned request still took its entry (documented); its answer
        # arrived before ours and was dropped without disturbing the stream.
        assert consumer.stats.abandoned_answers == 1
        assert await consumer.drop_select(lost[0], timeout=TIMEOUT) == [None] * 5


PRODUCER = """
import asyncio, sys, time, torch
from aiokvpipe import KVLookupBuffer

async def main(port: int) -> None:
    buf = await KVLookupBuffer.connect("producer", port=port, connect_timeout=30)
    await buf.insert(torch.arange(4), None, torch.ones(2, 4), torch.ones(2, 4), None)
    print("ready", flush=True)
    time.sleep(120)  # wedged: requests go unanswered until the test kills us

asyncio.run(main(int(sys.argv[1])))
"""


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def read_line(stream: IO[bytes], timeout: float) -> bytes:
    """One line from a child's stdout pipe, waiting in the loop (no thread)."""
    loop = asyncio.get_running_loop()
    fd = stream.fileno()
    os.set_blocking(fd, False)
    line = b""
    async with asyncio.timeout(timeout):
        while not line.endswith(b"\n"):
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _set_once, readable)
            try:
                await readable
            finally:
                loop.remove_reader(fd)
            chunk = os.read(fd, 1)
            if not chunk:
                break
            line += chunk
    return line


@pytest.mark.timeout(90)
async def test_producer_killed_while_consumer_waits_raises_peer_closed_promptly() -> None:
    port = free_port_pair()
    # Popen, not asyncio's subprocess API: that one costs a watcher thread on
    # asyncio and keeps a /dev/null fd open on uvloop, both flagged as leaks.
    proc = Forked(
        [sys.executable, "-c", PRODUCER, str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        consumer = await KVLookupBuffer.connect("consumer", port=port, connect_timeout=60)
        async with consumer:
            assert await read_line(proc.stdout, 60) == b"ready\n"
            waiting = asyncio.ensure_future(consumer.drop_select(torch.arange(4)))
            done, _ = await asyncio.wait({waiting}, timeout=0.3)
            assert not done
            proc.kill()
            killed_at = time.perf_counter()
            with pytest.raises(PeerClosedError):
                await asyncio.wait_for(waiting, TIMEOUT)
            assert time.perf_counter() - killed_at < 2.0
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


# --------------------------------------------------------------------- issue 15, defect 6

BROKEN_WRITER_PRODUCER = """
import asyncio, sys, torch
from aiokvpipe import KVLookupBuffer

async def main(port: int) -> None:
    buf = await KVLookupBuffer.connect("producer", port=port, connect_timeout=30)
    value = torch.ones(2, 4)
    await buf.insert(torch.arange(4), None, torch.ones(2, 4), value, None)
    # Documented as forbidden, done anyway: the inserted value is replaced
    # by a 15-dim tensor, which the writer task cannot send when the entry
    # is served, after tokens, roi and key already went out.
    value.data = torch.zeros((1,) * 15)
    print("ready", flush=True)
    await asyncio.sleep(120)  # alive, loop running: only the buffer broke

asyncio.run(main(int(sys.argv[1])))
"""


@pytest.mark.timeout(90)
async def test_a_failed_writer_task_closes_the_pipes_so_the_peer_is_not_left_waiting() -> None:
    """The producer (a child process that stays alive) fails to send a hit
    half-way; its buffer closes both pipes, so the consumer's drop_select (no
    timeout) raises PeerClosedError instead of waiting forever."""
    port = free_port_pair()
    proc = Forked(
        [sys.executable, "-c", BROKEN_WRITER_PRODUCER, str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        consumer = await KVLookupBuffer.connect("consumer", port=port, connect_timeout=60)
        async with consumer:
            assert await read_line(proc.stdout, 60) == b"ready\n"
            waiting = asyncio.ensure_future(consumer.drop_select(torch.arange(4)))
            started = time.perf_counter()
            with pytest.raises(PeerClosedError):
                await asyncio.wait_for(waiting, TIMEOUT)
            assert time.perf_counter() - started < 5.0
            assert proc.poll() is None, "the producer process must still be alive"
            with pytest.raises(PeerClosedError):  # and every later call
                await consumer.drop_select(None)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


async def test_an_oversized_insert_raises_before_any_tensor_goes_out() -> None:
    """Each of the five tensors must fit the data pipe's max_frame_bytes: an
    entry with one that does not is refused by insert itself, nothing is
    buffered or sent, and the pair keeps working."""
    limit = 4096
    port = free_port_pair()
    producer, consumer = await asyncio.wait_for(
        asyncio.gather(
            KVLookupBuffer.connect("producer", port=port, max_frame_bytes=limit),
            KVLookupBuffer.connect("consumer", port=port, max_frame_bytes=limit),
        ),
        TIMEOUT,
    )
    async with producer, consumer:
        small = make_entry(40, n_tokens=4)
        tokens, roi, key, value, hidden = small
        big = torch.zeros(limit // 4 + 1, dtype=torch.float32)  # limit + 4 bytes
        for name, args in (
            ("key", (tokens, roi, big, big, hidden)),
            ("hidden", (tokens, roi, key, value, big)),
            ("tokens", (torch.arange(limit // 8 + 1), None, key, value, hidden)),
        ):
            with pytest.raises(FrameTooLargeError, match=f"insert.*{name}") as info:
                await producer.insert(*args)
            assert info.value.limit == limit and info.value.nbytes > limit
            assert len(producer) == 0 and producer.buffered_bytes == 0
        # Nothing was buffered, so nothing can be served and nothing went out.
        assert await consumer.drop_select(None, timeout=TIMEOUT) == [None] * 5
        assert producer._data.bytes_sent == 0
        # The pipes are intact: a fitting entry still goes through, bit-exact.
        await producer.insert(*small)
        assert_bit_exact(await consumer.drop_select(tokens, timeout=TIMEOUT), small)
