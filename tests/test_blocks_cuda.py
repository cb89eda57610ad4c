"""Paged-block transfers of GPU regions on a real device (``nox -s gpu``); skipped elsewhere.

The same cases the fakes cover in test_blocks_gpu_fakes.py, end to end:
CUDA IPC between two endpoints of one process (raw pointers) and between two
processes on one GPU (IPC handles), staging for mixed pairs over shared
memory, and for GPU regions "on another host" over TCP.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import shm_workers
import torch
from blocks_net import BlockNode, PeerClient, make_layers, unique

from aiokvpipe.cuda.runtime import cuda_available

requires_cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.cuda, requires_cuda]

DEVICE = torch.device("cuda", 0)


@pytest.fixture(scope="module", autouse=True)
def warm_cuda() -> Iterator[None]:
    """CUDA's process-wide fds and threads (cupy's too) before the leak check looks."""
    torch.cuda.init()  # type: ignore[no-untyped-call]
    torch.empty(1, pin_memory=True)
    torch.empty(1, device=DEVICE).add_(1)
    from aiokvpipe.cuda.streams import dedicated_stream, staging_stream

    dedicated_stream(DEVICE)
    staging_stream(DEVICE)
    torch.cuda.synchronize(DEVICE)
    yield


def gpu_layers(seed: int, blocks: int, layers: int = 3) -> list[torch.Tensor]:
    return [t.to(DEVICE) for t in make_layers(seed, layers, blocks)]


def same_blocks(
    dst: list[torch.Tensor], dst_ids: list[int], src: list[torch.Tensor], src_ids: list[int]
) -> bool:
    d, s = torch.tensor(dst_ids), torch.tensor(src_ids)
    return all(
        torch.equal(a.cpu().index_select(1, d), b.cpu().index_select(1, s))
        for a, b in zip(dst, src, strict=True)
    )


@pytest.fixture
async def nodes() -> AsyncIterator[tuple[BlockNode, BlockNode]]:
    async with await BlockNode.start(link="auto") as a, await BlockNode.start(link="auto") as b:
        yield a, b


async def test_ipc_pull_and_push_in_one_process(nodes: tuple[BlockNode, BlockNode]) -> None:
    owner, reader = nodes
    name = unique("kv")
    theirs, mine = gpu_layers(1, 64), gpu_layers(2, 32)
    owner.service.register(name, theirs, block_dim=1)
    reader.service.register(name, mine, block_dim=1)
    rid = unique("pull")
    lease = owner.service.expose(rid, name, [3, 4, 5, 40], ttl=30)
    await reader.service.read(owner.address, rid, name, [3, 4, 5, 40], [0, 1, 9, 31])
    await asyncio.wait_for(lease.wait(), 10)
    assert same_blocks(mine, [0, 1, 9, 31], theirs, [3, 4, 5, 40])
    wid = unique("push")
    wlease = owner.service.expect(wid, name, [60, 61], ttl=30)
    for layer in range(3):
        await reader.service.write(owner.address, wid, name, [7, 8], [60, 61], layers=[layer])
    await asyncio.wait_for(wlease.wait(), 10)
    assert same_blocks(theirs, [60, 61], mine, [7, 8])
    assert reader.service.payload_bytes["cuda_ipc"] > 0
    assert reader.service.payload_bytes["tcp"] == reader.service.payload_bytes["shm"] == 0


@pytest.mark.parametrize("gpu_side", ["owner", "reader"])
async def test_mixed_pairs_stage_over_shared_memory(
    nodes: tuple[BlockNode, BlockNode], gpu_side: str
) -> None:
    owner, reader = nodes
    name = unique("kv")
    theirs = gpu_layers(1, 16) if gpu_side == "owner" else make_layers(1, 3, 16)
    mine = gpu_layers(2, 16) if gpu_side == "reader" else make_layers(2, 3, 16)
    owner.service.register(name, theirs, block_dim=1)
    reader.service.register(name, mine, block_dim=1)
    rid = unique("pull")
    owner.service.expose(rid, name, [1, 2, 9], ttl=30)
    await reader.service.read(owner.address, rid, name, [1, 2, 9], [4, 5, 0])
    wid = unique("push")
    owner.service.expect(wid, name, [12, 13], ttl=30)
    await reader.service.write(owner.address, wid, name, [6, 7], [12, 13])
    assert same_blocks(mine, [4, 5, 0], theirs, [1, 2, 9])
    assert same_blocks(theirs, [12, 13], mine, [6, 7])
    assert reader.service.payload_bytes["shm"] > 0
    assert reader.service.payload_bytes["cuda_ipc"] == 0


async def test_gpu_regions_on_two_hosts_stage_over_tcp() -> None:
    async with (
        await BlockNode.start(link="auto", host_id="elsewhere") as owner,
        await BlockNode.start(link="auto") as reader,
    ):
        name = unique("kv")
        theirs, mine = gpu_layers(1, 16), gpu_layers(2, 16)
        owner.service.register(name, theirs, block_dim=1)
        reader.service.register(name, mine, block_dim=1)
        rid = unique("pull")
        owner.service.expose(rid, name, [1, 2, 9], ttl=30)
        await reader.service.read(owner.address, rid, name, [1, 2, 9], [4, 5, 0])
        assert same_blocks(mine, [4, 5, 0], theirs, [1, 2, 9])
        assert reader.service.payload_bytes["tcp"] > 0
        assert reader.service.staged_bytes > 0 and owner.service.staged_bytes > 0


@pytest.mark.timeout(180)
async def test_ipc_between_two_processes_on_one_gpu() -> None:
    shm_workers.start_resource_tracker()
    peer = PeerClient.spawn("asyncio", "auto")
    try:
        async with await BlockNode.start(link="auto") as node:
            name = unique("kv")
            await peer.ok("register", name=name, seed=1, layers=3, blocks=64, device="cuda:0")
            mine = gpu_layers(2, 32)
            node.service.register(name, mine, block_dim=1)
            rid = unique("pull")
            await peer.ok("expose", request_id=rid, name=name, blocks=[5, 6, 50], ttl=30)
            await node.service.read(peer.address, rid, name, [5, 6, 50], [1, 2, 3])
            source = make_layers(1, 3, 64)
            assert same_blocks(mine, [1, 2, 3], source, [5, 6, 50])
            await peer.ok("wait", request_id=rid)

            wid = unique("push")
            await peer.ok("expect", request_id=wid, name=name, blocks=[60, 61], ttl=30)
            for layer in range(3):
                await node.service.write(peer.address, wid, name, [8, 9], [60, 61], [layer])
            await peer.ok("wait", request_id=wid)
            landed = await peer.ok("blocks", name=name, blocks=[60, 61])
            want = [t.cpu().index_select(1, torch.tensor([8, 9])) for t in mine]
            assert all(torch.equal(a, b) for a, b in zip(landed, want, strict=True))
            assert node.service.payload_bytes["cuda_ipc"] > 0
            assert node.service.payload_bytes["tcp"] == node.service.payload_bytes["shm"] == 0
            assert (await peer.ok("payload_bytes"))["cuda_ipc"] > 0
    finally:
        peer.stop()
