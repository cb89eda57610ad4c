"""RecvBufferPool: warm blocks are reused only after every user is gone."""

from __future__ import annotations

import gc

import numpy
import torch

from aiokvpipe.bufpool import MIN_POOLED, RecvBufferPool


def test_block_returns_only_when_tensor_and_views_die() -> None:
    pool = RecvBufferPool(64 << 20)
    first = pool.take(3 << 20)
    tensor = torch.from_numpy(first).view(torch.float32)
    view = tensor[10:20]
    address = first.__array_interface__["data"][0]
    del first, tensor
    gc.collect()
    assert pool.idle_bytes == 0  # `view` still uses the block
    other = pool.take(3 << 20)
    assert other.__array_interface__["data"][0] != address
    view.fill_(7.0)  # still valid memory, not shared with `other`
    other[:] = 1
    assert float(view[0]) == 7.0
    del view
    gc.collect()
    assert pool.idle_bytes == 4 << 20  # 3 MiB rounds up to a 4 MiB class
    again = pool.take(4 << 20)
    assert again.__array_interface__["data"][0] == address
    assert again.nbytes == 4 << 20


def test_small_and_oversize_requests_are_not_pooled() -> None:
    pool = RecvBufferPool(8 << 20)
    small = pool.take(MIN_POOLED - 1)
    big = pool.take(9 << 20)
    assert small.nbytes == MIN_POOLED - 1 and big.nbytes == 9 << 20
    del small, big
    gc.collect()
    assert pool.idle_bytes == 0


def test_idle_bytes_bounded_and_close_drops_blocks() -> None:
    pool = RecvBufferPool(4 << 20)
    arrays = [pool.take(2 << 20) for _ in range(4)]
    del arrays
    gc.collect()
    assert pool.idle_bytes == 4 << 20  # only two 2 MiB blocks kept
    pool.close()
    assert pool.idle_bytes == 0
    late = pool.take(2 << 20)
    assert isinstance(late, numpy.ndarray)
    del late
    gc.collect()
    assert pool.idle_bytes == 0  # a closed pool keeps nothing
