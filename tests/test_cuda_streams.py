"""Whose streams the transports use: their own, never torch's shared pool."""

from __future__ import annotations

import sys
import types
from typing import Any, ClassVar

import pytest
import torch

from aiokvpipe.cuda import streams
from aiokvpipe.cuda.streams import TorchCudaOps


class _CupyStream:
    made: ClassVar[list[_CupyStream]] = []

    def __init__(self, non_blocking: bool = False) -> None:
        self.non_blocking = non_blocking
        self.ptr = 0x1000 + len(self.made)
        self.made.append(self)


class _CupyDevice:
    def __init__(self, index: int) -> None:
        self.index = index

    def __enter__(self) -> _CupyDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _ExternalStream:
    def __init__(self, ptr: int, device: Any = None) -> None:
        self.cuda_stream = ptr
        self.device = device


@pytest.fixture
def fake_cupy(monkeypatch: pytest.MonkeyPatch) -> list[_CupyStream]:
    """cupy makes raw streams; torch's pool (``torch.cuda.Stream``) must not be touched."""
    cupy = types.ModuleType("cupy")
    cuda = types.ModuleType("cupy.cuda")
    cuda.Stream = _CupyStream  # type: ignore[attr-defined]
    cuda.Device = _CupyDevice  # type: ignore[attr-defined]
    cupy.cuda = cuda  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy", cupy)

    def pooled(*args: object, **kwargs: object) -> None:
        raise AssertionError("a transport stream came from torch's shared stream pool")

    monkeypatch.setattr(torch.cuda, "Stream", pooled)
    monkeypatch.setattr(torch.cuda, "ExternalStream", _ExternalStream)
    monkeypatch.setattr(streams, "_staging", {})
    monkeypatch.setattr(_CupyStream, "made", [])
    return _CupyStream.made


def test_each_endpoint_direction_gets_a_dedicated_non_blocking_stream(
    fake_cupy: list[_CupyStream],
) -> None:
    ops = TorchCudaOps(torch.device("cuda", 0))
    first, second = ops.new_stream(), ops.new_stream()
    assert first.cuda_stream != second.cuda_stream
    assert [s.non_blocking for s in fake_cupy] == [True, True]
    assert first.aiokvpipe_owner is fake_cupy[0]  # the raw stream lives as long as its user


def test_one_staging_stream_per_device_is_reused(fake_cupy: list[_CupyStream]) -> None:
    on_0 = TorchCudaOps(torch.device("cuda", 0)).staging_stream()
    assert TorchCudaOps(torch.device("cuda", 0)).staging_stream() is on_0
    on_1 = TorchCudaOps(torch.device("cuda", 1)).staging_stream()
    assert on_1 is not on_0 and on_1.cuda_stream != on_0.cuda_stream
    assert len(fake_cupy) == 2
