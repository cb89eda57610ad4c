"""The GPU paths on a real device (``nox -s gpu``); skipped where there is none.

With one GPU, NCCL refuses two ranks on the same device, so NCCL is exercised
with a grouped send/receive to itself in one process (a one-rank
communicator) and, where two GPUs exist, with a two-rank Pipe in one process;
CUDA IPC runs between two processes on the one GPU (spawned) and between two
ranks of one process.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.resource_tracker
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from aiokvpipe import PipeConfig
from aiokvpipe.cuda.events import wait_event, wait_stream
from aiokvpipe.cuda.runtime import cuda_available, nccl_or_raise
from aiokvpipe.cuda.staging import to_device, to_host
from aiokvpipe.cuda.streams import TorchCudaOps, dedicated_stream, staging_stream
from aiokvpipe.errors import CudaUnavailableError
from aiokvpipe.pipe import Pipe
from aiokvpipe.ports import free_port
from aiokvpipe.transport.nccl import create_endpoint, unique_id_bytes

requires_cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.cuda, requires_cuda]

DEVICE = torch.device("cuda", 0)
_gpu_sleep: Any = torch.cuda._sleep  # a kernel spinning for N clock cycles (untyped)


def _nccl_or_skip() -> Any:
    try:
        return nccl_or_raise("the NCCL tests")
    except CudaUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module", autouse=True)
def warm_cuda() -> Iterator[None]:
    """Open CUDA's (and NCCL's, and multiprocessing's) process-wide fds up front,
    on every device a test may use, so the per-test leak check sees only what
    a test itself leaves behind."""
    torch.cuda.init()  # type: ignore[no-untyped-call]
    torch.empty(1, pin_memory=True)
    try:
        nccl = nccl_or_raise("warm-up")
    except CudaUnavailableError:
        nccl = None
    for index in range(torch.cuda.device_count()):
        device = torch.device("cuda", index)
        torch.empty(1, device=device).add_(1)
        dedicated_stream(device)  # cupy's per-device state, as the transports create it
        staging_stream(device)
        torch.cuda.synchronize(device)
        if nccl is not None:
            with torch.cuda.device(device):
                comm = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
                comm.abort()
    multiprocessing.resource_tracker.ensure_running()
    yield


class NoSync:
    """Wraps a torch event; any synchronize() on it fails the test."""

    def __init__(self, event: Any) -> None:
        self.event = event

    def query(self) -> bool:
        return bool(self.event.query())

    def synchronize(self) -> None:
        raise AssertionError("synchronize() called on the event loop")


async def test_wait_event_on_a_real_kernel_keeps_the_loop_running() -> None:
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.ensure_future(ticker())
    _gpu_sleep(200_000_000)  # ~0.1 s of GPU time at ~2 GHz
    event = torch.cuda.current_stream(DEVICE).record_event()
    started = time.perf_counter()
    await wait_event(NoSync(event), timeout=30)
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    assert event.query()
    assert ticks >= elapsed / 0.01  # the loop kept ticking while the GPU worked


async def test_wait_stream_and_cupy_events() -> None:
    _gpu_sleep(10_000_000)
    await wait_stream(torch.cuda.current_stream(DEVICE), timeout=30)
    cupy = pytest.importorskip("cupy")
    with cupy.cuda.Device(0):
        x = cupy.arange(1 << 20)
        event = cupy.cuda.Event()
        event.record()
        await wait_event(event, timeout=30)
        assert event.done
        assert int(x.sum()) == (1 << 20) * ((1 << 20) - 1) // 2


async def test_staging_round_trip() -> None:
    src = torch.randn(64, 33, device=DEVICE)
    host = await to_host(src.t())  # non-contiguous device tensor
    assert host.device.type == "cpu" and host.is_pinned()
    assert torch.equal(host, src.t().cpu())
    back = await to_device(host, "cuda:0")
    assert back.device == DEVICE and torch.equal(back, src.t())
    pageable = torch.arange(1000, dtype=torch.int16)
    assert torch.equal((await to_device(pageable, "cuda")).cpu(), pageable)


async def test_nccl_grouped_self_send_recv() -> None:
    nccl = _nccl_or_skip()
    ops = TorchCudaOps(DEVICE)
    uid = unique_id_bytes(nccl.get_unique_id())
    endpoint = await create_endpoint(nccl, ops, uid, world_size=1, rank=0, timeout=60, what="self")
    try:
        for nbytes in (1, 4096, 64 << 20):
            src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=DEVICE)
            dst = torch.zeros_like(src)
            endpoint.stream.wait_stream(torch.cuda.current_stream(DEVICE))
            event = await endpoint.exchange(src, dst, peer=0)
            await endpoint.wait(event, timeout=30, what="self send/recv")
            assert torch.equal(src, dst)
        endpoint.check()  # no asynchronous error pending
    finally:
        await endpoint.abort(timeout=30)


SAMPLES = [
    torch.arange(12, dtype=torch.float32).reshape(3, 4),
    None,
    torch.tensor(1.5, dtype=torch.float64),
    torch.empty(0, 4, dtype=torch.int32),
    torch.randn(128, 64).to(torch.bfloat16).t(),
    torch.arange(1 << 20, dtype=torch.int64),
]


async def _ring_pair(transport: str, devices: tuple[str, str]) -> tuple[Pipe, Pipe]:
    port = free_port()
    configs = [
        PipeConfig(
            rank=r,
            port=port,
            device=devices[r],
            transport=transport,  # type: ignore[arg-type]
            connect_timeout=60.0,
            op_timeout=30.0,
        )
        for r in range(2)
    ]
    a, b = await asyncio.gather(*(Pipe.connect(c) for c in configs))
    return a, b


async def _exchange_and_check(a: Pipe, b: Pipe, receiver_device: torch.device) -> None:
    for item in SAMPLES:
        await a.send(item if item is None else item.to(DEVICE))
    await a.send(torch.arange(10))  # a CPU tensor is staged onto the GPU
    for item in [*SAMPLES, torch.arange(10)]:
        got = await asyncio.wait_for(b.recv(), 30)
        if item is None:
            assert got is None
            continue
        assert got is not None and got.device == receiver_device
        assert torch.equal(got.cpu(), item.contiguous())
    await asyncio.wait_for(a.flush(), 30)


async def test_transport_streams_are_dedicated() -> None:
    """Not torch's pool: a fresh non-blocking stream per direction, one staging stream."""
    ops = TorchCudaOps(DEVICE)
    first, second = ops.new_stream(), ops.new_stream()
    pool = {torch.cuda.Stream(DEVICE).cuda_stream for _ in range(64)}  # type: ignore[no-untyped-call]
    assert first.cuda_stream != second.cuda_stream
    assert not {first.cuda_stream, second.cuda_stream} & pool
    assert ops.staging_stream() is ops.staging_stream()
    assert ops.staging_stream().cuda_stream not in pool


@pytest.mark.parametrize(
    ("transport", "devices"),
    [("tcp", ("cpu", "cuda:0")), ("tcp", ("cuda:0", "cpu")), ("auto", ("cpu", "cuda:0"))],
)
async def test_cuda_tensors_staged_over_tcp(transport: str, devices: tuple[str, str]) -> None:
    """CPU<->GPU pairs (what auto picks tcp for): GPU tensors are staged through the host."""
    a, b = await _ring_pair(transport, devices)
    try:
        assert a.send_transport == "tcp"
        receiver_device = torch.device(devices[1] if devices[1] == "cpu" else DEVICE)
        for item in SAMPLES:
            sent = item if item is None or devices[0] == "cpu" else item.to(DEVICE)
            await a.send(sent)
        for item in SAMPLES:
            got = await asyncio.wait_for(b.recv(), 30)
            if item is None:
                assert got is None
                continue
            assert got is not None and got.device == receiver_device
            assert torch.equal(got.cpu(), item.contiguous())
        await asyncio.wait_for(a.flush(), 30)
    finally:
        await a.aclose()
        await b.aclose()


async def test_send_with_an_explicit_fence() -> None:
    """``send(ready=stream)``: the transfer waits for work on that stream, not the current one."""
    a, b = await _ring_pair("cuda_ipc", ("cuda:0", "cuda:0"))
    side: Any = torch.cuda.Stream(DEVICE)  # type: ignore[no-untyped-call]
    try:
        src = torch.zeros(1 << 20, device=DEVICE)
        with torch.cuda.stream(side):
            _gpu_sleep(20_000_000)  # the producer is still busy...
            src.fill_(7.0)  # ...when this lands
        await a.send(src, ready=side)
        got = await asyncio.wait_for(b.recv(), 30)
        assert got is not None and bool((got == 7.0).all())
    finally:
        await a.aclose()
        await b.aclose()


async def test_cuda_ipc_between_ranks_of_one_process() -> None:
    a, b = await _ring_pair("cuda_ipc", ("cuda:0", "cuda:0"))
    try:
        assert a.send_transport == "cuda_ipc"
        await _exchange_and_check(a, b, DEVICE)
        await _exchange_and_check(b, a, DEVICE)
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.skipif(not cuda_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
async def test_nccl_pipe_on_two_gpus() -> None:
    _nccl_or_skip()
    a, b = await _ring_pair("nccl", ("cuda:0", "cuda:1"))
    try:
        await _exchange_and_check(a, b, torch.device("cuda", 1))
        await _exchange_and_check(b, a, DEVICE)
    finally:
        await a.aclose()
        await b.aclose()


def _ipc_child(port: int, count: int, results: Any) -> None:
    """Rank 1 in its own process: receive on the GPU, report checksums, echo one back."""

    async def main() -> None:
        cfg = PipeConfig(
            rank=1,
            port=port,
            device="cuda:0",
            transport="cuda_ipc",
            connect_timeout=60.0,
            op_timeout=30.0,
        )
        async with await Pipe.connect(cfg) as pipe:
            sums = []
            for _ in range(count):
                got = await pipe.recv()
                assert got is not None and got.device.type == "cuda"
                sums.append(float(got.double().sum()))
            await pipe.send(torch.tensor(sums, dtype=torch.float64, device="cuda:0"))
            await pipe.flush()
            results.send(sums)

    asyncio.run(main())


@pytest.mark.timeout(180)
async def test_cuda_ipc_between_two_processes_on_one_gpu() -> None:
    port, count = free_port(), 8
    ctx = multiprocessing.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_ipc_child, args=(port, count, writer))
    child.start()
    writer.close()
    try:
        cfg = PipeConfig(
            rank=0,
            port=port,
            device="cuda:0",
            transport="cuda_ipc",
            connect_timeout=60.0,
            op_timeout=30.0,
        )
        async with await Pipe.connect(cfg) as pipe:
            assert pipe.send_transport == "cuda_ipc"
            sent = [torch.randn(1 << (10 + i), device=DEVICE) for i in range(count)]
            for t in sent:
                await pipe.send(t)
            echoed = await asyncio.wait_for(pipe.recv(), 60)
            await pipe.flush()
        expected = [float(t.double().sum()) for t in sent]
        assert echoed is not None
        assert echoed.cpu().tolist() == pytest.approx(expected)
        assert await _poll(lambda: reader.poll(0), 60)
        assert reader.recv() == pytest.approx(expected)
    finally:
        await _poll(lambda: not child.is_alive(), 60)
        if child.is_alive():
            child.kill()
            child.join()
        exitcode = child.exitcode
        child.close()
        reader.close()
    assert exitcode == 0


async def _poll(condition: Any, seconds: float) -> bool:
    """Wait for ``condition()`` without blocking the loop or starting threads."""
    limit = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > limit:
            return False
        await asyncio.sleep(0.02)
    return True
