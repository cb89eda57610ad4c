"""The NCCL transport's logic on CPU: fake communicators moving real bytes.

The GPU is the only thing missing: headers, the unique-id hello, ordering of
stream operations, completion through events, timeouts that abort, async
errors, close handshakes and failure propagation all run for real. See
tests/test_cuda_gpu.py for the same paths on a device.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from aiokvpipe import PipeConfig
from aiokvpipe.cuda.testing import FakeDevice, FakeNccl, FakeNcclError, FakeOps, link_pair
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


@dataclass
class Pair:
    device: FakeDevice
    nccl: FakeNccl
    tx: FakeOps
    rx: FakeOps
    sender: NcclSendChannel
    receiver: NcclRecvChannel
    seq: int = 0

    def send(self, tensor: torch.Tensor | None) -> OutgoingMessage:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        message = OutgoingMessage(header_for(self.seq, tensor), tensor, done)
        self.seq += 1
        self.sender.submit(message)
        return message

    def comm(self, rank: int) -> Any:
        return next(c for c in self.nccl.comms if c.rank == rank)


@pytest.fixture
def nccl_device() -> tuple[FakeDevice, FakeNccl]:
    device = FakeDevice()
    return device, FakeNccl(device)


async def open_pair(device: FakeDevice, nccl: FakeNccl, **config: Any) -> Pair:
    config.setdefault("connect_timeout", 5.0)
    send_link, recv_link = link_pair(PipeConfig(rank=0, **config))
    tx, rx = FakeOps(device, "tx"), FakeOps(device, "rx")
    sender = NcclSendChannel.open(send_link, nccl=nccl, ops=tx)
    receiver = NcclRecvChannel.open(recv_link, nccl=nccl, ops=rx)
    return Pair(device, nccl, tx, rx, sender, receiver)


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
    # waits for that stream first and records its use of the buffer.
    rx_stream = pair.device.actions("rx.side1")
    assert rx_stream[-4].startswith("wait rx.current-")
    assert rx_stream[-3:-1] == ["nccl_recv 16B", "record_stream"]
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
    assert pair.device.actions("tx.side1") == ["nccl_send 1B"]  # the warm-up only


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
    nccl.hold_rank = 0  # the sender's ncclCommInitRank blocks, waiting for a peer
    nccl.fail_rank = 1  # ...and the receiver's fails
    nccl.fail_init = FakeNcclError("ncclInvalidUsage")
    p = await open_pair(device, nccl, connect_timeout=30.0)
    try:
        started = time.perf_counter()
        with pytest.raises(CudaTransferError, match="could not set up NCCL"):
            await asyncio.wait_for(p.send(torch.ones(1)).done, 10)
        assert time.perf_counter() - started < 5  # not connect_timeout
        with pytest.raises(CudaTransferError, match="ncclInvalidUsage"):
            await p.receiver.recv()
    finally:
        nccl.release_init.set()  # the abandoned set-up finishes and is aborted
        await p.sender.aclose()
        await p.receiver.aclose()
    for _ in range(200):
        if nccl.comms and nccl.comms[0].aborted:
            break
        await asyncio.sleep(0.01)
    assert [c.aborted for c in nccl.comms] == [True]


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
        await asyncio.sleep(0.1)
        posted = [a for a in p.device.actions("rx.side1") if a.startswith("nccl_recv 64B")]
        assert len(posted) == 1  # the second waits until the first is taken
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
        nccl, ops, uid, world_size=1, rank=0, warmup=None, timeout=5, what="self"
    )
    src = torch.arange(32, dtype=torch.int32)
    dst = torch.zeros(32, dtype=torch.int32)
    endpoint.exchange(src, dst, peer=0)
    await endpoint.wait(endpoint.stream.record_event(), timeout=5, what="self exchange")
    assert torch.equal(src, dst)
    assert device.actions("solo.side1")[:2] == ["nccl_send 128B", "nccl_recv 128B"]
    await endpoint.abort(timeout=5)
    assert nccl.comms[0].aborted
