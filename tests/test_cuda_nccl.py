"""The NCCL transport's logic on CPU: fake communicators moving real bytes.

The GPU is the only thing missing: headers, the unique-id hello, ordering of
stream operations, completion through events, timeouts that abort, async
errors, close handshakes and failure propagation all run for real. See
tests/test_cuda_gpu.py for the same paths on a device.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from aiokvpipe import PipeConfig
from aiokvpipe.cuda.channel import MAX_INFLIGHT
from aiokvpipe.cuda.nccl_thread import NcclThread
from aiokvpipe.cuda.testing import FakeDevice, FakeNccl, FakeNcclError, FakeOps
from aiokvpipe.errors import (
    CudaTransferError,
    MalformedFrameError,
    PeerClosedError,
    PipeClosedError,
    TransferTimeout,
)
from aiokvpipe.tensors import header_for
from aiokvpipe.transport.base import OutgoingMessage
from aiokvpipe.transport.nccl import (
    NcclRecvChannel,
    NcclSendChannel,
    create_endpoint,
    unique_id_bytes,
)
from aiokvpipe.transport.testing import link_pair


@dataclass
class Pair:
    device: FakeDevice
    nccl: FakeNccl
    tx: FakeOps
    rx: FakeOps
    sender: NcclSendChannel
    receiver: NcclRecvChannel
    rx_nccl: FakeNccl
    threads: tuple[NcclThread, NcclThread]
    seq: int = 0

    def send(self, tensor: torch.Tensor | None) -> OutgoingMessage:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        message = OutgoingMessage(header_for(self.seq, tensor), tensor, done)
        self.seq += 1
        self.sender.submit(message)
        return message

    def comm(self, rank: int) -> Any:
        comms = self.nccl.comms if rank == 0 else self.rx_nccl.comms
        return next(c for c in comms if c.rank == rank)


@pytest.fixture
def nccl_device() -> tuple[FakeDevice, FakeNccl]:
    device = FakeDevice()
    return device, FakeNccl(device)


async def open_pair(
    device: FakeDevice, nccl: FakeNccl, *, processes: int = 1, **config: Any
) -> Pair:
    """Both ends in one process (one NCCL thread), or in two fake processes."""
    config.setdefault("connect_timeout", 5.0)
    send_link, recv_link = link_pair(PipeConfig(rank=0, **config))
    tx, rx = FakeOps(device, "tx"), FakeOps(device, "rx")
    rx_nccl = nccl if processes == 1 else nccl.other_process()
    tx_thread = NcclThread()
    rx_thread = tx_thread if processes == 1 else NcclThread()
    sender = NcclSendChannel.open(send_link, nccl=nccl, ops=tx, thread=tx_thread)
    receiver = NcclRecvChannel.open(recv_link, nccl=rx_nccl, ops=rx, thread=rx_thread)
    return Pair(device, nccl, tx, rx, sender, receiver, rx_nccl, (tx_thread, rx_thread))


@pytest.fixture
async def pair(nccl_device: tuple[FakeDevice, FakeNccl]) -> AsyncIterator[Pair]:
    p = await open_pair(*nccl_device)
    try:
        yield p
    finally:
        await p.sender.aclose(graceful=False)
        await p.receiver.aclose()


SAMPLES = [
    torch.arange(12, dtype=torch.float32).reshape(3, 4),
    None,
    torch.tensor(3.5, dtype=torch.float64),  # 0-dim
    torch.empty(0, 5, dtype=torch.int16),  # no payload
    torch.tensor([True, False, True]),
    torch.randn(7, 3).to(torch.bfloat16),
    torch.arange(10, dtype=torch.int64)[::2],  # non-contiguous
]


async def test_round_trip_in_order_then_graceful_close(pair: Pair) -> None:
    messages = [pair.send(t) for t in SAMPLES]
    for sent in SAMPLES:
        got = await asyncio.wait_for(pair.receiver.recv(), 5)
        if sent is None:
            assert got is None
        else:
            assert got is not None
            assert got.dtype == sent.dtype and got.shape == sent.shape
            assert torch.equal(got, sent)
    await asyncio.wait_for(asyncio.gather(*(m.done for m in messages)), 5)
    await asyncio.wait_for(pair.sender.aclose(), 5)  # waits for the receiver's echo
    with pytest.raises(PeerClosedError, match="closed the pipe"):
        await pair.receiver.recv()
    assert pair.sender.error is None and pair.receiver.error is None
    await pair.receiver.aclose()
    assert all(c.aborted for c in pair.nccl.comms)  # abort, not a collective destroy
    assert not any(c.destroyed for c in pair.nccl.comms)


async def test_unique_id_travels_as_raw_bytes(pair: Pair) -> None:
    message = pair.send(torch.ones(4))
    await asyncio.wait_for(pair.receiver.recv(), 5)
    await message.done
    tx_comm, rx_comm = pair.comm(0), pair.comm(1)
    assert tx_comm.key == rx_comm.key and len(tx_comm.key) == 128
    assert (tx_comm.world_size, rx_comm.world_size) == (2, 2)


async def test_legacy_tuple_ids(nccl_device: tuple[FakeDevice, FakeNccl]) -> None:
    device, _ = nccl_device
    p = await open_pair(device, FakeNccl(device, legacy_ids=True))
    try:
        message = p.send(torch.arange(5))
        assert torch.equal(await asyncio.wait_for(p.receiver.recv(), 5), torch.arange(5))
        await message.done
    finally:
        await p.sender.aclose()
        await p.receiver.aclose()


def test_unique_id_conversion() -> None:
    raw = bytes(range(128))
    assert unique_id_bytes(raw) == raw
    signed = tuple(b - 256 if b > 127 else b for b in raw)
    assert unique_id_bytes(signed) == raw
    with pytest.raises(MalformedFrameError, match="127 bytes"):
        unique_id_bytes(raw[:127])


async def test_stream_ordering(pair: Pair) -> None:
    tensor = torch.arange(4, dtype=torch.float32)
    message = pair.send(tensor)
    # The producer fence is recorded synchronously, in submit().
    fence = pair.device.actions("tx.current")
    assert fence and fence[-1].startswith("record tx.current-")
    fence_event = fence[-1].split()[1]
    await asyncio.wait_for(pair.receiver.recv(), 5)
    await message.done
    # Sender: the NCCL stream waits for that fence, then sends, then records
    # the event whose completion releases the message.
    tx_stream = pair.device.actions("tx.side1")
    assert tx_stream[-3:] == [f"wait {fence_event}", "nccl_send 16B", tx_stream[-1]]
    assert tx_stream[-1].startswith("record tx.side1-")
    # Receiver: the buffer comes from the consumer's stream, so the NCCL stream
    # waits for that stream first and records its use of the buffer (on the
    # loop, so anywhere around the NCCL thread's wait/recv/record).
    rx_stream = pair.device.actions("rx.side1")
    assert "record_stream" in rx_stream
    rx_stream.remove("record_stream")
    assert rx_stream[-3].startswith("wait rx.current-")
    assert rx_stream[-2] == "nccl_recv 16B"
    assert rx_stream[-1].startswith("record rx.side1-")


async def test_done_waits_for_the_device(pair: Pair) -> None:
    await asyncio.sleep(0.05)  # let set-up finish
    pair.device.paused = True
    message = pair.send(torch.ones(8))
    receiving = asyncio.ensure_future(pair.receiver.recv())
    await asyncio.sleep(0.05)
    assert not message.done.done()  # NCCL still owns the tensor
    assert not receiving.done()
    pair.device.paused = False
    await asyncio.wait_for(message.done, 5)
    assert torch.equal(await asyncio.wait_for(receiving, 5), torch.ones(8))


async def test_none_and_empty_frames_skip_nccl(pair: Pair) -> None:
    messages = [pair.send(None), pair.send(torch.empty(0, 3))]
    assert await asyncio.wait_for(pair.receiver.recv(), 5) is None
    got = await asyncio.wait_for(pair.receiver.recv(), 5)
    assert got is not None and got.shape == (0, 3)
    await asyncio.gather(*(m.done for m in messages))
    assert pair.device.actions("tx.side1") == ["nccl_send 1B", "record tx.side1-1"]  # warm-up


async def test_timeout_aborts_the_communicator(nccl_device: tuple[FakeDevice, FakeNccl]) -> None:
    device, nccl = nccl_device
    p = await open_pair(device, nccl, op_timeout=0.1)
    try:
        await asyncio.sleep(0.05)
        nccl.hang = True
        message = p.send(torch.ones(16))
        with pytest.raises(TransferTimeout, match="ncclSend of 64 bytes"):
            await asyncio.wait_for(message.done, 5)
        assert isinstance(p.sender.error, TransferTimeout)
        assert p.comm(0).aborted
        later = p.send(torch.ones(1))  # a broken channel fails new work at once
        with pytest.raises(TransferTimeout):
            await later.done
        with pytest.raises((TransferTimeout, PeerClosedError)):
            await asyncio.wait_for(p.receiver.recv(), 5)
        # The broken receiver aborts its communicator on the NCCL thread, which
        # may finish just after recv has raised: wait for it, boundedly.
        for _ in range(200):
            if p.comm(1).aborted:
                break
            await asyncio.sleep(0.01)
        assert p.comm(1).aborted
    finally:
        await p.sender.aclose()
        await p.receiver.aclose()


async def test_async_error_is_typed(nccl_device: tuple[FakeDevice, FakeNccl]) -> None:
    device, nccl = nccl_device
    p = await open_pair(device, nccl)
    try:
        await asyncio.sleep(0.05)
        nccl.hang = True
        nccl.async_error = FakeNcclError("NCCL error: remote process exited")
        message = p.send(torch.ones(4))
        with pytest.raises(CudaTransferError, match="remote process exited") as info:
            await asyncio.wait_for(message.done, 5)
        assert isinstance(info.value.__cause__, FakeNcclError)
        assert p.comm(0).aborted
        assert nccl.checks > 0
    finally:
        await p.sender.aclose()
        await p.receiver.aclose()


async def test_receiver_gone_fails_the_sender_fast(pair: Pair) -> None:
    message = pair.send(torch.ones(2))
    await asyncio.wait_for(pair.receiver.recv(), 5)
    await message.done
    await pair.receiver.aclose()  # closes its socket without a goodbye
    for _ in range(200):
        if pair.sender.error is not None and pair.comm(0).aborted:
            break
        await asyncio.sleep(0.01)
    assert isinstance(pair.sender.error, PeerClosedError)
    assert pair.comm(0).aborted  # the sender noticed on its own, while idle
    with pytest.raises(PeerClosedError):
        await pair.send(torch.ones(1)).done


async def test_sender_gone_fails_the_receiver(pair: Pair) -> None:
    await pair.sender.aclose(graceful=False)
    with pytest.raises(PeerClosedError):
        await asyncio.wait_for(pair.receiver.recv(), 5)
    assert isinstance(pair.receiver.error, PeerClosedError)


async def test_peer_init_failure_stops_the_wait(nccl_device: tuple[FakeDevice, FakeNccl]) -> None:
    device, nccl = nccl_device
    p = await open_pair(device, nccl, processes=2, connect_timeout=30.0)
    nccl.hold_rank = 0  # the sender's ncclCommInitRank blocks, waiting for a peer
    nccl.init_timeout = 0.3  # ...and gives up once released, as its peer never joins
    p.rx_nccl.fail_init = FakeNcclError("ncclInvalidUsage")  # the receiver's fails
    try:
        started = time.perf_counter()
        with pytest.raises(CudaTransferError, match="could not set up NCCL"):
            await asyncio.wait_for(p.send(torch.ones(1)).done, 10)
        assert time.perf_counter() - started < 5  # not connect_timeout
        with pytest.raises(CudaTransferError, match="ncclInvalidUsage"):
            await p.receiver.recv()
    finally:
        nccl.release_init.set()  # the abandoned set-up ends (and would be aborted if built)
        await p.sender.aclose()
        await p.receiver.aclose()
    for _ in range(200):
        if all(t.ident is None for t in p.threads):
            break
        await asyncio.sleep(0.01)
    assert all(t.ident is None for t in p.threads)  # the NCCL threads are done
    assert not [c for c in nccl.comms + p.rx_nccl.comms if not c.aborted]


async def test_cancelled_recv_loses_nothing(pair: Pair) -> None:
    waiting = asyncio.ensure_future(pair.receiver.recv())
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    first, second = pair.send(torch.tensor([1])), pair.send(torch.tensor([2]))
    assert torch.equal(await asyncio.wait_for(pair.receiver.recv(), 5), torch.tensor([1]))
    assert torch.equal(await asyncio.wait_for(pair.receiver.recv(), 5), torch.tensor([2]))
    await asyncio.gather(first.done, second.done)


async def test_receiver_window_bounds_unconsumed_bytes(
    nccl_device: tuple[FakeDevice, FakeNccl],
) -> None:
    device, nccl = nccl_device
    p = await open_pair(device, nccl, buffer_bytes=64)
    try:
        messages = [p.send(torch.full((16,), float(i))) for i in range(3)]  # 64 B each

        def posted() -> int:
            return sum(1 for a in p.device.actions("rx.side1") if a.startswith("nccl_recv 64B"))

        for _ in range(300):
            if posted():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert posted() == 1  # the second waits until the first is taken
        for i in range(3):
            got = await asyncio.wait_for(p.receiver.recv(), 5)
            assert torch.equal(got, torch.full((16,), float(i)))
        await asyncio.gather(*(m.done for m in messages))
    finally:
        await p.sender.aclose()
        await p.receiver.aclose()


async def test_closed_channels_refuse_work(pair: Pair) -> None:
    await pair.sender.aclose()
    with pytest.raises(PipeClosedError):
        await pair.send(torch.ones(1)).done
    await pair.receiver.aclose()
    with pytest.raises(PipeClosedError):
        await pair.receiver.recv()
    await pair.sender.aclose()  # idempotent
    await pair.receiver.aclose()


async def test_grouped_self_exchange(nccl_device: tuple[FakeDevice, FakeNccl]) -> None:
    """One rank, one communicator: send to and receive from itself in a group."""
    device, nccl = nccl_device
    ops = FakeOps(device, "solo")
    uid = unique_id_bytes(nccl.get_unique_id())
    endpoint = await create_endpoint(
        nccl, ops, uid, world_size=1, rank=0, timeout=5, what="self", thread=NcclThread()
    )
    src = torch.arange(32, dtype=torch.int32)
    dst = torch.zeros(32, dtype=torch.int32)
    event = await endpoint.exchange(src, dst, peer=0)
    await endpoint.wait(event, timeout=5, what="self exchange")
    assert torch.equal(src, dst)
    assert device.actions("solo.side1")[:2] == ["nccl_send 128B", "nccl_recv 128B"]
    await endpoint.abort(timeout=5)
    assert nccl.comms[0].aborted


async def _settled(*threads: NcclThread) -> None:
    """Wait until the NCCL threads ran out of work and exited."""
    for _ in range(300):
        if all(t.ident is None for t in threads):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("an NCCL thread never went idle")


async def test_every_nccl_call_runs_on_the_one_nccl_thread(
    nccl_device: tuple[FakeDevice, FakeNccl],
) -> None:
    """Init, warm-up, send/recv, error checks and abort: one thread, never the loop's."""
    device, nccl = nccl_device
    p = await open_pair(device, nccl)
    try:
        messages = [p.send(torch.full((4,), float(i))) for i in range(5)]
        for i in range(5):
            got = await asyncio.wait_for(p.receiver.recv(), 5)
            assert torch.equal(got, torch.full((4,), float(i)))
        await asyncio.wait_for(asyncio.gather(*(m.done for m in messages)), 5)
        # The thread polls live communicators' async errors every 5 ms; on a
        # quiet machine the transfers above can finish before the first poll.
        for _ in range(500):
            if any(name == "check_async_error" for name, _, _ in list(nccl.calls)):
                break
            await asyncio.sleep(0.01)
        await asyncio.wait_for(p.sender.aclose(), 5)
    finally:
        await p.sender.aclose(graceful=False)
        await p.receiver.aclose()
    await _settled(*p.threads)
    called = {name for name, _, _ in nccl.calls}
    assert {"NcclCommunicator", "send", "recv", "check_async_error", "abort"} <= called
    assert threading.get_ident() not in nccl.threads()
    assert nccl.thread_names() == {"aiokvpipe: nccl"}
    assert nccl.overlaps == []  # no NCCL call ever ran beside another


async def test_set_ups_of_two_processes_cannot_deadlock(
    nccl_device: tuple[FakeDevice, FakeNccl],
) -> None:
    """Two processes, two links, one NCCL thread each: whichever set-up each
    process reaches first, neither blocks its thread on a communicator the
    other has not started (each init blocks until its peer joins)."""
    device, nccl = nccl_device
    a_to_b = await open_pair(device, nccl, processes=2)
    # b -> a: the second process sends; it reuses the fakes of the first pair.
    send_link, recv_link = link_pair(PipeConfig(rank=0, connect_timeout=5.0))
    b_nccl, a_thread, b_thread = a_to_b.rx_nccl, *a_to_b.threads
    back_tx, back_rx = FakeOps(device, "btx"), FakeOps(device, "brx")
    back = NcclSendChannel.open(send_link, nccl=b_nccl, ops=back_tx, thread=b_thread)
    back_in = NcclRecvChannel.open(recv_link, nccl=nccl, ops=back_rx, thread=a_thread)
    try:
        forward = a_to_b.send(torch.arange(3))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        back.submit(OutgoingMessage(header_for(0, torch.arange(4)), torch.arange(4), done))
        got = await asyncio.wait_for(a_to_b.receiver.recv(), 5)
        assert torch.equal(got, torch.arange(3))
        assert torch.equal(await asyncio.wait_for(back_in.recv(), 5), torch.arange(4))
        await asyncio.wait_for(asyncio.gather(forward.done, done), 5)
        assert nccl.overlaps == [] and b_nccl.overlaps == []
    finally:
        for channel in (a_to_b.sender, back):
            await channel.aclose(graceful=False)
        for receiver in (a_to_b.receiver, back_in):
            await receiver.aclose()
    await _settled(a_thread, b_thread)


async def test_abandoned_set_up_aborts_each_communicator_once(
    nccl_device: tuple[FakeDevice, FakeNccl],
) -> None:
    """Set-up given up during the warm-up: each communicator aborted exactly once.

    cupy's abort is not atomic; a second abort while the first runs is a
    double free (the fake's slow abort catches one).
    """
    device, nccl = nccl_device
    nccl.hang = True  # the warm-up transfer never completes
    nccl.abort_seconds = 0.2
    p = await open_pair(device, nccl, connect_timeout=0.3)
    try:
        with pytest.raises(TransferTimeout, match="NCCL set-up"):
            await asyncio.wait_for(p.send(torch.ones(1)).done, 10)
        with pytest.raises((TransferTimeout, CudaTransferError, PeerClosedError)):
            await asyncio.wait_for(p.receiver.recv(), 10)
    finally:
        await p.sender.aclose()
        await p.receiver.aclose()
    await _settled(*p.threads)
    assert len(nccl.comms) == 2
    assert [c.abort_calls for c in nccl.comms] == [1, 1]
    assert [c.concurrent_aborts for c in nccl.comms] == [0, 0]


async def test_messages_in_flight_on_the_device_are_capped(
    nccl_device: tuple[FakeDevice, FakeNccl],
) -> None:
    """Thousands of tiny sends fit any byte window; the message cap stops them at 128."""
    device, nccl = nccl_device
    p = await open_pair(device, nccl)
    try:
        first = p.send(torch.ones(1))
        await asyncio.wait_for(p.receiver.recv(), 5)
        await first.done
        device.paused = True  # nothing completes: everything queued stays in flight
        count = 300
        messages = [p.send(torch.full((2,), float(i))) for i in range(count)]

        def queued(stream: str, op: str) -> int:
            return sum(1 for a in device.actions(stream) if a == f"{op} 8B")

        for _ in range(300):
            if queued("tx.side1", "nccl_send") >= MAX_INFLIGHT:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # room to overshoot, if the cap let it
        assert queued("tx.side1", "nccl_send") == MAX_INFLIGHT
        assert queued("rx.side1", "nccl_recv") <= MAX_INFLIGHT
        device.paused = False
        for i in range(count):
            got = await asyncio.wait_for(p.receiver.recv(), 5)
            assert torch.equal(got, torch.full((2,), float(i)))
        await asyncio.wait_for(asyncio.gather(*(m.done for m in messages)), 10)
    finally:
        await p.sender.aclose()
        await p.receiver.aclose()
