"""RecvBufferPool: warm blocks are reused only after every user is gone.

allocate(): big blocks are anonymous mappings without huge pages, given back
to the kernel in steps between loop callbacks when dropped inside a loop.
"""

from __future__ import annotations

import asyncio
import gc
import mmap
import os
import re
import weakref

import numpy
import pytest
import torch

from aiokvpipe.bufpool import _RELEASE_STEP, MIN_POOLED, RecvBufferPool, allocate

pytestmark = pytest.mark.timeout(30)


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


def _mapping_of(array: numpy.ndarray) -> mmap.mmap:
    """The mmap behind an allocate()d block (numpy keeps a memoryview of it as base)."""
    base = array.base
    assert isinstance(base, memoryview), f"not mmap-backed: base is {type(base)}"
    assert isinstance(base.obj, mmap.mmap)
    return base.obj


def _vm_flags(address: int) -> list[str]:
    """The kernel's VmFlags of the mapping holding ``address`` (/proc/self/smaps)."""
    with open("/proc/self/smaps", encoding="ascii") as fh:
        text = fh.read()
    for entry in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        lo, hi = (int(x, 16) for x in entry.split(None, 1)[0].split("-"))
        if lo <= address < hi:
            for line in entry.splitlines():
                if line.startswith("VmFlags:"):
                    return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_small_allocations_come_from_numpy() -> None:
    for nbytes in (0, 1, 4096, MIN_POOLED - 1):
        array = allocate(nbytes)
        assert isinstance(array, numpy.ndarray)
        assert array.dtype == numpy.uint8 and array.shape == (nbytes,)
        assert array.flags.owndata, "small blocks are plain numpy arrays, not mappings"


@pytest.mark.parametrize("nbytes", [MIN_POOLED, 3 << 20, _RELEASE_STEP + 1])
def test_big_allocations_are_writable_mappings(nbytes: int) -> None:
    array = allocate(nbytes)
    block = _mapping_of(array)
    assert array.dtype == numpy.uint8 and array.shape == (nbytes,)
    assert array.flags.writeable and len(block) == nbytes
    assert not array.any(), "fresh anonymous memory reads as zeros"
    array[::4096] = 7
    array[-1] = 9
    assert block[0] == 7 and block[nbytes - 1] == 9  # the same memory
    tensor = torch.from_numpy(array).view(torch.float32 if nbytes % 4 == 0 else torch.uint8)
    tensor[0] = 1.5 if nbytes % 4 == 0 else 3
    assert array[0] != 7, "the tensor shares the block's memory"
    del tensor, array
    gc.collect()


@pytest.mark.skipif(
    not hasattr(mmap, "MADV_NOHUGEPAGE")
    or not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
    reason="no transparent huge pages on this kernel",
)
def test_big_allocations_refuse_huge_pages() -> None:
    big, small = allocate(4 << 20), allocate(MIN_POOLED - 1)
    assert "nh" in _vm_flags(big.__array_interface__["data"][0])
    del big, small


def test_pooled_blocks_are_mappings_too() -> None:
    pool = RecvBufferPool(16 << 20)
    view = pool.take(3 << 20)
    block = view.base
    assert isinstance(block, numpy.ndarray)  # the pool's size-class block
    _mapping_of(block)
    del view, block
    gc.collect()
    pool.close()


async def test_a_dropped_big_block_is_released_in_steps_inside_a_loop() -> None:
    nbytes = 3 * _RELEASE_STEP
    array = allocate(nbytes)
    array[:] = 1  # every page faulted in
    block = _mapping_of(array)
    gone = weakref.ref(block)
    del array  # the last view: its finalizer schedules the release
    gc.collect()
    assert not block.closed, "nothing is unmapped inside the finalizer"
    assert block[0] == 1 and block[nbytes - 1] == 1
    await asyncio.sleep(0)  # one loop iteration: the first step only
    assert not block.closed
    assert block[0] == 0, "the first step gave its pages back (MADV_DONTNEED)"
    assert block[nbytes - 1] == 1, "the last step has not run yet"
    del block  # the pending steps hold the mapping
    assert gone() is not None
    for _ in range(20):
        await asyncio.sleep(0)
        if gone() is None:
            break
    assert gone() is None, "the mapping was not released within 20 loop iterations"


async def test_a_dropped_block_of_one_step_is_freed_at_once_inside_a_loop() -> None:
    array = allocate(_RELEASE_STEP)  # not above the step size: no stepping
    gone = weakref.ref(_mapping_of(array))
    del array
    assert gone() is None


async def test_steps_end_quietly_if_the_block_was_closed_under_them() -> None:
    array = allocate(2 * _RELEASE_STEP)
    block = _mapping_of(array)
    del array
    block.close()  # closed before the first step ran
    for _ in range(5):
        await asyncio.sleep(0)  # no exception may reach the loop's handler
    assert block.closed


def test_a_dropped_big_block_outside_a_loop_is_freed_at_once() -> None:
    array = allocate(2 * _RELEASE_STEP)
    array[:] = 1
    gone = weakref.ref(_mapping_of(array))
    del array
    assert gone() is None, "with no running loop the mapping goes with its last view"
    kept = allocate(2 * _RELEASE_STEP)
    block = _mapping_of(kept)
    del kept
    assert not block.closed
    block.close()  # no view is left holding it


def test_a_full_pool_evicts_the_blocks_idle_longest_for_a_new_size() -> None:
    """Traffic that changes size gets warm blocks: 2 MiB blocks fill the pool,
    then 4 MiB ones come back and push the oldest 2 MiB ones out."""
    pool = RecvBufferPool(8 << 20)
    small = [pool.take(2 << 20) for _ in range(4)]
    small_addresses = [a.__array_interface__["data"][0] for a in small]
    while small:  # given back in order: block 0 first
        del small[0]
        gc.collect()
    assert pool.idle_bytes == 8 << 20
    big = pool.take(4 << 20)
    big_address = big.__array_interface__["data"][0]
    del big
    gc.collect()
    assert pool.idle_bytes == 8 << 20  # two 2 MiB blocks made room for it
    again = pool.take(4 << 20)
    assert again.__array_interface__["data"][0] == big_address  # warm, not a fresh one
    kept = [pool.take(2 << 20) for _ in range(2)]
    # The two given back last are the ones kept; the warmest is handed out first.
    assert [a.__array_interface__["data"][0] for a in kept] == small_addresses[:1:-1]
    assert pool.idle_bytes == 0
    oversized = pool.take(16 << 20)
    del oversized, again, kept
    gc.collect()
    assert pool.idle_bytes <= 8 << 20
