"""Host <-> device staging: stream ordering and waiting, checked with fake streams."""

from __future__ import annotations

import asyncio

import pytest
import torch

from aiokvpipe.cuda.staging import copy_to_device, copy_to_host, to_device, to_host
from aiokvpipe.cuda.testing import FakeDevice, FakeOps
from aiokvpipe.errors import CudaUnavailableError, TransferTimeout


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
