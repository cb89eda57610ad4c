"""Pipe under faults: bad input, hostile bytes on the wire, dead peers,
cancellation, closing, timeouts and backpressure. Real sockets, real processes.

Tests that write raw frames on a link speak TCP's wire and force
``transport="tcp"``; the rest run for every transport in ``TRANSPORTS``."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
from conftest import connect_beside, free_port
from forked import Forked
from transport_conformance import (
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

from aiokvpipe import (
    AiokvpipeError,
    FrameTooLargeError,
    PeerClosedError,
    PipeClosedError,
    PipeConfig,
    ProtocolError,
    TransferTimeout,
    UnsupportedTensorError,
)
from aiokvpipe.errors import (
    BadMagicError,
    MalformedFrameError,
    SequenceError,
    UnsupportedVersionError,
)
from aiokvpipe.pipe import Pipe
from aiokvpipe.rendezvous import rendezvous
from aiokvpipe.wire import (
    DTYPE_CODES,
    HEADER_SIZE,
    FrameHeader,
    FrameKind,
    decode_header,
    tensor_header,
)


@pytest.fixture(params=TRANSPORTS)
def make_pipes(request: pytest.FixtureRequest) -> MakePipes:
    """Pipes over each transport, for the behaviour every transport shares."""
    return pipe_factory(request.param)


def frame(seq: int, tensor: torch.Tensor | None) -> bytes:
    """The exact bytes a well-behaved sender writes for ``tensor``."""
    if tensor is None:
        return FrameHeader(FrameKind.NONE, seq).encode()
    header = tensor_header(seq, tensor.dtype, tuple(tensor.shape)).encode()
    return header + tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def patched(raw: bytes, offset: int, value: bytes) -> bytes:
    return raw[:offset] + value + raw[offset + len(value) :]


# --------------------------------------------------------------------- bad input


def bad_inputs() -> list[tuple[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized and sparse CSR creation warn
        return [
            ("str", "x"),
            ("list", [1.0, 2.0]),
            ("int", 3),
            ("qint8", torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)),
            ("sparse", torch.eye(3).to_sparse()),
            ("sparse_csr", torch.eye(3).to_sparse_csr()),
            ("meta", torch.empty(3, device="meta")),
            ("15-dims", torch.zeros((1,) * 15)),
        ]


@pytest.mark.timeout(15)
async def test_bad_input_is_refused_before_anything_is_written(make_pipes: MakePipes) -> None:
    async with opened(make_pipes, max_frame_bytes=1 << 16) as (a, b):
        for name, obj in bad_inputs():
            with pytest.raises(UnsupportedTensorError):
                await a.send(obj)
            assert a.pending_bytes == 0, name
        with pytest.raises(FrameTooLargeError, match="65537"):
            await a.send(torch.zeros(65537, dtype=torch.uint8))
        # nothing took a sequence number, nothing reached the wire
        first = await a.send(tagged(1))
        assert first.seq == 0
        await a.send(None)
        assert_all_same(await recv_n(b, 2), [tagged(1), None])
        assert b.bytes_received == 32


# --------------------------------------------------------------------- hostile peer


@contextlib.asynccontextmanager
async def fake_predecessor(**overrides: Any) -> AsyncIterator[tuple[Pipe, socket.socket]]:
    """A real rank 1 Pipe, and us as rank 0 holding its raw authenticated sockets.

    Rank 0 runs the real rendezvous (so the handshake is genuine) but writes
    whatever it likes on the socket rank 1 receives from.
    """
    port = free_port()
    configs = [
        PipeConfig(rank=r, port=port, connect_timeout=10.0, transport="tcp", **overrides)
        for r in (0, 1)
    ]
    (send_link, recv_link), victim = await together(
        rendezvous(configs[0]), Pipe.connect(configs[1])
    )
    try:
        yield victim, send_link.sock
    finally:
        send_link.sock.close()
        recv_link.sock.close()
        await victim.aclose()


async def write(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)


GOOD = [tagged(5), None]
GOOD_BYTES = frame(0, GOOD[0]) + frame(1, None)
T2 = torch.arange(64, dtype=torch.float32)
F2 = frame(2, T2)  # the next valid frame after GOOD: header + 256 payload bytes

HOSTILE: list[tuple[str, bytes, bool, type[AiokvpipeError], str]] = [
    # (case, bytes after GOOD, close afterwards, expected error, message part)
    ("garbage", bytes(range(256)) * 2, False, BadMagicError, "magic"),
    ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(200), False, BadMagicError, "magic"),
    ("bad-magic", patched(F2, 0, b"NOPE"), False, BadMagicError, "magic"),
    ("bad-version", patched(F2, 4, b"\x07"), False, UnsupportedVersionError, "version 7"),
    ("unknown-kind", patched(F2, 5, b"\x09"), False, MalformedFrameError, "kind 9"),
    ("unknown-dtype", patched(F2, 6, b"\xee"), False, MalformedFrameError, "dtype code 238"),
    ("too-many-dims", patched(F2, 7, b"\x0f"), False, MalformedFrameError, "ndim 15"),
    (
        "negative-dim",
        patched(F2, 24, (-64).to_bytes(8, "little", signed=True)),
        False,
        MalformedFrameError,
        "negative",
    ),
    (
        "nbytes-mismatch",
        patched(F2, 16, (255).to_bytes(8, "little")),
        False,
        MalformedFrameError,
        "match",
    ),
    (
        "over-max-frame",  # announces 1 TiB: must be refused, not allocated
        tensor_header(2, torch.uint8, (1 << 40,)).encode() + bytes(1000),
        False,
        FrameTooLargeError,
        "1099511627776",
    ),
    (
        "just-over-max-frame",
        tensor_header(2, torch.uint8, ((1 << 16) + 1,)).encode(),
        False,
        FrameTooLargeError,
        "65537",
    ),
    ("seq-skipped", frame(3, T2), False, SequenceError, "sequence 3 received, expected 2"),
    ("seq-repeated", frame(1, None), False, SequenceError, "sequence 1 received, expected 2"),
    ("truncated-header", F2[: HEADER_SIZE // 2], True, PeerClosedError, "mid-frame"),
    ("truncated-payload", F2[: HEADER_SIZE + 100], True, PeerClosedError, "mid-frame"),
    ("eof-between-frames", b"", True, PeerClosedError, "without closing"),
    (
        "close-frame",
        FrameHeader(FrameKind.CLOSE, 2).encode(),
        False,
        PeerClosedError,
        "closed the pipe",
    ),
]


@pytest.mark.timeout(30)
async def test_hostile_frames_raise_the_right_error() -> None:
    """Each hostile byte stream: the good frames before it arrive, then recv raises
    the matching error, promptly, again on every later recv, without a large
    allocation; and the stream stays dead (no frame after it is delivered)."""
    failures = []
    for case, hostile, close, error, match in HOSTILE:
        try:
            async with fake_predecessor(max_frame_bytes=1 << 16) as (victim, sock):
                tracemalloc.start()
                try:
                    await write(sock, GOOD_BYTES + hostile)
                    if close:
                        sock.close()
                    else:
                        with contextlib.suppress(OSError):  # a victim may have hung up
                            await write(sock, F2)
                    got = await asyncio.wait_for(recv_n(victim, len(GOOD)), 5)
                    assert_all_same(got, GOOD)
                    with pytest.raises(error, match=match) as info:
                        await asyncio.wait_for(victim.recv(), 5)
                    with pytest.raises(error) as again:
                        await asyncio.wait_for(victim.recv(), 5)
                    assert again.value is info.value
                    assert "rank 1 <- rank 0" in str(info.value) or error is not PeerClosedError
                    peak = tracemalloc.get_traced_memory()[1]
                    assert peak < 16 << 20, f"{peak} bytes allocated"
                finally:
                    tracemalloc.stop()
        except Exception as exc:  # report every failing case at once
            failures.append(f"{case}: {exc!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(10)
async def test_receiver_that_writes_back_breaks_the_sender() -> None:
    """The receiving end never writes on a TCP link: bytes from it are a protocol error."""
    port = free_port()
    configs = [PipeConfig(rank=r, port=port, connect_timeout=10.0, transport="tcp") for r in (0, 1)]
    sender, (send_link, recv_link) = await together(
        Pipe.connect(configs[0]), rendezvous(configs[1])
    )
    try:
        await sender.send(tagged(1))
        await write(recv_link.sock, b"surprise")
        for _ in range(100):
            if sender._sender.error is not None:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(ProtocolError, match="unexpected bytes"):
            await sender.send(tagged(2))
    finally:
        send_link.sock.close()
        recv_link.sock.close()
        await sender.aclose()


# --------------------------------------------------------------------- socket-level fuzz


def random_message(rng: random.Random) -> torch.Tensor | None:
    if rng.random() < 0.15:
        return None
    dtype = rng.choice(list(DTYPE_CODES))
    shape = tuple(rng.choice((0, 1, 1, 2, 3, 5, 17)) for _ in range(rng.randrange(0, 5)))
    while math.prod(shape) * dtype.itemsize > 60 << 10:
        shape = shape[1:]
    if rng.random() < 0.05:  # bigger than one read, within max_frame_bytes
        shape = (rng.randrange(1000, (60 << 10) // dtype.itemsize),)
    return random_tensor(dtype, shape, rng)


def hostile_ending(rng: random.Random, seq: int, limit: int) -> tuple[bytes, bool, type[Exception]]:
    """Bytes that end a connection, whether to close after them, and the error."""
    choice = rng.randrange(6)
    if choice <= 2:  # a valid next header with 1..4 bytes overwritten
        base = frame(seq, random_message(rng))
        for _ in range(100):
            raw = bytearray(base)
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(24 if choice else HEADER_SIZE)] = rng.randrange(256)
            try:
                decode_header(bytes(raw[:HEADER_SIZE]), expected_seq=seq, max_frame_bytes=limit)
            except ProtocolError as exc:
                return bytes(raw), False, type(exc)
    if choice == 3:  # random bytes
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(HEADER_SIZE, 600)))
        try:
            decode_header(raw[:HEADER_SIZE], expected_seq=seq, max_frame_bytes=limit)
        except ProtocolError as exc:
            return raw, False, type(exc)
    full = frame(seq, torch.ones(300, dtype=torch.int16))
    return full[: rng.randrange(1, len(full))], True, PeerClosedError  # cut short


@pytest.mark.timeout(60)
async def test_socket_fuzz_random_and_mutated_frames() -> None:
    """Thousands of random valid frames, split at random points across writes,
    then a mutated or truncated ending, over a series of connections: the
    receiver returns every valid frame bit for bit, then raises the error the
    ending deserves (as decode_header judges it), never hangs or crashes."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    total_frames = 0
    for conn in range(10):
        total_frames += await fuzz_one_connection(rng, f"seed {seed}, connection {conn}")
    assert total_frames > 1000


async def fuzz_one_connection(rng: random.Random, where: str) -> int:
    limit = 1 << 16
    messages = [random_message(rng) for _ in range(rng.randrange(50, 250))]
    stream = b"".join(frame(i, m) for i, m in enumerate(messages))
    ending, close, error = hostile_ending(rng, len(messages), limit)
    stream += ending
    # separate generators: the interleaving of feed and check must not change the data
    feed_rng, check_rng = random.Random(rng.random()), random.Random(rng.random())
    buffer_bytes = rng.choice((64, 4096, 1 << 20))
    async with fake_predecessor(max_frame_bytes=limit, buffer_bytes=buffer_bytes) as (victim, sock):

        async def feed() -> None:
            pos = 0
            while pos < len(stream):
                n = feed_rng.choice((1, 7, HEADER_SIZE - 1, HEADER_SIZE + 3, 500, 5000, 70000))
                await write(sock, stream[pos : pos + n])
                pos += n
                if feed_rng.random() < 0.3:
                    await asyncio.sleep(0)
            if close:
                sock.close()

        async def check() -> None:
            for i, expected in enumerate(messages):
                got = await asyncio.wait_for(victim.recv(), 5)
                assert_same(got, expected, f"{where}, message {i}")
                if check_rng.random() < 0.05:
                    await asyncio.sleep(0.001)  # let the receive queue fill
            with pytest.raises(error):
                await asyncio.wait_for(victim.recv(), 5)

        try:
            await together(feed(), check())
        except (AssertionError, asyncio.TimeoutError, AiokvpipeError) as exc:
            raise AssertionError(f"{where}: {exc!r}") from exc
    return len(messages) + 1


# --------------------------------------------------------------------- a peer process dies

PEER = r"""
import asyncio, sys
import torch
from aiokvpipe import PipeConfig
from aiokvpipe.pipe import Pipe
from aiokvpipe.rendezvous import rendezvous
from aiokvpipe.wire import tensor_header

async def main(port, mode, transport):
    cfg = PipeConfig(
        rank=1, port=port, connect_timeout=30, buffer_bytes=1 << 16, transport=transport
    )
    if mode == "idle":  # a real pipe: says hello, then never reads again
        pipe = await Pipe.connect(cfg)
        await pipe.send(torch.arange(10))
        await pipe.flush()
    else:  # raw sockets: one whole frame, then half of the next
        send_link, recv_link = await rendezvous(cfg)
        t = torch.arange(10)
        whole = tensor_header(0, t.dtype, (10,)).encode() + t.numpy().tobytes()
        big = tensor_header(1, torch.uint8, (1 << 20,)).encode() + bytes(1 << 19)
        await asyncio.get_running_loop().sock_sendall(send_link.sock, whole + big)
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
"""


@contextlib.asynccontextmanager
async def peer_process(mode: str, transport: str = "tcp") -> AsyncIterator[tuple[Pipe, Forked]]:
    """Rank 1 in a child process; rank 0 (yielded) in this one."""
    port = free_port()
    # fork/exec returns at once; nothing below blocks on the child while it runs
    proc = Forked(
        [sys.executable, "-c", PEER, str(port), mode, transport],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    survivor: Pipe | None = None
    try:
        config = PipeConfig(
            rank=0, port=port, connect_timeout=30.0, buffer_bytes=1 << 20, transport=transport
        )
        survivor = await connect_beside(config, proc)
        yield survivor, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
        if survivor is not None:
            with contextlib.suppress(AiokvpipeError):
                await survivor.aclose()


async def fill_send_window(pipe: Pipe, chunk: int = 1 << 20) -> list[Any]:
    """Send until the window stays full: the peer no longer takes bytes."""
    transfers = []
    for i in range(400):
        try:
            transfers.append(
                await pipe.send(torch.full((chunk,), i % 251, dtype=torch.uint8), timeout=0.3)
            )
        except TransferTimeout:
            return transfers
    raise AssertionError("the peer kept reading: no backlog formed")


def kill(proc: Forked) -> float:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    return time.monotonic()


@pytest.mark.timeout(40)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_peer_killed_while_we_send_and_wait(transport: str) -> None:
    async with peer_process("idle", transport) as (pipe, proc):
        assert_same(await asyncio.wait_for(pipe.recv(), 30), torch.arange(10))
        transfers = await fill_send_window(pipe)
        assert not all(t.done() for t in transfers)
        blocked_send = asyncio.ensure_future(pipe.send(torch.ones(1 << 20, dtype=torch.uint8)))
        pending_flush = asyncio.ensure_future(pipe.flush())
        pending_recv = asyncio.ensure_future(pipe.recv())
        await asyncio.sleep(0.05)
        assert not (blocked_send.done() or pending_flush.done() or pending_recv.done())
        killed = kill(proc)
        for name, fut in (("send", blocked_send), ("flush", pending_flush), ("recv", pending_recv)):
            with pytest.raises(PeerClosedError):
                await asyncio.wait_for(fut, 5)
            assert time.monotonic() - killed < 2.0, f"{name} noticed the dead peer too late"
        for transfer in transfers:
            if not transfer.done():
                with pytest.raises(PeerClosedError):
                    await asyncio.wait_for(transfer, 2)
        # every later call raises the same typed error
        with pytest.raises(PeerClosedError):
            await pipe.send(tagged(1))
        with pytest.raises(PeerClosedError):
            await pipe.flush()
        with pytest.raises(PeerClosedError):
            await pipe.recv()
        await pipe.aclose()  # already reported: closes quietly


@pytest.mark.timeout(40)
async def test_peer_killed_mid_frame_while_we_receive() -> None:
    async with peer_process("mid-frame") as (pipe, proc):
        assert_same(await asyncio.wait_for(pipe.recv(), 30), torch.arange(10))
        transfers = await fill_send_window(pipe)  # and the peer never reads
        pending_recv = asyncio.ensure_future(pipe.recv())  # half a frame has arrived
        await asyncio.sleep(0.05)
        assert not pending_recv.done()
        killed = kill(proc)
        with pytest.raises(PeerClosedError, match="mid-frame"):
            await asyncio.wait_for(pending_recv, 5)
        assert time.monotonic() - killed < 2.0
        await asyncio.wait_for(
            asyncio.wait([asyncio.ensure_future(_settle(t)) for t in transfers]), 5
        )
        # sends that never left were not reported by any call yet: aclose says so
        with pytest.raises(PeerClosedError):
            await pipe.aclose()
        assert pipe.closed
        await pipe.aclose()  # idempotent, and quiet the second time


async def _settle(transfer: Any) -> None:
    with contextlib.suppress(AiokvpipeError):
        await transfer


# --------------------------------------------------------------------- cancellation


@pytest.mark.timeout(40)
async def test_cancelled_sends_and_recvs_never_corrupt_the_stream(make_pipes: MakePipes) -> None:
    """send/recv/flush cancelled at random points by tiny deadlines: the receiver
    gets exactly the sends that were accepted, intact and in order."""
    rng = random.Random(7)
    n = 300
    tiny = (0, 1e-6, 1e-5, 5e-5, 2e-4, 1e-3)
    accepted: list[int] = []
    received: list[int] = []
    cancelled = {"send": 0, "recv": 0, "flush": 0}

    def payload(i: int) -> torch.Tensor:
        return torch.arange(i, i + 2048 + (i % 5) * 1000, dtype=torch.int64)

    async with opened(make_pipes, buffer_bytes=48 << 10) as (a, b):

        async def send_and_record(i: int) -> None:
            await a.send(payload(i))
            accepted.append(i)  # right after acceptance: nothing can cancel in between

        async def sender() -> None:
            i = 0
            while i < n:
                try:
                    await asyncio.wait_for(send_and_record(i), rng.choice(tiny))
                except asyncio.TimeoutError:
                    cancelled["send"] += 1
                if accepted and accepted[-1] == i:
                    i += 1
                if rng.random() < 0.1:
                    try:
                        await asyncio.wait_for(a.flush(), rng.choice(tiny))
                    except asyncio.TimeoutError:
                        cancelled["flush"] += 1

        async def receiver() -> None:
            while len(received) < n:
                try:
                    t = await asyncio.wait_for(b.recv(), rng.choice(tiny))
                except asyncio.TimeoutError:
                    cancelled["recv"] += 1
                    continue
                assert t is not None
                i = int(t[0])
                assert torch.equal(t, payload(i)), f"message {i} corrupted"
                received.append(i)

        await asyncio.wait_for(together(sender(), receiver()), 30)
        await a.flush()
        assert a.pending_bytes == 0
    assert received == accepted == list(range(n))
    assert cancelled["send"] > 10 and cancelled["recv"] > 10, cancelled


# --------------------------------------------------------------------- closing


@pytest.mark.timeout(15)
async def test_aclose_is_idempotent_and_closed_pipe_refuses_calls(make_pipes: MakePipes) -> None:
    async with opened(make_pipes) as (a, b):
        await a.send(tagged(1))
        await asyncio.gather(a.aclose(), a.aclose())
        await a.aclose()
        assert a.closed
        with pytest.raises(PipeClosedError):
            await a.send(tagged(2))
        with pytest.raises(PipeClosedError):
            await a.send(None)
        with pytest.raises(PipeClosedError):
            await a.recv()
        with pytest.raises(PipeClosedError):
            await a.flush()
        assert_same(await b.recv(), tagged(1))
        async with b:
            pass
        assert b.closed
        with pytest.raises(PipeClosedError):
            await b.recv()


@pytest.mark.timeout(15)
async def test_close_wakes_our_own_pending_calls(make_pipes: MakePipes) -> None:
    """aclose fails a recv waiting for data and a send waiting for window."""
    async with opened(make_pipes, buffer_bytes=1 << 16, close_timeout=0.5) as (a, _b):
        waiting_recv = asyncio.ensure_future(a.recv())
        await fill_send_window(a, chunk=1 << 16)
        waiting_send = asyncio.ensure_future(a.send(tagged(1)))
        await asyncio.sleep(0.05)
        assert not waiting_recv.done() and not waiting_send.done()
        with contextlib.suppress(AiokvpipeError):
            await asyncio.wait_for(a.aclose(), 5)
        with pytest.raises(PipeClosedError):
            await asyncio.wait_for(waiting_recv, 2)
        with pytest.raises(PipeClosedError):
            await asyncio.wait_for(waiting_send, 2)


@pytest.mark.timeout(20)
async def test_cancelled_aclose_still_frees_everything_promptly(make_pipes: MakePipes) -> None:
    """aclose cancelled while it drains a stuck backlog: it gives up at once
    (no second wait on a goodbye), and the pipe is closed and freed."""
    async with opened(make_pipes, buffer_bytes=1 << 20, close_timeout=5.0) as (a, _b):
        transfers = await fill_send_window(a)
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(a.aclose(), 0.2)
        assert time.monotonic() - started < 1.5, "cancelled aclose kept waiting"
        assert a.closed
        with pytest.raises(PipeClosedError):
            await a.send(tagged(1))
        for transfer in transfers:
            await asyncio.wait_for(_settle(transfer), 1)
        with contextlib.suppress(AiokvpipeError):
            await a.aclose()


@pytest.mark.timeout(20)
async def test_peer_close_is_seen_after_everything_sent_before(make_pipes: MakePipes) -> None:
    async with opened(make_pipes) as (a, b):
        items: list[torch.Tensor | None] = [tagged(i) if i % 4 else None for i in range(60)]
        items.insert(30, torch.ones(8 << 20, dtype=torch.uint8))
        for item in items:
            await a.send(item)
        await a.aclose()  # flushes, then says goodbye
        assert_all_same(await asyncio.wait_for(recv_n(b, len(items)), 10), items)
        with pytest.raises(PeerClosedError, match="closed the pipe") as info:
            await asyncio.wait_for(b.recv(), 5)
        with pytest.raises(PeerClosedError) as again:
            await b.recv()
        assert again.value is info.value
        # our sends to the closed peer fail promptly as well
        started = time.monotonic()
        with pytest.raises(PeerClosedError):
            while time.monotonic() - started < 2:
                await b.send(tagged(0))
                await asyncio.sleep(0.01)


@pytest.mark.timeout(20)
async def test_aclose_is_bounded_when_the_peer_never_reads(make_pipes: MakePipes) -> None:
    async with opened(make_pipes, buffer_bytes=1 << 20, close_timeout=0.5) as (a, _b):
        transfers = await fill_send_window(a)
        started = time.monotonic()
        with pytest.raises(AiokvpipeError):  # data that never left is reported
            await a.aclose()
        assert time.monotonic() - started < 2.0
        assert a.closed
        for transfer in transfers:
            await _settle(transfer)
        assert all(t.done() for t in transfers)


# --------------------------------------------------------------------- timeouts and backpressure


@pytest.mark.timeout(15)
async def test_op_timeout_on_recv_names_ranks_and_keeps_the_pipe(make_pipes: MakePipes) -> None:
    async with opened(make_pipes, op_timeout=0.2) as (a, b):
        started = time.monotonic()
        with pytest.raises(TransferTimeout) as info:
            await b.recv()
        elapsed = time.monotonic() - started
        assert 0.15 < elapsed < 1.5
        assert isinstance(info.value, TimeoutError)
        assert "rank 1" in str(info.value) and "rank 0" in str(info.value)
        with pytest.raises(TransferTimeout):
            await b.recv(timeout=0.01)  # per-call override
        await a.send(tagged(3))
        assert_same(await b.recv(), tagged(3))
        late = asyncio.ensure_future(b.recv(timeout=None))  # no limit at all
        await asyncio.sleep(0.3)
        assert not late.done()
        await a.send(tagged(4))
        assert_same(await asyncio.wait_for(late, 5), tagged(4))


@pytest.mark.timeout(30)
async def test_backpressure_bounds_the_window_and_resumes(make_pipes: MakePipes) -> None:
    """A receiver that stops reading: the sender's window never holds more than
    buffer_bytes (or one oversize tensor), send blocks and times out, and
    everything resumes, in order, once the receiver reads."""
    window = 256 << 10
    async with opened(make_pipes, buffer_bytes=window, op_timeout=0.3) as (a, b):
        sizes = [16 << 10, 100 << 10, 300 << 10, 1 << 10, 64 << 10]  # 300 KiB is oversize
        peak = 0
        sent: list[int] = []

        def watch() -> None:
            nonlocal peak
            peak = max(peak, a.pending_bytes)

        for i in range(2000):
            n = sizes[i % len(sizes)]
            try:
                await a.send(torch.full((n,), i % 256, dtype=torch.uint8))
            except TransferTimeout as exc:
                assert "send on rank 0 -> rank 1" in str(exc)
                break
            sent.append(n)
            watch()
            assert a.pending_bytes <= max(window, max(sizes))
        else:
            raise AssertionError("send never blocked")
        blocked_at = len(sent)
        with pytest.raises(TransferTimeout):
            await a.flush()
        assert peak <= max(window, max(sizes))
        # the receiver drains; the blocked sender resumes
        more = asyncio.ensure_future(
            a.send(torch.full((sizes[0],), 255, dtype=torch.uint8), timeout=10)
        )
        got = await asyncio.wait_for(recv_n(b, blocked_at + 1), 10)
        await asyncio.wait_for(more, 5)
        assert [g.numel() for g in got if g is not None] == [*sent, sizes[0]]
        assert [int(g[0]) for g in got if g is not None] == [i % 256 for i in range(blocked_at)] + [
            255
        ]
        await a.flush()
        assert a.pending_bytes == 0
