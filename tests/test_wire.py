"""The frame header: layout, round trips, every validation, and a decode fuzz."""

from __future__ import annotations

import math
import random
import re
import struct
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiokvpipe.errors import (
    BadMagicError,
    FrameTooLargeError,
    MalformedFrameError,
    ProtocolError,
    SequenceError,
    UnsupportedTensorError,
    UnsupportedVersionError,
)
from aiokvpipe.tensors import empty_for
from aiokvpipe.wire import (
    CODE_DTYPES,
    DTYPE_CODES,
    HEADER_SIZE,
    MAGIC,
    MAX_DIMS,
    WIRE_VERSION,
    FrameHeader,
    FrameKind,
    decode_header,
    dtype_code,
    tensor_header,
)

LIMIT = 1 << 20
_LAYOUT = struct.Struct("<4sBBBBQQ14q")
_FIELDS = ("magic", "version", "kind", "dtype", "ndim", "seq", "nbytes")

SHAPES: list[tuple[int, ...]] = [
    (),
    (0,),
    (1,),
    (7,),
    (3, 5),
    (2, 0, 4),
    (1,) * MAX_DIMS,
    (2, 1, 3, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 2),
    (0, 2**40),
]


def decode(data: bytes, seq: int = 0, limit: int = LIMIT) -> FrameHeader:
    return decode_header(data, expected_seq=seq, max_frame_bytes=limit)


def fields_of(data: bytes) -> dict[str, Any]:
    values = _LAYOUT.unpack(data)
    out = dict(zip(_FIELDS, values[:7], strict=True))
    out["dims"] = list(values[7:])
    return out


def pack(f: dict[str, Any]) -> bytes:
    return _LAYOUT.pack(*(f[name] for name in _FIELDS), *f["dims"])


def mutated(data: bytes, **changes: Any) -> bytes:
    f = fields_of(data)
    for name, value in changes.items():
        if name.startswith("dim"):
            f["dims"][int(name[3:])] = value
        else:
            f[name] = value
    return pack(f)


VALID = tensor_header(0, torch.float32, (4, 8)).encode()  # 128 payload bytes


# --------------------------------------------------------------------- layout and round trips


def test_layout_is_the_documented_one() -> None:
    assert HEADER_SIZE == 136 == _LAYOUT.size
    header = tensor_header(0x0102030405060708, torch.int16, (3, 5)).encode()
    assert header[:4] == MAGIC == b"AKVP"
    assert header[4] == WIRE_VERSION
    assert header[5] == FrameKind.TENSOR
    assert header[6] == DTYPE_CODES[torch.int16]
    assert header[7] == 2
    assert header[8:16] == (0x0102030405060708).to_bytes(8, "little")
    assert int.from_bytes(header[16:24], "little") == 30
    assert struct.unpack("<14q", header[24:]) == (3, 5) + (0,) * 12


def test_dtype_codes_are_stable_and_unique() -> None:
    # codes are part of the wire format: a renumbering breaks every peer
    assert DTYPE_CODES[torch.bool] == 1
    assert DTYPE_CODES[torch.float32] == 9
    assert DTYPE_CODES[torch.bfloat16] == 8
    assert DTYPE_CODES[torch.complex128] == 13
    assert len(set(DTYPE_CODES.values())) == len(DTYPE_CODES)
    assert {CODE_DTYPES[c]: c for c in CODE_DTYPES} == DTYPE_CODES
    assert 0 not in CODE_DTYPES  # 0 means "no dtype" in non-tensor frames


def test_round_trip_every_dtype_and_shape() -> None:
    count = 0
    for dtype in DTYPE_CODES:
        for seq, shape in enumerate(SHAPES):
            header = tensor_header(seq, dtype, shape)
            assert header.nbytes == math.prod(shape) * dtype.itemsize
            raw = header.encode()
            assert len(raw) == HEADER_SIZE
            back = decode(raw, seq, limit=max(header.nbytes, 1))
            assert back == header
            assert back.kind is FrameKind.TENSOR and back.dtype is dtype
            assert back.shape == shape and type(back.shape) is tuple
            assert back.encode() == raw
            assert decode(memoryview(bytearray(raw)), seq, limit=1 << 40) == header
            count += 1
    assert count == len(DTYPE_CODES) * len(SHAPES)


@pytest.mark.parametrize("kind", [FrameKind.NONE, FrameKind.CLOSE])
def test_round_trip_control_frames(kind: FrameKind) -> None:
    raw = FrameHeader(kind, 2**64 - 1).encode()
    back = decode(raw, 2**64 - 1)
    assert back == FrameHeader(kind, 2**64 - 1)
    assert (back.dtype, back.shape, back.nbytes) == (None, (), 0)


def test_tensor_header_refuses_what_cannot_be_sent() -> None:
    with pytest.raises(UnsupportedTensorError, match="15 dims"):
        tensor_header(0, torch.float32, (1,) * (MAX_DIMS + 1))
    for dtype in (torch.qint8, torch.quint8, torch.qint32, torch.quint4x2):
        with pytest.raises(UnsupportedTensorError, match="cannot be sent"):
            dtype_code(dtype)
        with pytest.raises(UnsupportedTensorError):
            tensor_header(0, dtype, (2,))
    # empty, but no tensor of this shape can be rebuilt by the receiver
    with pytest.raises(UnsupportedTensorError, match="absurd"):
        tensor_header(0, torch.float32, (0, 2**62, 2))
    assert tensor_header(0, torch.float32, (0, 2**62, 1)).nbytes == 0
    assert issubclass(UnsupportedTensorError, (ProtocolError, TypeError))


# --------------------------------------------------------------------- every validation

BAD: list[tuple[str, Callable[[], bytes], type[Exception], str]] = [
    ("bad-magic", lambda: mutated(VALID, magic=b"XKVP"), BadMagicError, "magic"),
    (
        "http-not-ours",
        lambda: b"GET / HTTP/1.1\r\n".ljust(HEADER_SIZE, b"\0"),
        BadMagicError,
        "GET",
    ),
    ("version-2", lambda: mutated(VALID, version=2), UnsupportedVersionError, "version 2"),
    ("version-0", lambda: mutated(VALID, version=0), UnsupportedVersionError, "version 0"),
    ("unknown-kind", lambda: mutated(VALID, kind=3), MalformedFrameError, "kind 3"),
    ("dtype-zero", lambda: mutated(VALID, dtype=0), MalformedFrameError, "dtype code 0"),
    ("dtype-unknown", lambda: mutated(VALID, dtype=250), MalformedFrameError, "dtype code 250"),
    ("ndim-15", lambda: mutated(VALID, ndim=15), MalformedFrameError, "ndim 15"),
    ("ndim-255", lambda: mutated(VALID, ndim=255), MalformedFrameError, "ndim 255"),
    ("negative-dim", lambda: mutated(VALID, dim1=-8, nbytes=0), MalformedFrameError, "negative"),
    (
        "negative-pair",  # (-4) * (-8) * 4 == 128: the product alone looks right
        lambda: mutated(VALID, dim0=-4, dim1=-8),
        MalformedFrameError,
        "negative",
    ),
    ("trailing-dim", lambda: mutated(VALID, dim5=1), MalformedFrameError, "beyond ndim"),
    ("trailing-last", lambda: mutated(VALID, dim13=-1), MalformedFrameError, "beyond ndim"),
    ("nbytes-plus-1", lambda: mutated(VALID, nbytes=129), MalformedFrameError, "does not match"),
    ("nbytes-minus-1", lambda: mutated(VALID, nbytes=127), MalformedFrameError, "does not match"),
    ("nbytes-zero", lambda: mutated(VALID, nbytes=0), MalformedFrameError, "does not match"),
    (
        "none-with-fields",
        lambda: mutated(VALID, kind=FrameKind.NONE),
        MalformedFrameError,
        "NONE frame carries",
    ),
    (
        "close-with-nbytes",
        lambda: mutated(FrameHeader(FrameKind.CLOSE, 0).encode(), nbytes=8),
        MalformedFrameError,
        "CLOSE frame carries",
    ),
    (
        "too-large",
        lambda: tensor_header(0, torch.uint8, (LIMIT + 1,)).encode(),
        FrameTooLargeError,
        "exceeds max_frame_bytes",
    ),
    (
        "huge-announced",
        lambda: tensor_header(0, torch.float64, (2**31, 2**20)).encode(),
        FrameTooLargeError,
        "exceeds",
    ),
    (
        "huge-mismatched",  # a lie about size is refused before it is believed
        lambda: mutated(VALID, nbytes=2**64 - 1),
        FrameTooLargeError,
        "exceeds",
    ),
    ("seq-ahead", lambda: tensor_header(1, torch.float32, (2,)).encode(), SequenceError, "1"),
    (
        "seq-wrapped",
        lambda: FrameHeader(FrameKind.NONE, 2**64 - 1).encode(),
        SequenceError,
        "expected 0",
    ),
    ("short", lambda: VALID[:-1], MalformedFrameError, "135 bytes"),
    ("long", lambda: VALID + b"\0", MalformedFrameError, "137 bytes"),
    ("empty", lambda: b"", MalformedFrameError, "0 bytes"),
    (
        "stride-overflow",  # no bytes, but no tensor of this shape can exist
        lambda: mutated(VALID, ndim=3, dim0=0, dim1=2**62, dim2=2, nbytes=0),
        MalformedFrameError,
        "strides",
    ),
]


def test_decode_refuses_every_violation() -> None:
    """Each BAD case raises its own ProtocolError subclass with a useful message."""
    problems = []
    for case, make, error, match in BAD:
        try:
            decode(make())
        except ProtocolError as exc:
            if type(exc) is not error or not re.search(match, str(exc)):
                problems.append(f"{case}: wanted {error.__name__} ~ {match!r}, got {exc!r}")
        except Exception as exc:  # every other exception is a failure too
            problems.append(f"{case}: not a ProtocolError: {exc!r}")
        else:
            problems.append(f"{case}: accepted")
    assert not problems, "\n".join(problems)


def test_limits_are_inclusive_and_errors_carry_sizes() -> None:
    exact = tensor_header(0, torch.uint8, (LIMIT,)).encode()
    assert decode(exact).nbytes == LIMIT
    with pytest.raises(FrameTooLargeError) as info:
        decode(exact, limit=LIMIT - 1)
    assert (info.value.nbytes, info.value.limit) == (LIMIT, LIMIT - 1)
    assert str(LIMIT) in str(info.value) and str(LIMIT - 1) in str(info.value)
    with pytest.raises(SequenceError, match="sequence 0 received, expected 5"):
        decode(exact, seq=5)


# --------------------------------------------------------------------- fuzz


def check_decoded(data: bytes, expected_seq: int) -> None:
    """decode either returns a header that is valid in every way, or raises a
    ProtocolError subclass; any other exception fails the test."""
    try:
        header = decode(data, expected_seq)
    except ProtocolError:
        return
    assert header.encode() == data  # nothing in the bytes was ignored
    assert header.seq == expected_seq
    if header.kind is not FrameKind.TENSOR:
        assert header.kind in (FrameKind.NONE, FrameKind.CLOSE)
        assert (header.dtype, header.shape, header.nbytes) == (None, (), 0)
        return
    assert header.dtype in DTYPE_CODES
    assert len(header.shape) <= MAX_DIMS and all(d >= 0 for d in header.shape)
    assert header.nbytes == math.prod(header.shape) * header.dtype.itemsize <= LIMIT
    # the receiver can materialise it
    tensor, dest = empty_for(header)
    assert tensor.dtype is header.dtype and tuple(tensor.shape) == header.shape
    assert len(dest) == header.nbytes


u8 = st.integers(0, 255)
i64 = st.integers(-(2**63), 2**63 - 1)
u64 = st.integers(0, 2**64 - 1)
small_dim = st.integers(0, 9)
field_headers = st.fixed_dictionaries(
    {
        "magic": st.one_of(st.just(MAGIC), st.binary(min_size=4, max_size=4)),
        "version": st.one_of(st.just(WIRE_VERSION), u8),
        "kind": st.one_of(st.sampled_from([0, 0, 1, 2]), u8),
        "dtype": st.one_of(st.sampled_from(sorted(CODE_DTYPES)), st.just(0), u8),
        "ndim": st.one_of(st.integers(0, MAX_DIMS), st.integers(MAX_DIMS + 1, 16), u8),
        "seq": st.one_of(st.just(0), st.just(1), u64),
        "nbytes": st.one_of(st.none(), u64, st.integers(0, 4096)),
        "dims": st.lists(
            st.one_of(small_dim, i64, st.sampled_from([-1, 2**62])), max_size=MAX_DIMS
        ),
        "junk": st.one_of(st.none(), st.tuples(st.integers(0, MAX_DIMS - 1), i64)),
    }
)


def fuzz(examples: int) -> Any:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@fuzz(500)
@given(field_headers)
def test_fuzz_structured_headers(f: dict[str, Any]) -> None:
    ndim = f["ndim"]
    f["dims"] += [0] * (MAX_DIMS - len(f["dims"]))
    if f["junk"] is not None:  # a stray value anywhere, e.g. past ndim
        index, value = f["junk"]
        f["dims"][index] = value
    if f["nbytes"] is None:  # a consistent size, so the deeper checks are reached
        code = f["dtype"]
        item = CODE_DTYPES[code].itemsize if code in CODE_DTYPES else 1
        f["nbytes"] = math.prod(f["dims"][: min(ndim, MAX_DIMS)]) * item % 2**64
    check_decoded(pack(f), 0)


@fuzz(300)
@given(
    dtype=st.sampled_from(list(DTYPE_CODES)),
    shape=st.lists(st.integers(0, 6), max_size=MAX_DIMS).map(tuple),
    seq=st.integers(0, 3),
    seed=st.integers(0, 2**32),
)
def test_fuzz_mutated_valid_headers(
    dtype: torch.dtype, shape: tuple[int, ...], seq: int, seed: int
) -> None:
    """Each example: a valid header, then 16 copies with 1-4 bytes overwritten."""
    rng = random.Random(seed)
    valid = tensor_header(seq, dtype, shape).encode()
    check_decoded(valid, seq)
    for _ in range(16):
        raw = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            index = rng.choice((rng.randrange(HEADER_SIZE), rng.randrange(4, 24)))
            raw[index] = rng.choice((rng.randrange(256), raw[index] ^ (1 << rng.randrange(8))))
        check_decoded(bytes(raw), seq)


@fuzz(400)
@given(
    st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE),
    st.binary(max_size=4).filter(lambda p: len(p) != 1),
)
def test_fuzz_random_bytes(data: bytes, prefix: bytes) -> None:
    check_decoded(data, 0)
    # with our magic and version in front, the other checks get exercised
    check_decoded((MAGIC + bytes([WIRE_VERSION]) + data[5:])[:HEADER_SIZE], 0)
    with pytest.raises(MalformedFrameError, match="bytes, expected 136"):
        decode(prefix + data[:-1])  # any other length is refused before parsing
