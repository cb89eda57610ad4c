"""Block transfers of GPU regions on CPU, through the fakes in aiokvpipe.cuda.testing.

Two BlockNodes in this process, each with its own FakeGpu (its own fake
device and streams) over one FakeIpc "driver": region tensors are CPU
tensors the fake calls device memory, IPC exports name their storage, and a
mapping is the same address. What is real: the sockets, handshakes, the
block protocol, the path choice, the copy plans and their bounds checks,
the order of stream operations, the polling waits, and the bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import pytest
import torch
from blocks_net import BlockNode, make_layers, unique

from aiokvpipe.blocks.gpu import Export
from aiokvpipe.cuda.testing import FakeGpu, FakeIpc
from aiokvpipe.errors import (
    LeaseCancelledError,
    MalformedFrameError,
    PeerClosedError,
    RegionError,
)


@dataclass
class Pair:
    owner: BlockNode
    reader: BlockNode
    owner_gpu: FakeGpu
    reader_gpu: FakeGpu
    ipc: FakeIpc


async def make_pair(
    owner_host: str | None = None,
    owner_link: str = "auto",
    reader_link: str = "auto",
) -> Pair:
    ipc = FakeIpc()
    owner_gpu, reader_gpu = FakeGpu("owner", ipc), FakeGpu("reader", ipc)
    owner = await BlockNode.start(link=owner_link, host_id=owner_host, gpu=owner_gpu)
    reader = await BlockNode.start(link=reader_link, gpu=reader_gpu)
    return Pair(owner, reader, owner_gpu, reader_gpu, ipc)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    p = await make_pair()
    try:
        yield p
    finally:
        await p.reader.aclose()
        await p.owner.aclose()


def on(gpu: FakeGpu | None, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [gpu.tensor(t) for t in tensors] if gpu is not None else tensors


def register(
    node: BlockNode, gpu: FakeGpu | None, name: str, seed: int, blocks: int, layers: int = 3
) -> list[torch.Tensor]:
    tensors = on(gpu, make_layers(seed, layers, blocks))
    node.service.register(name, tensors, block_dim=1)
    return tensors


def same_blocks(
    dst: list[torch.Tensor], dst_ids: list[int], src: list[torch.Tensor], src_ids: list[int]
) -> bool:
    d, s = torch.tensor(dst_ids), torch.tensor(src_ids)
    pairs = zip(dst, src, strict=True)
    return all(torch.equal(a.index_select(1, d), b.index_select(1, s)) for a, b in pairs)


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never held")


# ------------------------------------------------------------------ the IPC path


async def test_ipc_pull_and_layer_wise_push_copy_device_to_device(pair: Pair) -> None:
    name = unique("kv")
    theirs = register(pair.owner, pair.owner_gpu, name, seed=1, blocks=32)
    mine = register(pair.reader, pair.reader_gpu, name, seed=2, blocks=16)
    remote, local = [3, 4, 5, 20, 9], [0, 1, 2, 7, 15]
    rid = unique("pull")
    lease = pair.owner.service.expose(rid, name, remote, ttl=10)
    await pair.reader.service.read(pair.owner.address, rid, name, remote, local)
    assert same_blocks(mine, local, theirs, remote)
    await asyncio.wait_for(lease.wait(), 5)

    # Push layer by layer into other blocks of the owner's region.
    wid = unique("push")
    targets = [30, 31, 10]
    wlease = pair.owner.service.expect(wid, name, targets, ttl=10)
    for layer in range(3):
        await pair.reader.service.write(
            pair.owner.address, wid, name, [8, 9, 10], targets, layers=[layer]
        )
    await asyncio.wait_for(wlease.wait(), 5)
    assert same_blocks(theirs, targets, mine, [8, 9, 10])

    nbytes = pair.reader.service.regions.get(name).nbytes(5 + 3, range(3))
    for node in (pair.owner, pair.reader):
        assert node.service.payload_bytes == {"tcp": 0, "shm": 0, "cuda_ipc": nbytes, "nccl": 0}
        assert node.service.staged_bytes == 0
    # Each owner tensor exported once, each allocation mapped once by the reader.
    assert len(pair.ipc.actions("owner", "export")) == 3
    assert len(pair.ipc.actions("reader", "open")) == 3
    assert pair.reader_gpu.asked_in_process == [True]  # both nodes live in this process


async def test_copies_run_on_the_blocks_stream_after_the_callers_work(pair: Pair) -> None:
    name = unique("kv")
    register(pair.owner, pair.owner_gpu, name, seed=1, blocks=8)
    register(pair.reader, pair.reader_gpu, name, seed=2, blocks=8)
    rid = unique("order")
    pair.owner.service.expose(rid, name, [1, 2, 6], ttl=10)
    await pair.reader.service.read(pair.owner.address, rid, name, [1, 2, 6], [4, 5, 0])
    actions = pair.reader_gpu.fake.actions("reader.side1")
    # The caller's stream at the call, then the consumer fence, then the
    # copies (two runs x K/V x 3 layers), then the event the loop polls.
    assert actions[:2] == ["wait reader.current-1", "wait reader.current-2"], actions
    assert [a.split()[0] for a in actions[2:]] == ["copy"] * 12 + ["record"], actions
    # The owner granted after its queued work: its lease fence was recorded.
    assert pair.owner_gpu.fake.actions("owner.current") == ["record owner.current-1"]


async def test_a_mapping_is_opened_once_and_closed_on_unregister_and_peer_loss(
    pair: Pair,
) -> None:
    name = unique("kv")
    register(pair.owner, pair.owner_gpu, name, seed=1, blocks=8, layers=2)
    register(pair.reader, pair.reader_gpu, name, seed=2, blocks=8, layers=2)
    for i in range(3):
        rid = unique("again")
        pair.owner.service.expose(rid, name, [i], ttl=10)
        await pair.reader.service.read(pair.owner.address, rid, name, [i], [i])
    assert len(pair.ipc.actions("reader", "open")) == 2  # two tensors, one mapping each
    assert pair.ipc.actions("reader", "close") == []

    pair.reader.service.unregister(name)
    assert sorted(pair.ipc.actions("reader", "close")) == sorted(pair.ipc.actions("reader", "open"))
    assert pair.reader_gpu.memory_.mapped == {}

    register(pair.reader, pair.reader_gpu, name, seed=3, blocks=8, layers=2)
    rid = unique("after")
    pair.owner.service.expose(rid, name, [5], ttl=10)
    await pair.reader.service.read(pair.owner.address, rid, name, [5], [5])
    assert len(pair.ipc.actions("reader", "open")) == 4
    pair.reader.lose(pair.owner.address, pair.owner.instance, PeerClosedError("gone"))
    assert len(pair.ipc.actions("reader", "close")) == 4
    assert pair.reader_gpu.memory_.mapped == {}


async def test_a_region_registered_anew_is_mapped_anew(pair: Pair) -> None:
    name = unique("kv")
    register(pair.owner, pair.owner_gpu, name, seed=1, blocks=8, layers=1)
    mine = register(pair.reader, pair.reader_gpu, name, seed=2, blocks=8, layers=1)
    rid = unique("first")
    pair.owner.service.expose(rid, name, [1], ttl=10)
    await pair.reader.service.read(pair.owner.address, rid, name, [1], [1])
    pair.owner.service.unregister(name)
    fresh = register(pair.owner, pair.owner_gpu, name, seed=9, blocks=8, layers=1)
    # The reader still holds the old mapping: this transfer stages (the owner
    # says "stream" to the stale export), and the mapping goes.
    rid = unique("stale")
    pair.owner.service.expose(rid, name, [2], ttl=10)
    await pair.reader.service.read(pair.owner.address, rid, name, [2], [2])
    assert same_blocks(mine, [2], fresh, [2])
    assert pair.reader.service.staged_bytes > 0
    assert pair.ipc.actions("reader", "close") == pair.ipc.actions("reader", "open")[:1]
    rid = unique("remapped")
    pair.owner.service.expose(rid, name, [3], ttl=10)
    await pair.reader.service.read(pair.owner.address, rid, name, [3], [3])
    assert same_blocks(mine, [3], fresh, [3])
    assert len(pair.ipc.actions("reader", "open")) == 2


# ------------------------------------------------------------------ choosing the path


@pytest.mark.parametrize(
    ("case", "payload"),
    [
        ("other-host", "tcp"),  # both on GPUs, different hosts: staged over tcp
        ("cpu-owner", "shm"),  # mixed pair on one host: staged over shm
        ("cpu-reader", "shm"),
        ("tcp-forced", "tcp"),  # one side forces tcp: no IPC either
        ("open-fails", "shm"),  # IPC refused by the driver: staged, remembered
    ],
)
async def test_the_path_for_each_pair_of_placements(case: str, payload: str) -> None:
    p = await make_pair(
        owner_host="elsewhere" if case == "other-host" else None,
        owner_link="tcp" if case == "tcp-forced" else "auto",
    )
    try:
        if case == "open-fails":
            p.ipc.fail_open = "cudaErrorInvalidDevice"
        name = unique("kv")
        theirs = register(p.owner, None if case == "cpu-owner" else p.owner_gpu, name, 1, 16)
        mine = register(p.reader, None if case == "cpu-reader" else p.reader_gpu, name, 2, 16)
        for i in range(2):
            rid = unique("pull")
            p.owner.service.expose(rid, name, [3 + i, 7], ttl=10)
            await p.reader.service.read(p.owner.address, rid, name, [3 + i, 7], [10, 2 + i])
            assert same_blocks(mine, [10, 2 + i], theirs, [3 + i, 7])
            wid = unique("push")
            p.owner.service.expect(wid, name, [12, 13], ttl=10)
            await p.reader.service.write(p.owner.address, wid, name, [0, 1], [12, 13])
            assert same_blocks(theirs, [12, 13], mine, [0, 1])
        svc = p.reader.service
        assert svc.payload_bytes["cuda_ipc"] == 0 and svc.payload_bytes[payload] > 0
        other = "tcp" if payload == "shm" else "shm"
        assert svc.payload_bytes[other] == 0, svc.payload_bytes
        gpu_side = p.owner if case == "cpu-reader" else p.reader
        assert gpu_side.service.staged_bytes > 0
        assert p.ipc.actions(action="open") == []
        # Refused IPC is remembered per peer and region: one try, not one per transfer.
        assert len(p.ipc.actions(action="export")) == (3 if case == "open-fails" else 0)
    finally:
        await p.reader.aclose()
        await p.owner.aclose()


async def test_tensors_of_one_region_must_share_a_device() -> None:
    gpu = FakeGpu("x")
    async with await BlockNode.start(gpu=gpu) as node:
        layers = make_layers(1, 2, 4)
        with pytest.raises(RegionError, match="must be on one device"):
            node.service.register("mixed", [gpu.tensor(layers[0]), layers[1]], block_dim=1)
        assert "mixed" not in node.service.regions


# ------------------------------------------------------------------ checks before copies


@pytest.mark.parametrize("lie", ["more-blocks-than-mapped", "fewer-blocks-than-granted"])
async def test_a_lying_export_is_refused_before_any_copy(pair: Pair, lie: str) -> None:
    name = unique("kv")
    register(pair.owner, pair.owner_gpu, name, seed=1, blocks=8, layers=2)
    mine = register(pair.reader, pair.reader_gpu, name, seed=2, blocks=8, layers=2)
    before = [t.clone() for t in mine]
    honest = pair.owner.service._export

    def lying(region: object, in_process: bool) -> Export:
        export = honest(region, in_process)  # type: ignore[arg-type]
        blocks = 64 if lie == "more-blocks-than-mapped" else 4
        per_block = export.tensors[0].nbytes // export.num_blocks
        tensors = tuple(replace(t, nbytes=per_block * blocks) for t in export.tensors)
        if lie == "more-blocks-than-mapped":  # consistent, but past the allocation's end
            tensors = tuple(replace(t, size=t.offset + t.nbytes) for t in tensors)
        return replace(export, num_blocks=blocks, tensors=tensors)

    pair.owner.service._export = lying  # type: ignore[method-assign]
    rid = unique("lie")
    pair.owner.service.expose(rid, name, [6, 7], ttl=10)
    with pytest.raises(MalformedFrameError, match=r"blocks|allocation|outside"):
        await pair.reader.service.read(pair.owner.address, rid, name, [6, 7], [0, 1])
    assert pair.reader_gpu.copies() == 0  # refused while planning: nothing enqueued
    assert all(torch.equal(a, b) for a, b in zip(mine, before, strict=True))
    assert pair.reader_gpu.memory_.mapped == {}  # nothing left mapped either


async def test_blocks_the_lease_does_not_grant_are_refused_before_any_copy(pair: Pair) -> None:
    name = unique("kv")
    register(pair.owner, pair.owner_gpu, name, seed=1, blocks=8)
    register(pair.reader, pair.reader_gpu, name, seed=2, blocks=8)
    rid = unique("grant")
    pair.owner.service.expose(rid, name, [1, 2], ttl=10)
    with pytest.raises(Exception, match="does not grant blocks 3"):
        await pair.reader.service.read(pair.owner.address, rid, name, [1, 3], [0, 1])
    assert pair.reader_gpu.copies() == 0


# ------------------------------------------------------------------ completion, death, cancel


async def test_the_lease_completes_only_after_the_copy_event(pair: Pair) -> None:
    name = unique("kv")
    theirs = register(pair.owner, pair.owner_gpu, name, seed=1, blocks=8, layers=1)
    mine = register(pair.reader, pair.reader_gpu, name, seed=2, blocks=8, layers=1)
    before = mine[0].clone()
    rid = unique("held")
    lease = pair.owner.service.expose(rid, name, [1, 2], ttl=10)
    pair.reader_gpu.fake.paused = True  # copies queue up but do not run
    read = asyncio.ensure_future(
        pair.reader.service.read(pair.owner.address, rid, name, [1, 2], [5, 6])
    )
    await until(lambda: pair.reader_gpu.copies() > 0)
    await asyncio.sleep(0.05)
    assert not read.done() and not lease.ended and lease.remaining == 2
    assert torch.equal(mine[0], before)  # nothing copied yet
    pair.reader_gpu.fake.paused = False
    await asyncio.wait_for(read, 5)
    await asyncio.wait_for(lease.wait(), 5)
    assert same_blocks(mine, [5, 6], theirs, [1, 2])


async def test_the_owner_dying_mid_copy_fails_the_reader_and_unmaps_after_the_copy() -> None:
    p = await make_pair()
    try:
        name = unique("kv")
        register(p.owner, p.owner_gpu, name, seed=1, blocks=8, layers=2)
        register(p.reader, p.reader_gpu, name, seed=2, blocks=8, layers=2)
        rid = unique("dies")
        p.owner.service.expose(rid, name, [1, 2], ttl=10)
        p.reader_gpu.fake.paused = True
        read = asyncio.ensure_future(
            p.reader.service.read(p.owner.address, rid, name, [1, 2], [3, 4])
        )
        await until(lambda: p.reader_gpu.copies() > 0)
        await p.owner.aclose()  # its sockets close
        p.reader.lose(p.owner.address, p.owner.instance, PeerClosedError("owner died"))
        with pytest.raises(PeerClosedError, match="owner died"):
            await asyncio.wait_for(read, 5)
        # The copy still runs on the device: its mappings stay until it completes.
        assert p.ipc.actions("reader", "close") == []
        p.reader_gpu.fake.paused = False
        await until(lambda: len(p.ipc.actions("reader", "close")) == 2)
        assert p.reader_gpu.memory_.mapped == {}
    finally:
        p.reader_gpu.fake.paused = False
        await p.reader.aclose()
        await p.owner.aclose()


async def test_the_owner_vanishing_without_a_peer_event_is_peer_closed() -> None:
    p = await make_pair()
    try:
        name = unique("kv")
        register(p.owner, p.owner_gpu, name, seed=1, blocks=8, layers=1)
        register(p.reader, p.reader_gpu, name, seed=2, blocks=8, layers=1)
        rid = unique("eof")
        p.owner.service.expose(rid, name, [1], ttl=10)
        p.reader_gpu.fake.paused = True
        read = asyncio.ensure_future(p.reader.service.read(p.owner.address, rid, name, [1], [3]))
        await until(lambda: p.reader_gpu.copies() > 0)
        await p.owner.aclose()
        p.reader_gpu.fake.paused = False
        with pytest.raises(PeerClosedError):
            await asyncio.wait_for(read, 5)
    finally:
        p.reader_gpu.fake.paused = False
        await p.reader.aclose()
        await p.owner.aclose()


async def test_the_reader_dying_mid_copy_fails_the_owners_lease() -> None:
    p = await make_pair()
    try:
        name = unique("kv")
        register(p.owner, p.owner_gpu, name, seed=1, blocks=8, layers=1)
        register(p.reader, p.reader_gpu, name, seed=2, blocks=8, layers=1)
        rid = unique("reader-dies")
        lease = p.owner.service.expose(rid, name, [1, 2], ttl=10)
        p.reader_gpu.fake.paused = True
        read = asyncio.ensure_future(
            p.reader.service.read(p.owner.address, rid, name, [1, 2], [3, 4])
        )
        await until(lambda: p.reader_gpu.copies() > 0)
        closing = asyncio.ensure_future(p.reader.aclose())
        with pytest.raises(PeerClosedError, match="mid-read"):
            await asyncio.wait_for(lease.wait(), 5)
        p.reader_gpu.fake.paused = False
        await asyncio.wait_for(closing, 5)
        with pytest.raises(Exception):  # noqa: B017 - closed under it: any typed end
            await read
        assert p.reader_gpu.memory_.mapped == {}
    finally:
        p.reader_gpu.fake.paused = False
        await p.reader.aclose()
        await p.owner.aclose()


@pytest.mark.parametrize("op", ["read", "write"])
async def test_a_cancelled_ipc_transfer_counts_for_nothing_and_keeps_the_link(
    pair: Pair, op: str
) -> None:
    name = unique("kv")
    theirs = register(pair.owner, pair.owner_gpu, name, seed=1, blocks=8, layers=2)
    mine = register(pair.reader, pair.reader_gpu, name, seed=2, blocks=8, layers=2)
    rid = unique("cancel")
    grant = pair.owner.service.expose if op == "read" else pair.owner.service.expect
    lease = grant(rid, name, [1, 2], ttl=10)
    call = pair.reader.service.read if op == "read" else pair.reader.service.write
    ids = ([1, 2], [5, 6]) if op == "read" else ([5, 6], [1, 2])  # read: remote first
    pair.reader_gpu.fake.paused = True
    task = asyncio.ensure_future(call(pair.owner.address, rid, name, *ids))
    await until(lambda: pair.reader_gpu.copies() > 0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pair.reader_gpu.fake.paused = False
    await until(lambda: not pair.reader.service._ops)  # the abort went through
    assert not lease.ended and lease.remaining == 4  # nothing counted
    await call(pair.owner.address, rid, name, *ids)
    await asyncio.wait_for(lease.wait(), 5)
    if op == "read":
        assert same_blocks(mine, [5, 6], theirs, [1, 2])
    else:
        assert same_blocks(theirs, [1, 2], mine, [5, 6])
    assert pair.reader.dials == 1  # one connection throughout


async def test_copies_after_the_lease_ended_count_for_nothing(pair: Pair) -> None:
    name = unique("kv")
    register(pair.owner, pair.owner_gpu, name, seed=1, blocks=8, layers=1)
    register(pair.reader, pair.reader_gpu, name, seed=2, blocks=8, layers=1)
    rid = unique("ended")
    lease = pair.owner.service.expect(rid, name, [1, 2], ttl=10)
    pair.reader_gpu.fake.paused = True
    write = asyncio.ensure_future(
        pair.reader.service.write(pair.owner.address, rid, name, [5, 6], [1, 2])
    )
    await until(lambda: pair.reader_gpu.copies() > 0)
    lease.cancel()
    pair.reader_gpu.fake.paused = False
    with pytest.raises(LeaseCancelledError):
        await asyncio.wait_for(write, 5)
    assert lease.remaining == 2
