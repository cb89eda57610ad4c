"""The CUDA IPC transport's protocol on CPU.

Memory "handles" are raw pointers into CPU tensors (the same in-process path
two ranks of one process use on a GPU), streams are fakes. What is real:
the hello, header + descriptor framing, the host wait for the producer, the
receiver's copy ordering, reference-counted mappings closed before the
acknowledgement, and done resolving only on that acknowledgement.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from aiokvpipe import PipeConfig
from aiokvpipe.cuda.control import ControlSocket, HelloKind
from aiokvpipe.cuda.testing import FakeDevice, FakeOps
from aiokvpipe.errors import (
    MalformedFrameError,
    PeerClosedError,
    ProtocolError,
    TransferTimeout,
)
from aiokvpipe.tensors import header_for
from aiokvpipe.transport.base import Link, OutgoingMessage
from aiokvpipe.transport.cuda_ipc import (
    ACK,
    ACK_MAGIC,
    DESCRIPTOR,
    CudaIpcRecvChannel,
    CudaIpcSendChannel,
    InProcessMemory,
    Mappings,
    _in_process,
)
from aiokvpipe.transport.testing import link_pair
from aiokvpipe.wire import HEADER_SIZE, decode_header


@dataclass
class LoggingMemory(InProcessMemory):
    """In-process memory that logs opens/closes and can freeze the device on open."""

    log: list[str] = field(default_factory=list)
    pause: FakeDevice | None = None
    slab: torch.Tensor | None = None  # export every tensor as part of this one allocation
    lie_about_size: int | None = None

    def export(self, tensor: torch.Tensor) -> tuple[int, int, bytes]:
        if self.slab is not None:
            base = self.slab.data_ptr()
            size = self.slab.numel() * self.slab.element_size()
            return base, size, self._HANDLE.pack(base, size).ljust(64, b"\0")
        base, size, handle = super().export(tensor)
        if self.lie_about_size is not None:
            size = self.lie_about_size
            handle = self._HANDLE.pack(base, size).ljust(64, b"\0")
        return base, size, handle

    def open(self, handle: bytes) -> tuple[int, int]:
        self.log.append("open")
        if self.pause is not None:
            self.pause.paused = True
        return super().open(handle)

    def close(self, base: int) -> None:
        self.log.append("close")


@dataclass
class Pair:
    device: FakeDevice
    memory: LoggingMemory
    sender: CudaIpcSendChannel
    receiver: CudaIpcRecvChannel
    seq: int = 0

    def send(self, tensor: torch.Tensor | None) -> OutgoingMessage:
        return submit(self.sender, self, tensor)


def submit(
    sender: CudaIpcSendChannel, counter: Any, tensor: torch.Tensor | None
) -> OutgoingMessage:
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    message = OutgoingMessage(header_for(counter.seq, tensor), tensor, done)
    counter.seq += 1
    sender.submit(message)
    return message


async def open_pair(memory: LoggingMemory | None = None, **config: Any) -> Pair:
    config.setdefault("connect_timeout", 5.0)
    send_link, recv_link = link_pair(PipeConfig(rank=0, **config))
    device = FakeDevice()
    memory = memory if memory is not None else LoggingMemory()
    sender = CudaIpcSendChannel.open(send_link, memory=memory, ops=FakeOps(device, "tx"))
    receiver = CudaIpcRecvChannel.open(recv_link, memory=memory, ops=FakeOps(device, "rx"))
    return Pair(device, memory, sender, receiver)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    p = await open_pair()
    try:
        yield p
    finally:
        await p.sender.aclose(graceful=False)
        await p.receiver.aclose()


SAMPLES = [
    torch.arange(12, dtype=torch.float32).reshape(3, 4),
    None,
    torch.tensor(2.5, dtype=torch.float64),
    torch.empty(2, 0, dtype=torch.int32),
    torch.tensor([True, False]),
    torch.randn(5, 2).to(torch.bfloat16),
    torch.arange(12, dtype=torch.int16).reshape(3, 4).t(),  # non-contiguous
]


async def test_round_trip_in_order_then_graceful_close(pair: Pair) -> None:
    messages = [pair.send(t) for t in SAMPLES]
    for sent in SAMPLES:
        got = await asyncio.wait_for(pair.receiver.recv(), 5)
        if sent is None:
            assert got is None
        else:
            assert got is not None and torch.equal(got, sent)
            assert got.data_ptr() != sent.data_ptr() or sent.numel() == 0  # a copy, not a view
    await asyncio.wait_for(asyncio.gather(*(m.done for m in messages)), 5)
    await asyncio.wait_for(pair.sender.aclose(), 5)
    with pytest.raises(PeerClosedError, match="closed the pipe"):
        await pair.receiver.recv()
    assert pair.receiver.mappings.busy_count == 0
    await pair.receiver.aclose()
    assert pair.receiver.mappings.open_count == 0  # closing unmaps what the cache kept
    with_payload = sum(1 for t in SAMPLES if t is not None and t.numel())
    assert pair.memory.log.count("open") == pair.memory.log.count("close") == with_payload


async def test_done_only_after_the_receiver_copied() -> None:
    p = await open_pair()
    try:
        p.memory.pause = p.device  # freeze the device as soon as the receiver maps
        tensor = torch.arange(8, dtype=torch.float32)
        message = p.send(tensor)
        for _ in range(200):
            if p.memory.log:
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        assert p.memory.log == ["open"]
        assert not message.done.done()  # the copy has not run: the sender must hold on
        p.memory.pause = None
        p.device.paused = False
        await asyncio.wait_for(message.done, 5)
        assert p.memory.log == ["open"]  # the mapping stays cached for the next message
        assert p.receiver.mappings.busy_count == 0  # ...but no copy reads it
        assert torch.equal(await asyncio.wait_for(p.receiver.recv(), 5), tensor)
    finally:
        await p.sender.aclose()
        await p.receiver.aclose()


async def test_one_mapping_per_allocation_in_flight() -> None:
    slab = torch.arange(64, dtype=torch.float32)
    memory = LoggingMemory(slab=slab)
    p = await open_pair(memory)
    try:
        memory.pause = p.device
        first, second = slab[:16], slab[16:48]
        messages = [p.send(first), p.send(second)]
        for i, m in enumerate(messages):
            m.done.add_done_callback(lambda _f, i=i: memory.log.append(f"done {i}"))
        for _ in range(200):
            if p.receiver.mappings.open_count and len(p.device.actions("rx.side1")) >= 8:
                break
            await asyncio.sleep(0.005)
        assert memory.log == ["open"]  # both in flight, one mapping
        memory.pause = None
        p.device.paused = False
        await asyncio.wait_for(asyncio.gather(*(m.done for m in messages)), 5)
        assert memory.log.count("open") == 1 and memory.log.count("close") == 0
        assert torch.equal(await p.receiver.recv(), first)
        assert torch.equal(await p.receiver.recv(), second)
    finally:
        await p.sender.aclose()
        await p.receiver.aclose()


async def test_receiver_copy_ordering(pair: Pair) -> None:
    message = pair.send(torch.ones(4))
    await asyncio.wait_for(pair.receiver.recv(), 5)
    await message.done
    actions = pair.device.actions("rx.side1")
    assert actions[0].startswith("wait rx.current-")  # the buffer's stream first
    assert actions[1] == "copy 16xtorch.uint8"
    assert actions[2] == "record_stream"
    assert actions[3].startswith("record rx.side1-")


async def test_out_of_range_descriptor_is_refused() -> None:
    p = await open_pair(LoggingMemory(lie_about_size=4))
    try:
        message = p.send(torch.ones(4))  # 16 bytes in a "4-byte allocation"
        with pytest.raises(MalformedFrameError, match="allocation of 4"):
            await asyncio.wait_for(p.receiver.recv(), 5)
        with pytest.raises(PeerClosedError):
            await asyncio.wait_for(message.done, 5)
        assert p.receiver.mappings.open_count == 0
    finally:
        await p.sender.aclose()
        await p.receiver.aclose()


def test_same_pid_in_another_process_is_not_in_process() -> None:
    """Issue 16, defect 6: two containers of one pod share boot id and
    namespaces and can both be pid 1; the random process id tells them apart."""
    send_link, recv_link = link_pair(PipeConfig(rank=0, connect_timeout=5.0))
    try:
        assert _in_process(send_link)
        assert send_link.peer.pid == send_link.local.pid
        assert send_link.peer.host_id == send_link.local.host_id
        twin = dataclasses.replace(send_link.peer, process_id="the other container")
        assert not _in_process(dataclasses.replace(send_link, peer=twin))
    finally:
        send_link.sock.close()
        recv_link.sock.close()


async def test_both_ends_must_agree_on_in_process() -> None:
    send_link, recv_link = link_pair(PipeConfig(rank=0, connect_timeout=5.0))
    other = dataclasses.replace(recv_link.peer, pid=1, process_id="another process")
    recv_link = dataclasses.replace(recv_link, peer=other)
    device = FakeDevice()
    sender = CudaIpcSendChannel.open(send_link, memory=InProcessMemory(), ops=FakeOps(device))
    receiver = CudaIpcRecvChannel.open(recv_link, memory=InProcessMemory(), ops=FakeOps(device))
    try:
        with pytest.raises(ProtocolError, match="thinks it is in this process"):
            await asyncio.wait_for(receiver.recv(), 5)
    finally:
        await sender.aclose()
        await receiver.aclose()


class ManualReceiver:
    """The test plays the receiving rank by hand, on the raw socket."""

    def __init__(self, link: Link) -> None:
        self.control = ControlSocket(link.sock, describe="manual", op_timeout=5.0)

    async def handshake(self) -> None:
        assert await self.control.recv_hello(HelloKind.CUDA_IPC) == b"\x01"
        await self.control.send_hello(HelloKind.CUDA_IPC)

    async def frame(self) -> tuple[Any, tuple[int, int, int, bytes]]:
        header = decode_header(
            await self.control.recv_exact(HEADER_SIZE), expected_seq=0, max_frame_bytes=1 << 20
        )
        return header, DESCRIPTOR.unpack(await self.control.recv_exact(DESCRIPTOR.size))


@pytest.fixture
async def manual() -> AsyncIterator[tuple[CudaIpcSendChannel, ManualReceiver, FakeDevice, Any]]:
    send_link, recv_link = link_pair(PipeConfig(rank=0, connect_timeout=5.0, op_timeout=0.2))
    device = FakeDevice()
    sender = CudaIpcSendChannel.open(send_link, memory=InProcessMemory(), ops=FakeOps(device, "tx"))
    peer = ManualReceiver(recv_link)
    counter = type("Counter", (), {"seq": 0})()
    await peer.handshake()
    try:
        yield sender, peer, device, counter
    finally:
        await sender.aclose(graceful=False)
        peer.control.close()


async def test_wire_format_and_wrong_ack(manual: Any) -> None:
    sender, peer, _, counter = manual
    tensor = torch.arange(6, dtype=torch.int32)
    message = submit(sender, counter, tensor)
    header, (base, size, offset, _handle) = await peer.frame()
    assert (header.seq, header.nbytes, header.shape) == (0, 24, (6,))
    assert base + offset == tensor.data_ptr() and size == 24
    await peer.control.send(ACK.pack(ACK_MAGIC, 5))  # acknowledges the wrong frame
    with pytest.raises(ProtocolError, match="acknowledgement of seq 0"):
        await asyncio.wait_for(message.done, 5)


async def test_missing_ack_times_out(manual: Any) -> None:
    sender, peer, _, counter = manual
    message = submit(sender, counter, torch.ones(2))
    await peer.frame()
    with pytest.raises(TransferTimeout, match="receiving 12 control bytes"):
        await asyncio.wait_for(message.done, 5)
    assert isinstance(sender.error, TransferTimeout)


async def test_host_waits_for_the_producer(manual: Any) -> None:
    sender, peer, device, counter = manual
    device.paused = True  # the producer's kernels have not finished
    message = submit(sender, counter, torch.ones(2))
    arriving = asyncio.ensure_future(peer.frame())
    await asyncio.sleep(0.05)
    assert not arriving.done()  # nothing leaves before the fence completes
    device.paused = False
    header, _ = await asyncio.wait_for(arriving, 5)
    assert header.nbytes == 8
    await peer.control.send(ACK.pack(ACK_MAGIC, 0))
    await asyncio.wait_for(message.done, 5)


async def test_mappings_are_cached_per_peer_allocation() -> None:
    """One open per sender allocation, however many messages come from it."""
    slab = torch.arange(64, dtype=torch.float32)
    memory = LoggingMemory(slab=slab)
    p = await open_pair(memory)
    try:
        for i in range(5):  # one after the other: each copy done before the next
            message = p.send(slab[i * 8 : (i + 1) * 8])
            got = await asyncio.wait_for(p.receiver.recv(), 5)
            assert torch.equal(got, slab[i * 8 : (i + 1) * 8])
            await asyncio.wait_for(message.done, 5)
        assert memory.log == ["open"]
    finally:
        await p.sender.aclose()
        await p.receiver.aclose()
    assert memory.log == ["open", "close"]  # unmapped when the channel closed


def test_a_new_allocation_at_a_cached_address_is_mapped_afresh() -> None:
    memory = LoggingMemory()
    mappings = Mappings(memory, max_idle=2)
    first = InProcessMemory._HANDLE.pack(0x1000, 64).ljust(64, b"\0")
    again = InProcessMemory._HANDLE.pack(0x1000, 128).ljust(64, b"\0")  # freed, reallocated
    assert mappings.acquire(0x1000, first, 0, 64) == 0x1000
    mappings.release(0x1000)
    assert mappings.acquire(0x1000, again, 64, 64) == 0x1000 + 64
    assert memory.log == ["open", "close", "open"]
    with pytest.raises(ProtocolError, match="two live allocations"):
        mappings.acquire(0x1000, first, 0, 8)  # the old one cannot be live beside the new
    mappings.release(0x1000)
    for base in (0x2000, 0x3000, 0x4000):  # idle mappings beyond max_idle are unmapped
        mappings.acquire(base, InProcessMemory._HANDLE.pack(base, 8).ljust(64, b"\0"), 0, 8)
        mappings.release(base)
    assert mappings.open_count == 2 and memory.log.count("close") == 1 + 2
