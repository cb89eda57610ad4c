"""Turning tensors into byte views and back without copies.

Kept apart from :mod:`aiokvpipe.wire` because this is where torch's memory
model matters (contiguity, conj/neg bits, devices); the wire module only knows
numbers.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from .bufpool import RecvBufferPool, allocate
from .errors import UnsupportedTensorError
from .wire import MAX_DIMS, FrameHeader, FrameKind, decode_header, dtype_code, tensor_header

_SMALL = 64 << 10  # frames up to this size are allocated as bytearrays
_REHEARSED = _SMALL  # largest message whose receive is rehearsed (its allocation is real)


def check_sendable(obj: Any) -> torch.Tensor | None:
    """Validate a ``send`` argument before anything is accepted or written."""
    if obj is None:
        return None
    if not isinstance(obj, torch.Tensor):
        raise UnsupportedTensorError(
            f"send() takes a torch.Tensor or None, not {type(obj).__name__}"
        )
    if obj.layout is not torch.strided:
        raise UnsupportedTensorError(f"only strided (dense) tensors can be sent, not {obj.layout}")
    if obj.device.type == "meta":
        raise UnsupportedTensorError("meta tensors have no data to send")
    if obj.dim() > MAX_DIMS:
        raise UnsupportedTensorError(
            f"tensor has {obj.dim()} dims; at most {MAX_DIMS} are supported"
        )
    dtype_code(obj.dtype)
    return obj


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor with materialised conj/neg bits and no autograd."""
    if (
        tensor.is_contiguous()
        and not tensor.requires_grad
        and not tensor.is_conj()
        and not tensor.is_neg()
    ):
        return tensor  # the common case: nothing to do, no new tensor object
    t = tensor.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t.contiguous()


def header_for(seq: int, tensor: torch.Tensor | None) -> FrameHeader:
    if tensor is None:
        return FrameHeader(FrameKind.NONE, seq)
    return tensor_header(seq, tensor.dtype, tuple(tensor.shape))


def byte_view(tensor: torch.Tensor) -> memoryview:
    """Bytes of a dense CPU tensor, sharing its memory.

    Built with ctypes from the data pointer (0.6 us against 3 us through
    numpy views): the view does *not* keep the tensor alive, so callers hold
    the tensor for as long as they use the view.
    """
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def empty_for(
    header: FrameHeader, pool: RecvBufferPool | None = None
) -> tuple[torch.Tensor, memoryview]:
    """Allocate the CPU destination of a tensor frame.

    Returns ``(tensor, dest)``: ``dest`` is a writable byte view of the
    tensor's memory, into which the payload is received. ``bufpool.allocate``
    allocates (cheaper than torch.empty per call, and without transparent
    huge pages, whose whole-page faults stall the loop for ms), or ``pool``
    recycles warm blocks for large frames; the tensor shares the array's
    memory.
    """
    assert header.dtype is not None
    if header.nbytes == 0:
        return torch.empty(header.shape, dtype=header.dtype), memoryview(b"")
    if header.nbytes <= _SMALL:
        # Small: a bytearray is the cheapest allocation torch can wrap.
        block = bytearray(header.nbytes)
        small = torch.frombuffer(block, dtype=header.dtype)
        if len(header.shape) != 1:
            small = small.view(header.shape)
        return small, memoryview(block)
    if pool is not None:
        array = pool.take(header.nbytes)
    else:
        array = allocate(header.nbytes)
    raw = torch.from_numpy(array)
    tensor = raw if header.dtype is torch.uint8 else raw.view(header.dtype)
    if tensor.dim() != len(header.shape) or tuple(tensor.shape) != header.shape:
        tensor = tensor.view(header.shape)
    return tensor, memoryview(array)  # type: ignore[arg-type]  # numpy stubs lack Buffer


def rehearse_receive(header: FrameHeader | None, max_frame_bytes: int) -> None:
    """Receive a message like ``header``'s, dry: decode, allocate, and the
    first steps of sending it on (an echo, a pipeline stage), then drop it.

    Why: a receiver that anticipates runs this when the window in which the
    next message is due opens. After a gap of milliseconds the code and
    objects a small message's receive needs are out of the caches, and run
    cold the same steps cost 10-20x what they cost warm (docs/latency.md);
    rehearsed, the real message finds them warm. Only tensor messages up to
    64 KiB (a bytearray's allocation), and nothing the stream depends on
    changes.
    """
    if header is None or header.kind is not FrameKind.TENSOR or header.nbytes > _REHEARSED:
        return
    decode_header(header.encode(), expected_seq=header.seq, max_frame_bytes=max_frame_bytes)
    tensor, _dest = empty_for(header)
    sendable = check_sendable(tensor)
    if sendable is not None:
        byte_view(dense(sendable))
        header_for(header.seq, sendable)
