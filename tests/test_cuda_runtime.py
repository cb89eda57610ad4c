"""Availability probing, lazy imports, error translation, off-loop blocking calls."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import types
from typing import Any

import pytest
import torch

from aiokvpipe import Endpoint, EndpointConfig, PipeConfig
from aiokvpipe.cuda import runtime
from aiokvpipe.cuda.blocking import run_blocking
from aiokvpipe.cuda.control import ControlSocket, HelloKind
from aiokvpipe.errors import (
    CudaTransferError,
    CudaUnavailableError,
    PeerClosedError,
    TransferTimeout,
)
from aiokvpipe.pipe import Pipe
from aiokvpipe.ports import free_port
from aiokvpipe.transport.cuda_ipc import CudaIpcTransport
from aiokvpipe.transport.nccl import NcclTransport
from aiokvpipe.transport.testing import link_pair


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process has a CUDA build of torch but no usable device."""
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_importing_the_package_never_imports_cupy() -> None:
    code = (
        "import sys\n"
        "import aiokvpipe, aiokvpipe.transport.nccl, aiokvpipe.transport.cuda_ipc\n"
        "import aiokvpipe.cuda.events, aiokvpipe.cuda.staging, aiokvpipe.bench.cuda\n"
        "assert 'cupy' not in sys.modules, 'cupy imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True, timeout=120)


def test_cpu_torch_build_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(CudaUnavailableError, match=r"no CUDA support.*aiokvpipe\[cuda12\]"):
        runtime.require_cuda("transport 'nccl'")
    assert not runtime.cuda_available()


@pytest.mark.usefixtures("no_cuda")
def test_missing_device_is_reported() -> None:
    with pytest.raises(CudaUnavailableError, match="transport 'nccl' needs a CUDA GPU"):
        runtime.require_cuda("transport 'nccl'", "cuda:0")


@pytest.mark.usefixtures("one_gpu")
def test_device_resolution() -> None:
    assert runtime.require_cuda("x", "cuda") == torch.device("cuda", 0)
    assert runtime.require_cuda("x", "cuda:0") == torch.device("cuda", 0)
    with pytest.raises(CudaUnavailableError, match="only 1 CUDA device"):
        runtime.require_cuda("x", "cuda:3")
    with pytest.raises(CudaUnavailableError, match="needs a CUDA device, not cpu"):
        runtime.require_cuda("x", "cpu")


def test_cupy_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` fail
    hint = r"needs cupy.*pip install 'aiokvpipe\[cuda12\]'"
    with pytest.raises(CudaUnavailableError, match=hint):
        runtime.cupy_or_raise("transport 'cuda_ipc'")
    with pytest.raises(CudaUnavailableError, match="needs cupy"):
        runtime.nccl_or_raise("transport 'nccl'")


def _fake_cupy(monkeypatch: pytest.MonkeyPatch, nccl_available: bool) -> types.ModuleType:
    cupy = types.ModuleType("cupy")
    cuda = types.ModuleType("cupy.cuda")
    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.available = nccl_available  # type: ignore[attr-defined]
    cuda.nccl = nccl  # type: ignore[attr-defined]
    cupy.cuda = cuda  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", nccl)
    return nccl


def test_nccl_library_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cupy(monkeypatch, nccl_available=False)
    with pytest.raises(CudaUnavailableError, match="nvidia-nccl-cu12"):
        runtime.nccl_or_raise("transport 'nccl'")


def test_nccl_found(monkeypatch: pytest.MonkeyPatch) -> None:
    nccl = _fake_cupy(monkeypatch, nccl_available=True)
    assert runtime.nccl_or_raise("transport 'nccl'") is nccl


def test_cuda_errors_translates_runtime_errors_only() -> None:
    with (
        pytest.raises(CudaTransferError, match="ncclSend: unhandled cuda error") as info,
        runtime.cuda_errors("ncclSend"),
    ):
        raise RuntimeError("unhandled cuda error")
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(CudaUnavailableError), runtime.cuda_errors("x"):  # ours pass through
        raise CudaUnavailableError("no")
    with pytest.raises(KeyError), runtime.cuda_errors("x"):
        raise KeyError("not a device error")


@pytest.mark.usefixtures("no_cuda")
@pytest.mark.parametrize("transport", [NcclTransport, CudaIpcTransport])
async def test_open_without_cuda_refuses_and_tells_the_peer(transport: type) -> None:
    send_link, recv_link = link_pair()
    peer = ControlSocket(recv_link.sock, describe="peer", op_timeout=5.0)
    try:
        with pytest.raises(CudaUnavailableError, match=r"needs a CUDA GPU"):
            await transport.open_sender(send_link)
        assert send_link.sock.fileno() == -1  # the transport owned and closed it
        kind = HelloKind.NCCL if transport is NcclTransport else HelloKind.CUDA_IPC
        with pytest.raises(CudaUnavailableError, match=r"cannot use .*needs a CUDA GPU"):
            await peer.recv_hello(kind)
        with pytest.raises(PeerClosedError):
            await peer.recv_exact(1)
    finally:
        peer.close()


async def test_run_blocking_returns_and_raises() -> None:
    assert await run_blocking(lambda: threading.current_thread().daemon, timeout=5, what="x")

    def boom() -> None:
        raise RuntimeError("init failed")

    with pytest.raises(RuntimeError, match="init failed"):
        await run_blocking(boom, timeout=5, what="x")


async def test_run_blocking_timeout_hands_late_result_to_cleanup() -> None:
    release = threading.Event()
    cleaned: list[str] = []
    cleaned_event = threading.Event()

    def slow() -> str:
        release.wait(5)
        return "communicator"

    def cleanup(value: str) -> None:
        cleaned.append(value)
        cleaned_event.set()

    with pytest.raises(TransferTimeout, match="slow set-up"):
        await run_blocking(slow, timeout=0.05, what="slow set-up", on_abandoned=cleanup)
    assert not cleaned  # still running: nothing to clean yet
    release.set()
    for _ in range(500):
        if cleaned_event.is_set():
            break
        await asyncio.sleep(0.01)
    assert cleaned == ["communicator"]


async def test_run_blocking_cancelled_still_cleans_up() -> None:
    release = threading.Event()
    cleaned = threading.Event()

    def slow() -> int:
        release.wait(5)
        return 7

    task = asyncio.ensure_future(
        run_blocking(slow, timeout=None, what="x", on_abandoned=lambda _: cleaned.set())
    )
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    for _ in range(500):
        if cleaned.is_set():
            break
        await asyncio.sleep(0.01)
    assert cleaned.is_set()


async def _connect_alone(**config: Any) -> None:
    """Rank 0 of two, with nobody else coming: only an early refusal returns quickly."""
    cfg = PipeConfig(rank=0, world_size=2, port=free_port(), connect_timeout=30.0, **config)
    started = time.perf_counter()
    try:
        await asyncio.wait_for(Pipe.connect(cfg), 5)
    finally:
        assert time.perf_counter() - started < 2  # refused before waiting for rank 1


async def test_connect_on_cpu_torch_refuses_a_gpu_device_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 15.2: device="cuda:0" without CUDA failed only when a tensor arrived."""
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(CudaUnavailableError, match=r"no CUDA support.*aiokvpipe\[cuda12\]"):
        await _connect_alone(device="cuda:0")


async def test_endpoint_start_on_cpu_torch_refuses_a_gpu_device_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 15.2, the Endpoint side: start() refuses before it listens or dials."""
    monkeypatch.setattr(torch.version, "cuda", None)
    cfg = EndpointConfig(name="gpu", device="cuda:0", token="x" * 32)
    started = time.perf_counter()
    with pytest.raises(CudaUnavailableError, match=r"no CUDA support.*aiokvpipe\[cuda12\]"):
        await asyncio.wait_for(Endpoint.start(cfg), 5)
    assert time.perf_counter() - started < 2


@pytest.mark.usefixtures("one_gpu")
@pytest.mark.parametrize("transport", ["nccl", "cuda_ipc"])
async def test_connect_without_cupy_refuses_a_gpu_transport_at_once(
    monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    """Issue 15.2: transport="nccl" without NCCL waited for peers first."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(CudaUnavailableError, match=r"needs cupy.*aiokvpipe\[cuda12\]"):
        await _connect_alone(device="cuda:0", transport=transport)


@pytest.mark.usefixtures("one_gpu")
def test_require_usable_device_asks_only_what_the_transport_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)
    runtime.require_usable_device("cpu", "nccl")  # the config's business, not the device's
    runtime.require_usable_device("cuda:0", "auto")  # a CPU peer means tcp: no cupy needed
    runtime.require_usable_device("cuda:0", "tcp")
    with pytest.raises(CudaUnavailableError, match="only 1 CUDA device"):
        runtime.require_usable_device("cuda:1", "auto")
    _fake_cupy(monkeypatch, nccl_available=False)
    runtime.require_usable_device("cuda:0", "cuda_ipc")
    with pytest.raises(CudaUnavailableError, match="nvidia-nccl-cu12"):
        runtime.require_usable_device("cuda:0", "nccl")
