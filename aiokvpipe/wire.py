"""The frame header that precedes every payload, and the dtype table.

No pickle, ever: a header is a fixed 136-byte little-endian struct, so a
receiver knows exactly how many bytes to read before it trusts anything, and
every field is validated before a byte of payload is accepted or a buffer is
allocated. Layout (offsets in bytes)::

    0   magic     4s   b"AKVP"
    4   version   u8   WIRE_VERSION
    5   kind      u8   FrameKind (tensor / none / close)
    6   dtype     u8   DTYPE_CODES (0 for non-tensor frames)
    7   ndim      u8   0..MAX_DIMS
    8   seq       u64  per-direction sequence number, starts at 0
    16  nbytes    u64  payload bytes that follow the header
    24  shape     14 x i64, unused trailing dims are 0
"""

from __future__ import annotations

import enum
import math
import struct
from typing import NamedTuple

import torch

from .errors import (
    BadMagicError,
    FrameTooLargeError,
    MalformedFrameError,
    SequenceError,
    UnsupportedTensorError,
    UnsupportedVersionError,
)

MAGIC = b"AKVP"
WIRE_VERSION = 1
MAX_DIMS = 14

_HEADER = struct.Struct("<4sBBBBQQ14q")
HEADER_SIZE = _HEADER.size

# What one queued message costs besides its payload: the header on the wire
# and the objects that track it (measured on CPython 3.12 / torch 2.x: ~1.1 KiB
# per message waiting in a send channel, ~0.6 KiB per small tensor waiting
# in a receive queue). Charging it keeps a flood of None or tiny tensors
# inside buffer_bytes like any other traffic.
MESSAGE_BOOKKEEPING = 1024
MESSAGE_OVERHEAD = HEADER_SIZE + MESSAGE_BOOKKEEPING


def message_charge(nbytes: int) -> int:
    """Window bytes one message of ``nbytes`` payload bytes holds, on either side.

    The ONE rule every window uses (the sender's ByteSemaphore and each
    receive channel's queue): payload plus :data:`MESSAGE_OVERHEAD`, so no
    message, not even ``None``, is free.
    """
    if nbytes < 0:
        raise ValueError(f"a message cannot have {nbytes} payload bytes")
    return nbytes + MESSAGE_OVERHEAD


class FrameKind(enum.IntEnum):
    TENSOR = 0
    NONE = 1
    CLOSE = 2


def _optional_dtype(name: str) -> torch.dtype | None:
    value = getattr(torch, name, None)
    return value if isinstance(value, torch.dtype) else None


# Codes are part of the wire format: never renumber, only append. Dtypes are
# looked up by name so an older torch without (say) float8 still loads.
_DTYPE_NAMES: tuple[tuple[int, str], ...] = (
    (1, "bool"),
    (2, "uint8"),
    (3, "int8"),
    (4, "int16"),
    (5, "int32"),
    (6, "int64"),
    (7, "float16"),
    (8, "bfloat16"),
    (9, "float32"),
    (10, "float64"),
    (11, "complex32"),
    (12, "complex64"),
    (13, "complex128"),
    (14, "uint16"),
    (15, "uint32"),
    (16, "uint64"),
    (17, "float8_e4m3fn"),
    (18, "float8_e5m2"),
    (19, "float8_e4m3fnuz"),
    (20, "float8_e5m2fnuz"),
    (21, "float8_e8m0fnu"),
    (22, "float4_e2m1fn_x2"),
    (23, "bits8"),
    (24, "bits16"),
)

DTYPE_CODES: dict[torch.dtype, int] = {}
CODE_DTYPES: dict[int, torch.dtype] = {}
for _code, _name in _DTYPE_NAMES:
    _dtype = _optional_dtype(_name)
    if _dtype is not None and _dtype not in DTYPE_CODES:
        DTYPE_CODES[_dtype] = _code
        CODE_DTYPES[_code] = _dtype

_ITEMSIZE: dict[int, int] = {code: dtype.itemsize for code, dtype in CODE_DTYPES.items()}


def dtype_code(dtype: torch.dtype) -> int:
    """Wire code of ``dtype``; quantized and sub-byte dtypes are refused."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise UnsupportedTensorError(
            f"dtype {dtype} cannot be sent: only fixed-size dtypes without "
            f"extra metadata are supported ({', '.join(str(d) for d in DTYPE_CODES)})"
        ) from None


_ZERO_DIMS = (0,) * MAX_DIMS
_SEQ_OFFSET = 8
_pack_seq = struct.Struct("<Q").pack_into
_MAX_TEMPLATES = 1024  # distinct (kind, dtype, shape) headers kept packed
_TEMPLATES: dict[tuple[int, torch.dtype | None, tuple[int, ...]], bytes] = {}
_KINDS: dict[int, FrameKind] = {int(k): k for k in FrameKind}


class FrameHeader(NamedTuple):
    """A decoded, validated header (a NamedTuple: built per message, so cheap)."""

    kind: FrameKind
    seq: int
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] = ()
    nbytes: int = 0

    def encode(self) -> bytes:
        # Everything but the sequence number repeats from message to message:
        # pack it once per (kind, dtype, shape) and patch the seq in.
        key = (self.kind, self.dtype, self.shape)
        template = _TEMPLATES.get(key)
        if template is None:
            code = 0 if self.dtype is None else dtype_code(self.dtype)
            ndim = len(self.shape)
            template = _HEADER.pack(
                MAGIC, WIRE_VERSION, self.kind, code, ndim, 0, self.nbytes,
                *self.shape, *_ZERO_DIMS[ndim:],
            )  # fmt: skip
            if len(_TEMPLATES) >= _MAX_TEMPLATES:
                _TEMPLATES.clear()
            _TEMPLATES[key] = template
        frame = bytearray(template)
        _pack_seq(frame, _SEQ_OFFSET, self.seq)
        return bytes(frame)


def tensor_header(seq: int, dtype: torch.dtype, shape: tuple[int, ...]) -> FrameHeader:
    """Header for a tensor frame; validates dtype and rank before anything is written."""
    code = dtype_code(dtype)
    if len(shape) > MAX_DIMS:
        raise UnsupportedTensorError(
            f"tensor has {len(shape)} dims; at most {MAX_DIMS} are supported"
        )
    nbytes = math.prod(shape) * _ITEMSIZE[code]
    if nbytes == 0 and _extent_overflows(shape):
        raise UnsupportedTensorError(f"empty tensor of shape {tuple(shape)} has absurd dimensions")
    return FrameHeader(FrameKind.TENSOR, seq, dtype, tuple(shape), nbytes)


def _extent_overflows(shape: tuple[int, ...]) -> bool:
    """True if strides/storage for ``shape`` cannot be computed in int64.

    Only empty tensors can get here with huge dims (a zero dim makes the
    byte count 0), e.g. ``(0, 2**62, 2)``: torch cannot create them, so such
    a header is refused rather than failing the receiver's allocation.
    """
    return math.prod(max(d, 1) for d in shape) >= 1 << 63


def decode_header(
    data: bytes | bytearray | memoryview, *, expected_seq: int, max_frame_bytes: int
) -> FrameHeader:
    """Parse and validate one header; raise a ``ProtocolError`` subclass on any violation."""
    if len(data) != HEADER_SIZE:
        raise MalformedFrameError(f"header is {len(data)} bytes, expected {HEADER_SIZE}")
    magic, version, kind_code, code, ndim, seq, nbytes, *dims = _HEADER.unpack(data)
    if magic != MAGIC:
        raise BadMagicError(f"bad frame magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != WIRE_VERSION:
        raise UnsupportedVersionError(
            f"peer speaks wire version {version}, this build speaks {WIRE_VERSION}"
        )
    kind = _KINDS.get(kind_code)
    if kind is None:
        raise MalformedFrameError(f"unknown frame kind {kind_code}")
    if seq != expected_seq:
        raise SequenceError(f"frame sequence {seq} received, expected {expected_seq}")
    if kind is not FrameKind.TENSOR:
        if code or ndim or nbytes or any(dims):
            raise MalformedFrameError(f"{kind.name} frame carries tensor fields")
        return FrameHeader(kind, seq)
    dtype = CODE_DTYPES.get(code)
    if dtype is None:
        raise MalformedFrameError(f"unknown dtype code {code}")
    if ndim > MAX_DIMS:
        raise MalformedFrameError(f"ndim {ndim} exceeds {MAX_DIMS}")
    shape = tuple(dims[:ndim])
    if shape and min(shape) < 0:
        raise MalformedFrameError(f"negative dimension in shape {shape}")
    if any(dims[ndim:]):
        raise MalformedFrameError("non-zero dimensions beyond ndim")
    if nbytes > max_frame_bytes:
        raise FrameTooLargeError(nbytes, max_frame_bytes, "received")
    expected = math.prod(shape) * _ITEMSIZE[code]
    if expected == 0 and _extent_overflows(shape):
        raise MalformedFrameError(f"shape {shape} has no valid strides")
    if nbytes != expected:
        raise MalformedFrameError(
            f"nbytes {nbytes} does not match shape {shape} of {dtype} ({expected} bytes)"
        )
    return FrameHeader(kind, seq, dtype, shape, nbytes)
