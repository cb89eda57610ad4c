"""Host <-> device staging: stream ordering and waiting, checked with fake streams.

Also the tcp receiver that stages into a GPU (what ``auto`` picks for a CPU
producer and a GPU consumer), with the device copy faked.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from aiokvpipe import PipeConfig
from aiokvpipe.cuda import staging
from aiokvpipe.cuda.staging import copy_to_device, copy_to_host, to_device, to_host
from aiokvpipe.cuda.testing import FakeDevice, FakeOps
from aiokvpipe.errors import CudaTransferError, CudaUnavailableError, TransferTimeout
from aiokvpipe.tensors import header_for
from aiokvpipe.transport.base import OutgoingMessage
from aiokvpipe.transport.tcp import TcpTransport
from aiokvpipe.transport.testing import link_pair


async def test_cpu_tensors_pass_through() -> None:
    t = torch.arange(4)
    assert await to_host(t) is t
    assert await to_device(t, "cpu") is t


async def test_device_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(CudaUnavailableError, match=r"aiokvpipe\[cuda12\]"):
        await to_device(torch.arange(4), "cuda:0")


async def test_to_host_orders_after_the_producer_and_waits() -> None:
    ops = FakeOps(FakeDevice())
    ops.fake.paused = True
    src = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # non-contiguous
    copying = asyncio.ensure_future(copy_to_host(src, ops))
    await asyncio.sleep(0.02)
    assert not copying.done()  # polling, not returning early (nor blocking the loop)
    ops.fake.paused = False
    host = await asyncio.wait_for(copying, 5)
    assert torch.equal(host, src) and host.is_contiguous()
    assert ops.fake.actions("current") == ["record current-1"]  # the producer fence
    assert ops.fake.actions("staging") == [
        "wait current-1",
        "copy 12xtorch.float32",
        "record_stream",
        "record staging-1",
    ]


async def test_to_device_fences_destination_and_source() -> None:
    ops = FakeOps(FakeDevice())
    producer = ops.fake.stream("other-gpu")
    src_ready = producer.record_event()
    src = torch.randn(3, 5)
    dst = await asyncio.wait_for(copy_to_device(src, ops, src_ready=src_ready), 5)
    assert torch.equal(dst, src) and dst.data_ptr() != src.data_ptr()
    assert ops.fake.actions("staging") == [
        "wait current-1",  # dst may be memory queued kernels just freed
        "wait other-gpu-1",  # the source's producer
        "copy 15xtorch.float32",
        "record_stream",
        "record staging-1",
    ]


async def test_staging_is_bounded_by_its_timeout() -> None:
    ops = FakeOps(FakeDevice())
    ops.fake.paused = True
    with pytest.raises(TransferTimeout, match="copy of 16 bytes to the host"):
        await copy_to_host(torch.ones(4), ops, timeout=0.05)


async def test_staging_reuses_one_stream_per_device() -> None:
    """No new stream per copy: every staging copy of a device goes on its one stream."""
    ops = FakeOps(FakeDevice())
    for _ in range(3):
        await asyncio.wait_for(copy_to_host(torch.ones(4), ops), 5)
        await asyncio.wait_for(copy_to_device(torch.ones(4), ops), 5)
    assert ops.new_streams == 0
    assert ops.fake.actions("staging").count("copy 4xtorch.float32") == 6


async def test_staging_waits_for_an_explicit_fence() -> None:
    """``ready=`` names the producer: an event, or a stream marked at call time."""
    ops = FakeOps(FakeDevice())
    producer = ops.fake.stream("producer")
    await asyncio.wait_for(copy_to_host(torch.ones(2), ops, ready=producer), 5)
    event = producer.record_event()
    await asyncio.wait_for(copy_to_host(torch.ones(2), ops, ready=event), 5)
    waits = [a for a in ops.fake.actions("staging") if a.startswith("wait")]
    assert waits == ["wait producer-1", "wait producer-2"]
    assert ops.fake.actions("current") == []  # the current stream was not the fence


class _GpuReceiverOverTcp:
    """A tcp link whose receiving end asks for ``cuda:0``; staging runs on fake streams."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> None:
        self.ops = FakeOps(FakeDevice())
        self.copies = 0

        async def fake_to_device(
            tensor: torch.Tensor, device: Any, *, timeout: float | None = None, ready: Any = None
        ) -> torch.Tensor:
            self.copies += 1
            if self.copies == fail_at:
                raise CudaTransferError(f"copy {self.copies} to {device} failed")
            return await copy_to_device(tensor, self.ops, timeout=timeout)

        monkeypatch.setattr(staging, "to_device", fake_to_device)

    async def __aenter__(self) -> tuple[Any, Any]:
        config = PipeConfig(rank=0, device="cuda:0", connect_timeout=5.0)
        send_link, recv_link = link_pair(config)
        self.sender = await TcpTransport.open_sender(send_link)
        self.receiver = await TcpTransport.open_receiver(recv_link)
        return self.sender, self.receiver

    async def __aexit__(self, *exc: object) -> None:
        await self.sender.aclose(graceful=False)
        await self.receiver.aclose()


def _submit(sender: Any, seq: int, tensor: torch.Tensor | None) -> asyncio.Future[None]:
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    sender.submit(OutgoingMessage(header_for(seq, tensor), tensor, done))
    return done


@pytest.mark.timeout(15)
async def test_gpu_receiver_over_tcp_gets_every_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15.1: once a device copy had landed, recv looped on it without yielding."""
    gpu = _GpuReceiverOverTcp(monkeypatch)
    async with gpu as (sender, receiver):
        sent = [torch.full((3,), float(i)) for i in range(4)]
        done = [_submit(sender, i, t if i != 2 else None) for i, t in enumerate(sent)]
        for i, tensor in enumerate(sent):
            got = await asyncio.wait_for(receiver.recv(), 5)
            if i == 2:
                assert got is None
            else:
                assert torch.equal(got, tensor)
        await asyncio.wait_for(asyncio.gather(*done), 5)
    assert gpu.copies == 3
    assert gpu.ops.fake.actions("staging").count("copy 3xtorch.float32") == 3


@pytest.mark.timeout(15)
async def test_failed_device_copy_fails_the_receiver(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = _GpuReceiverOverTcp(monkeypatch, fail_at=2)
    async with gpu as (sender, receiver):
        for i in range(3):
            _submit(sender, i, torch.ones(2) * i)
        assert torch.equal(await asyncio.wait_for(receiver.recv(), 5), torch.zeros(2))
        for _ in range(2):  # the hole is not skipped: every later recv fails alike
            with pytest.raises(CudaTransferError, match="copy 2 to cuda:0 failed"):
                await asyncio.wait_for(receiver.recv(), 5)
