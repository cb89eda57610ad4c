"""Object encoding for the ring: kinds, out-of-band buffers, zero extra copies."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aiokvpipe.shm import codec


def _flatten(enc: codec.Encoded) -> memoryview:
    out = bytearray(enc.total)
    for offset, part in enc.parts:
        out[offset : offset + part.nbytes] = part
    return memoryview(out)


def roundtrip(obj: Any, owned: bool = False) -> Any:
    enc = codec.encode(obj)
    flat = _flatten(enc)
    if owned:
        store = codec.aligned_empty(enc.total)
        store[:] = np.frombuffer(flat, dtype=np.uint8)
        return codec.decode(enc.kind, store.data.cast("B"), store)
    return codec.decode(enc.kind, flat)


@pytest.mark.parametrize("data", [b"", b"abc", bytearray(b"xyz"), memoryview(b"0123456789")[2:7]])
def test_bytes_like_travel_as_is(data: Any) -> None:
    enc = codec.encode(data)
    assert enc.kind == codec.BYTES and enc.total == len(bytes(data))
    assert roundtrip(data) == bytes(data)


def test_non_contiguous_memoryview_is_made_contiguous() -> None:
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)[:, ::2]
    assert roundtrip(memoryview(arr.data)) == arr.tobytes()


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
        ),
        max_leaves=12,
    )
)
@settings(max_examples=60, deadline=None)
def test_plain_objects_pickle_in_band(obj: Any) -> None:
    assert roundtrip(obj) == obj


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(10, dtype=np.float32),
        np.arange(24, dtype=np.int64).reshape(2, 3, 4),
        np.zeros((0, 5), dtype=np.float16),
        np.array(3.5),
        np.arange(20, dtype=np.int16).reshape(4, 5)[:, 1:3],  # non-contiguous: in band
    ],
)
def test_numpy_arrays(arr: np.ndarray[Any, Any]) -> None:
    for owned in (False, True):
        out = roundtrip({"a": arr}, owned)["a"]
        assert out.dtype == arr.dtype and out.shape == arr.shape
        np.testing.assert_array_equal(out, arr)


TENSORS = [
    torch.arange(12, dtype=torch.float32).reshape(3, 4),
    torch.arange(10, dtype=torch.bfloat16),
    torch.tensor([True, False, True]),
    torch.tensor(7, dtype=torch.int64),
    torch.empty(0, 3, dtype=torch.float16),
    torch.arange(30, dtype=torch.int32).reshape(5, 6).t(),  # non-contiguous
    torch.randn(4, dtype=torch.complex64).conj(),
]


@pytest.mark.parametrize("tensor", TENSORS, ids=lambda t: f"{t.dtype}-{tuple(t.shape)}")
def test_tensors_travel_out_of_band(tensor: torch.Tensor) -> None:
    enc = codec.encode([tensor, "label"])
    if tensor.numel():
        assert enc.kind == codec.OOB
        # The pickle stream stays small: the tensor's bytes are not in it.
        assert len(_flatten(enc)) >= tensor.numel() * tensor.element_size()
    for owned in (False, True):
        out, label = roundtrip([tensor, "label"], owned)
        assert label == "label"
        assert out.dtype == tensor.dtype and out.shape == tensor.shape
        assert torch.equal(out, tensor.resolve_conj())


def test_requires_grad_survives() -> None:
    t = torch.ones(3, requires_grad=True)
    out = roundtrip(t)
    assert out.requires_grad and torch.equal(out.detach(), t.detach())


def test_received_tensors_view_one_aligned_allocation() -> None:
    a = torch.arange(100, dtype=torch.float32)
    b = torch.arange(7, dtype=torch.uint8)
    enc = codec.encode({"a": a, "b": b})
    store = codec.aligned_empty(enc.total)
    store[:] = np.frombuffer(_flatten(enc), dtype=np.uint8)
    out = codec.decode(enc.kind, store.data.cast("B"), store)
    lo, hi = store.ctypes.data, store.ctypes.data + store.size
    for t in out.values():
        assert lo <= t.data_ptr() < hi, "decoding an assembled message must not copy buffers"
        assert t.data_ptr() % 64 == 0
    torch.testing.assert_close(out["a"], a)
    # Decoding from ring memory copies once, into a private aligned block.
    fresh = codec.decode(enc.kind, _flatten(enc))
    assert fresh["a"].data_ptr() % 64 == 0
    assert fresh["b"].data_ptr() - fresh["a"].data_ptr() == 448  # 400 B rounded up to 64


def test_unknown_kind_is_an_error() -> None:
    with pytest.raises(ValueError, match="kind"):
        codec.decode(9, memoryview(b""))
