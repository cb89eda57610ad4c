"""The handful of stream operations the GPU transports perform, behind one seam.

Transports never call ``torch.cuda`` directly; they go through a
:class:`DeviceOps`. Production uses :class:`TorchCudaOps`; the CPU test suite
substitutes fakes (:mod:`aiokvpipe.cuda.testing`) that record the order of
stream operations, which is where the correctness of a GPU transport lives:

* **producer fence** (:func:`fence`): a send captures an event on the
  producer's *current* stream when the message is submitted; the transport's
  own stream waits on it before touching the tensor, so kernels that were still
  writing the tensor finish first — without the host waiting for anything.
* **consumer fence**: a receive buffer is allocated on the consumer's current
  stream (so the caching allocator hands it back to that stream when freed),
  the transport stream waits on that stream before writing into it (the block
  may have been freed by kernels still queued there), and the buffer is
  ``record_stream``-ed on the transport stream so that freeing it early (a
  cancelled or aborted receive) cannot recycle memory a copy still writes.

**Whose streams.** ``torch.cuda.Stream()`` does not create a stream: it hands
out one of a small pool (32 per device and priority) that every other
``torch.cuda.Stream()`` user shares. An NCCL kernel blocked on its peer would
then hold up whatever else lands on that stream, staging copies included. So
each endpoint direction gets a stream of its own (:meth:`DeviceOps.new_stream`,
created through cupy as a non-blocking stream and wrapped for torch), and
host/device staging uses one stream per device (:func:`staging_stream`),
created once and reused.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Protocol

import torch


class DeviceOps(Protocol):
    """Stream-level operations on one device (see module docstring)."""

    @property
    def device(self) -> torch.device: ...

    def current_stream(self) -> Any:
        """The stream the application is using now (producer / consumer)."""

    def new_stream(self) -> Any:
        """A dedicated stream for one endpoint direction (not one of torch's pool)."""

    def staging_stream(self) -> Any:
        """The device's one stream for host/device staging copies (reused)."""

    def copy(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Queue ``dst.copy_(src)`` on ``stream`` without waiting for it."""

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        """Tell the allocator ``tensor`` is in use on ``stream`` (see module docstring)."""

    def empty_pinned(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 buffer in page-locked host memory (for async D2H/H2D)."""


class TorchCudaOps:
    """:class:`DeviceOps` on a real CUDA device through torch."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda" or device.index is None:
            raise ValueError(f"TorchCudaOps needs an indexed CUDA device, not {device}")
        self._device = device

    @property
    def device(self) -> torch.device:
        return self._device

    def current_stream(self) -> Any:
        return torch.cuda.current_stream(self._device)

    def new_stream(self) -> Any:
        return dedicated_stream(self._device)

    def staging_stream(self) -> Any:
        return staging_stream(self._device)

    def copy(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        if tensor.is_cuda:
            tensor.record_stream(stream)

    def empty_pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def dedicated_stream(device: torch.device) -> Any:
    """A new non-blocking CUDA stream that nobody else is handed.

    Created by cupy (torch can only wrap a raw stream, ``ExternalStream``);
    the cupy stream rides along on the torch object so that it lives exactly
    as long as the stream is used. Without cupy (a CPU-to-GPU pipe over tcp
    needs none) this falls back to torch's pool, which is what torch users
    get anyway; the GPU transports always have cupy.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import cupy
    except (ImportError, OSError, RuntimeError):
        stream_type: Any = torch.cuda.Stream  # untyped constructor in torch's stubs
        return stream_type(device)
    with cupy.cuda.Device(device.index):
        raw = cupy.cuda.Stream(non_blocking=True)
    external: Any = torch.cuda.ExternalStream  # untyped constructor in torch's stubs
    stream = external(raw.ptr, device=device)
    stream.aiokvpipe_owner = raw  # cudaStreamDestroy only once torch's handle is gone
    return stream


_staging: dict[torch.device, Any] = {}
_staging_lock = threading.Lock()


def staging_stream(device: torch.device) -> Any:
    """The one staging stream of ``device`` (created on first use, then reused)."""
    with _staging_lock:
        stream = _staging.get(device)
        if stream is None:
            stream = _staging[device] = dedicated_stream(device)
        return stream


def as_fence(ready: Any) -> Any:
    """An event from what a caller passed as a fence: an event, or a stream to mark now."""
    if hasattr(ready, "wait_event") and hasattr(ready, "record_event"):
        return ready.record_event()  # a stream: everything queued on it so far
    return ready


def fence(ops: DeviceOps) -> Any:
    """An event marking everything queued on the current stream so far.

    Recording is asynchronous and costs about a microsecond, so it is done in
    the caller's context at submit time, which is the moment whose work the
    transport must not overtake.
    """
    return ops.current_stream().record_event()


def after(stream: Any, event: Any | None) -> None:
    """Make ``stream`` wait (on the device, not the host) for ``event``."""
    if event is not None:
        stream.wait_event(event)
