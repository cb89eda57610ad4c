"""Moving tensors between host and GPU without blocking the event loop.

Used when one end of a pipe is on a GPU and the other on the CPU (the tcp
transport stages device tensors through host memory), and by the GPU
transports for tensors submitted on the wrong device. Copies run on the
device's one staging stream, ordered after the application's current stream
(or the fence the caller names; see :mod:`aiokvpipe.cuda.streams`), through
page-locked host memory — a
``non_blocking`` copy from pageable memory is synchronous in disguise — and
the loop awaits the copy's event by polling instead of synchronizing.
"""

from __future__ import annotations

from typing import Any

import torch

from .events import wait_event
from .runtime import require_cuda
from .streams import DeviceOps, TorchCudaOps, after, as_fence, fence


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _is_pinned(tensor: torch.Tensor) -> bool:
    try:
        return bool(tensor.is_pinned())
    except RuntimeError:  # CPU-only torch builds cannot even ask
        return False


def pinned_like(ops: DeviceOps, tensor: torch.Tensor) -> torch.Tensor:
    """An uninitialised page-locked host tensor with ``tensor``'s dtype and shape."""
    raw = ops.empty_pinned(_nbytes(tensor))
    return raw.view(tensor.dtype).view(tensor.shape)


async def to_host(
    tensor: torch.Tensor, *, timeout: float | None = None, ready: Any | None = None
) -> torch.Tensor:
    """A CPU copy of ``tensor`` in pinned memory (CPU tensors are returned as they are).

    ``ready``: the event or stream whose work must finish before the copy
    reads ``tensor`` (default: the current stream, now).
    """
    if tensor.device.type == "cpu":
        return tensor
    ops = TorchCudaOps(require_cuda("copying a tensor to the host", tensor.device))
    return await copy_to_host(tensor, ops, timeout=timeout, ready=ready)


async def to_device(
    tensor: torch.Tensor,
    device: str | torch.device,
    *,
    timeout: float | None = None,
    ready: Any | None = None,
) -> torch.Tensor:
    """``tensor`` on ``device``, copied there asynchronously if it is elsewhere.

    Returns once the data has landed, so the result is usable on any stream.
    ``ready``: the event or stream whose work must finish before a GPU
    source is read (default: the source device's current stream, now).
    """
    target = torch.device(device)
    if target.type == "cpu":
        return await to_host(tensor, timeout=timeout, ready=ready)
    target = require_cuda(f"copying a tensor to {target}", target)
    if tensor.device == target:
        return tensor
    src_ready = None
    if tensor.is_cuda:
        src_ops = TorchCudaOps(require_cuda("reading a tensor", tensor.device))
        src_ready = fence(src_ops) if ready is None else as_fence(ready)
    return await copy_to_device(tensor, TorchCudaOps(target), src_ready=src_ready, timeout=timeout)


async def copy_to_host(
    tensor: torch.Tensor,
    ops: DeviceOps,
    *,
    timeout: float | None = None,
    ready: Any | None = None,
) -> torch.Tensor:
    """D2H copy of a tensor on ``ops.device`` (the device-independent core of to_host)."""
    host = pinned_like(ops, tensor)
    side = ops.staging_stream()
    # Kernels still writing `tensor` finish first.
    after(side, fence(ops) if ready is None else as_fence(ready))
    ops.copy(side, host, tensor)
    ops.record_stream(tensor, side)
    copied = side.record_event()
    await wait_event(copied, timeout=timeout, what=f"copy of {_nbytes(tensor)} bytes to the host")
    return host


async def copy_to_device(
    tensor: torch.Tensor,
    ops: DeviceOps,
    *,
    src_ready: Any | None = None,
    timeout: float | None = None,
) -> torch.Tensor:
    """Copy ``tensor`` (host, or another GPU whose work ``src_ready`` marks) to ``ops.device``."""
    source = tensor
    if tensor.device.type == "cpu" and not _is_pinned(tensor):
        # A host memcpy into pinned memory; handing pageable memory to the
        # DMA engine would instead block this thread for the whole transfer.
        source = pinned_like(ops, tensor)
        source.copy_(tensor)
    dst = torch.empty(tensor.shape, dtype=tensor.dtype, device=ops.device)
    side = ops.staging_stream()
    after(side, fence(ops))  # `dst` may be memory that queued kernels just freed
    after(side, src_ready)
    ops.copy(side, dst, source)
    ops.record_stream(dst, side)
    copied = side.record_event()
    what = f"copy of {_nbytes(tensor)} bytes to {ops.device}"
    await wait_event(copied, timeout=timeout, what=what)
    return dst
