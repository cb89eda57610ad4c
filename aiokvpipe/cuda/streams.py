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
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class DeviceOps(Protocol):
    """Stream-level operations on one device (see module docstring)."""

    @property
    def device(self) -> torch.device: ...

    def current_stream(self) -> Any:
        """The stream the application is using now (producer / consumer)."""

    def new_stream(self) -> Any:
        """A stream owned by the transport, for its copies and NCCL calls."""

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
        stream_type: Any = torch.cuda.Stream  # untyped constructor in torch's stubs
        return stream_type(self._device)

    def copy(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        if tensor.is_cuda:
            tensor.record_stream(stream)

    def empty_pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


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
