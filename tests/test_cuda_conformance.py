"""The Pipe conformance suite through the GPU transports' protocols, on CPU.

Real Pipes, rendezvous, sockets, handshakes, framing, ordering and close
handshakes; only the device is faked: each transport's runtime seam returns
fake streams (and a fake NCCL that moves real bytes), so "GPU" tensors are
CPU tensors and the suite's CPU-result checks apply unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from transport_conformance import CHECKS, MakePipes, assert_all_same, opened, pipe_factory, tagged

from aiokvpipe import PipeConfig, pipe
from aiokvpipe.cuda.testing import FakeDevice, FakeNccl, FakeNcclError, FakeOps
from aiokvpipe.errors import CudaTransferError
from aiokvpipe.ports import free_port
from aiokvpipe.transport import cuda_ipc, nccl
from aiokvpipe.transport.base import Link

GPU_TRANSPORTS = ["nccl", "cuda_ipc"]


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> FakeNccl:
    device = FakeDevice()
    fake_nccl = FakeNccl(device)

    async def nccl_runtime(link: Link) -> tuple[Any, Any]:
        return fake_nccl, FakeOps(device, f"r{link.local.rank}{link.role}")

    async def ipc_runtime(link: Link) -> tuple[Any, Any]:
        return cuda_ipc.InProcessMemory(), FakeOps(device, f"r{link.local.rank}{link.role}")

    monkeypatch.setattr(nccl, "_runtime", nccl_runtime)
    monkeypatch.setattr(cuda_ipc, "_runtime", ipc_runtime)
    monkeypatch.setattr(pipe, "require_usable_device", lambda device, transport: None)
    return fake_nccl


def on_fake_gpu(transport: str) -> MakePipes:
    """``make_pipes`` whose ranks ask for a CUDA device (served by the fakes)."""
    base = pipe_factory(transport)

    async def make_pipes(world_size: int = 2, **overrides: Any) -> list[Any]:
        overrides.setdefault("device", "cuda:0")
        return await base(world_size, **overrides)

    return make_pipes


@pytest.mark.usefixtures("fake_gpu")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_") for c in CHECKS])
@pytest.mark.parametrize("transport", GPU_TRANSPORTS)
async def test_conformance(transport: str, check: Callable[[MakePipes], Awaitable[None]]) -> None:
    await check(on_fake_gpu(transport))


@pytest.mark.timeout(30)
async def test_auto_picks_cuda_ipc_on_one_host(fake_gpu: FakeNccl) -> None:
    async with opened(on_fake_gpu("auto")) as (a, b):
        assert (a.send_transport, a.recv_transport) == ("cuda_ipc", "cuda_ipc")
        await a.send(tagged(1))
        assert_all_same([await b.recv()], [tagged(1)])
    assert not fake_gpu.comms  # NCCL never touched


@pytest.mark.timeout(30)
async def test_nccl_pipe_aborts_every_communicator_on_close(fake_gpu: FakeNccl) -> None:
    async with opened(on_fake_gpu("nccl")) as (a, b):
        await a.send(tagged(1))
        await b.send(tagged(2))
        assert_all_same([await b.recv(), await a.recv()], [tagged(1), tagged(2)])
    assert len(fake_gpu.comms) == 4  # one two-rank communicator per direction
    assert all(c.aborted for c in fake_gpu.comms)


@pytest.mark.timeout(30)
async def test_gpu_set_up_failure_is_raised_by_connect(fake_gpu: FakeNccl) -> None:
    """Issue 15.2: a communicator that cannot be built fails connect, not the first send."""
    fake_gpu.fail_init = FakeNcclError("ncclSystemError: no route to the peer")
    port = free_port()
    configs = [
        PipeConfig(rank=r, port=port, device="cuda:0", transport="nccl", connect_timeout=10.0)
        for r in range(2)
    ]
    results = await asyncio.gather(*(pipe.Pipe.connect(c) for c in configs), return_exceptions=True)
    assert all(isinstance(r, CudaTransferError) for r in results), results
    assert any("ncclSystemError" in str(r) for r in results)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("transport", GPU_TRANSPORTS)
async def test_send_waits_for_the_fence_it_is_given(fake_gpu: FakeNccl, transport: str) -> None:
    """``send(ready=stream)``: the transfer is ordered after that stream, not the current one."""
    async with opened(on_fake_gpu(transport)) as (a, b):
        producer = fake_gpu.device.stream("producer")
        await a.send(tagged(1), ready=producer)
        assert_all_same([await b.recv()], [tagged(1)])
    assert fake_gpu.device.actions("producer") == ["record producer-1"]  # marked at send
    assert fake_gpu.device.actions("r0send.current") == []  # not the current stream
    if transport == "nccl":  # (cuda_ipc waits for it on the host instead)
        assert "wait producer-1" in fake_gpu.device.actions("r0send.side1")
