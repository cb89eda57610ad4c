"""Turning tensors into byte views and back without copies.

Kept apart from :mod:`aiokvpipe.wire` because this is where torch's memory
model matters (contiguity, conj/neg bits, devices); the wire module only knows
numbers.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import UnsupportedTensorError
from .wire import MAX_DIMS, FrameHeader, FrameKind, dtype_code, tensor_header


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
        raise UnsupportedTensorError(f"tensor has {obj.dim()} dims; at most {MAX_DIMS} are supported")
    dtype_code(obj.dtype)
    return obj


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor with materialised conj/neg bits and no autograd."""
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
    """Writable/readable bytes of a dense CPU tensor (shares its memory)."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def empty_for(header: FrameHeader, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate the destination of a tensor frame.

    Returns ``(tensor, raw)`` where ``raw`` is a flat uint8 tensor sharing the
    same memory, into which the payload is received.
    """
    assert header.dtype is not None
    raw = torch.empty(header.nbytes, dtype=torch.uint8, device=device)
    tensor = raw.view(header.dtype).view(header.shape) if header.nbytes else torch.empty(
        header.shape, dtype=header.dtype, device=device
    )
    return tensor, raw
