"""The KV lookup buffer's wire messages and argument checks.

Kept apart from :mod:`aiokvpipe.kv_buffer` (the public calls) and
:mod:`aiokvpipe.kv_buffer_core` (the buffer's state and tasks): this module
only knows how a request/answer is encoded into one int64 tensor and which
tensors ``insert``/``drop_select`` accept.
"""

from __future__ import annotations

from typing import Any

import numpy
import torch

from .errors import KVBufferError, ProtocolError, UnsupportedTensorError
from .tensors import check_sendable

# Every signal message is ONE int64 tensor, so any task may send one without
# interleaving with another and a request costs the peer a single wakeup:
#   [magic, version, kind, request_id, status, *query_token_ids]
# The magic ("KVLB") catches a signal pipe wired to something else.
_MAGIC = 0x4B564C42
_VERSION = 1
_HEADER_LEN = 5
_REQUEST = 1  # status: _BY_TOKENS (ids follow) or _ANY
_ANSWER = 2  # status: _HIT (five tensors follow on the data pipe) or _MISS
_BY_TOKENS, _ANY = 0, 1
_MISS, _HIT = 0, 1
_ITEMS = 5  # tokens, roi, key, value, hidden


def _message(
    kind: int, request_id: int, status: int, query: torch.Tensor | None = None
) -> torch.Tensor:
    # numpy builds a small tensor several times faster than torch.tensor/cat.
    count = 0 if query is None else query.numel()
    array = numpy.empty(_HEADER_LEN + count, dtype=numpy.int64)
    array[:_HEADER_LEN] = (_MAGIC, _VERSION, kind, request_id, status)
    if query is not None:
        array[_HEADER_LEN:] = query.numpy()
    return torch.from_numpy(array)


def _parse_message(message: torch.Tensor | None) -> tuple[int, int, int, bytes]:
    """``(kind, request_id, status, query_key)`` of a signal message.

    Raises ProtocolError for anything that is not a well-formed message.
    """
    if (
        message is None
        or message.dtype is not torch.int64
        or message.dim() != 1
        or message.numel() < _HEADER_LEN
    ):
        described = "None" if message is None else f"{message.dtype} {tuple(message.shape)}"
        raise ProtocolError(
            f"KV buffer signal pipe: expected a 1-D int64 control tensor of at least "
            f"{_HEADER_LEN} values, got {described} (is the peer a KVLookupBuffer, wired "
            f"the same way?)"
        )
    values = message.numpy()  # a received tensor is CPU and contiguous; numpy is cheaper
    magic, version, kind, request_id, status = values[:_HEADER_LEN].tolist()
    if magic != _MAGIC:
        raise ProtocolError(f"KV buffer signal pipe: bad control magic {magic:#x}")
    if version != _VERSION:
        raise ProtocolError(
            f"KV buffer signal pipe: peer speaks version {version}, this build {_VERSION}"
        )
    trailing = len(values) - _HEADER_LEN
    valid = (kind == _REQUEST and status in (_BY_TOKENS, _ANY)) or (
        kind == _ANSWER and status in (_MISS, _HIT) and trailing == 0
    )
    if not valid:
        raise ProtocolError(
            f"KV buffer signal pipe: invalid message kind={kind} status={status} "
            f"with {trailing} trailing values"
        )
    return kind, request_id, status, values[_HEADER_LEN:].tobytes()


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


# ----------------------------------------------------------------- argument checks


def _check_tensor(op: str, name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise KVBufferError(name, f"{op}() needs a torch.Tensor, got {type(value).__name__}")
    try:
        check_sendable(value)
    except UnsupportedTensorError as exc:
        raise KVBufferError(name, f"{op}() cannot send it: {exc}") from None
    return value


def _check_tokens(op: str, value: Any) -> torch.Tensor:
    tokens = _check_tensor(op, "tokens", value)
    if tokens.dim() != 1:
        raise KVBufferError(
            "tokens", f"{op}() needs a 1-D tensor of token ids, got shape {tuple(tokens.shape)}"
        )
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype is torch.bool:
        raise KVBufferError("tokens", f"{op}() needs integer token ids, got {tokens.dtype}")
    return tokens


def _check_roi(op: str, value: Any, tokens: torch.Tensor) -> torch.Tensor | None:
    if value is None:
        return None
    roi = _check_tensor(op, "roi", value)
    if roi.dtype is not torch.bool:
        raise KVBufferError("roi", f"{op}() needs a bool mask over tokens, got {roi.dtype}")
    if roi.shape != tokens.shape:
        raise KVBufferError(
            "roi",
            f"{op}(): mask shape {tuple(roi.shape)} does not match tokens shape "
            f"{tuple(tokens.shape)}",
        )
    return roi


def _selected(tokens: torch.Tensor, roi: torch.Tensor | None) -> torch.Tensor:
    """The token ids a request is matched on, as a CPU int64 tensor."""
    chosen = tokens if roi is None else tokens[roi.to(tokens.device)]
    return chosen.to(device="cpu", dtype=torch.int64)


def _match_key(selected: torch.Tensor) -> bytes:
    return selected.contiguous().numpy().tobytes()
