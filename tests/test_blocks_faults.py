"""Deaths, lost peers and cancellation in the middle of block transfers, across processes.

"Mid-transfer" is made certain, not hoped for: scripted peers say when they
stopped halfway, and cancellations wait until the transfer has moved bytes.
Every test runs with payloads over tcp and over shared memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import blocks_net
import pytest
import torch
from blocks_net import PATHS, BlockNode, PeerClient, make_layers, message_from, node_beside, unique

from aiokvpipe.bench.procs import worker_context
from aiokvpipe.errors import PeerClosedError

BIG = (64, 8, 64)  # 64 KiB of bf16 per K or V block: a transfer takes milliseconds


@pytest.fixture(scope="module", params=sorted(PATHS))
def peer(request: pytest.FixtureRequest) -> Iterator[PeerClient]:
    client = PeerClient.spawn("uvloop", PATHS[request.param])
    yield client
    client.stop()


@pytest.fixture
async def node(peer: PeerClient) -> AsyncIterator[BlockNode]:
    async with node_beside(peer) as n:
        yield n


def spawn(target: Any, *args: Any) -> tuple[Any, Any]:
    ctx = worker_context()
    parent, child = ctx.Pipe()
    process = ctx.Process(target=target, args=(child, *args), daemon=True)
    process.start()
    child.close()
    return parent, process


def reap(conn: Any, process: Any) -> None:
    process.kill()
    process.join(10)
    process.close()
    conn.close()


async def moving(node: BlockNode) -> Any:
    """The node's one transfer in flight, once it has moved some payload (not all)."""
    for _ in range(20_000):
        ops = list(node.service._ops.values())
        if ops and 0 < ops[0].segs.moved < ops[0].segs.total:
            return ops[0]
        await asyncio.sleep(0)
    pytest.fail("the transfer never got under way")


async def quiet(node: BlockNode) -> None:
    """Until every transfer (a cancelled one finishing its framing) is over."""
    for _ in range(2000):
        if not node.service._ops:
            return
        await asyncio.sleep(0.005)
    pytest.fail("a cancelled transfer never finished its framing")


async def test_reader_dies_mid_read_fails_the_owners_lease(peer: PeerClient) -> None:
    # A 1 MiB ring for a 4 MiB read: over shm the owner is left waiting on the
    # ring for a chunk the dead reader holds, not on the socket.
    node = await BlockNode.start(link=peer.transport, shm_ring_bytes=1 << 20)
    region = torch.zeros(2, 64, 32768, dtype=torch.uint8)
    node.service.register("big", region, block_dim=1)
    lease = node.service.expose("doomed", "big", list(range(64)), ttl=30)
    args = (node.address, "doomed", "big", 64, peer.transport)
    conn, process = spawn(blocks_net.raw_reader_main, *args)
    try:
        assert await asyncio.wait_for(message_from(conn), 30) == "mid-read"
        assert not lease.ended
        process.kill()
        with pytest.raises(PeerClosedError, match=r"node-[0-9]+ was lost mid-read") as info:
            await asyncio.wait_for(lease.wait(), 5)
        if peer.transport == "auto":
            assert "shared-memory ring after" in str(info.value), info.value
        # the memory is free again: a new lease on the same blocks is granted
        node.service.expose("doomed-2", "big", list(range(64)), ttl=1).cancel()
    finally:
        reap(conn, process)
        await node.aclose()


async def test_owner_dies_mid_read_the_reader_gets_peer_closed(node: BlockNode) -> None:
    local = make_layers(1, 2, 32, block_shape=BIG)
    before = [t.clone() for t in local]
    node.service.register("kv", local, block_dim=1)
    conn, process = spawn(blocks_net.raw_owner_main, node.local.transport)
    try:
        owner = await asyncio.wait_for(message_from(conn), 30)
        dest = [4, 5, 6, 20]
        read = asyncio.ensure_future(node.service.read(owner, "r", "kv", [0, 1, 2, 3], dest))
        assert await asyncio.wait_for(message_from(conn), 30) == "mid-read"
        process.kill()
        with pytest.raises(PeerClosedError, match=f"read from {owner}.*after") as info:
            await asyncio.wait_for(read, 5)
        if node.local.transport == "auto":
            assert "shared-memory ring after 524288 of 1048576 bytes" in str(info.value)
    finally:
        reap(conn, process)
    # the destination blocks are undefined; nothing else was written
    keep = [b for b in range(32) if b not in dest]
    assert all(torch.equal(a[:, keep], b[:, keep]) for a, b in zip(local, before, strict=True))


async def test_a_lost_peer_fails_the_leases_it_used(peer: PeerClient, node: BlockNode) -> None:
    name = unique("kv")
    node.service.register(name, make_layers(2, 2, 16), block_dim=1)
    await peer.ok("register", name=name, seed=3, layers=2, blocks=16)
    lease = node.service.expose("bound", name, [1, 2], ttl=30)
    untouched = node.service.expose("unbound", name, [1, 2], ttl=30)
    await peer.ok(
        "read", owner=node.address, request_id="bound", name=name, remote=[1, 2], local=[3, 4],
        layers=[0],
    )  # fmt: skip
    node.lose(peer.address, peer.instance, RuntimeError("silent for 2.0 s"))
    with pytest.raises(PeerClosedError, match=f"peer {peer.instance} was lost: silent for 2.0 s"):
        await lease.wait()
    assert not untouched.ended  # a lease the lost peer never used is not its business
    untouched.cancel()


async def test_a_lost_owner_fails_the_read_in_flight(peer: PeerClient, node: BlockNode) -> None:
    name = unique("kv")
    node.service.register(name, make_layers(4, 2, 64, block_shape=BIG), block_dim=1)
    await peer.ok("register", name=name, seed=5, layers=2, blocks=64, block_shape=BIG)
    rid = unique("lost")
    await peer.ok("expose", request_id=rid, name=name, blocks=list(range(64)), ttl=30)
    read = asyncio.ensure_future(
        node.service.read(peer.address, rid, name, list(range(64)), list(range(64)))
    )
    await moving(node)
    node.lose(peer.address, peer.instance, RuntimeError("replaced by a new instance"))
    with pytest.raises(PeerClosedError, match="replaced by a new instance"):
        await asyncio.wait_for(read, 5)
    # the owner saw the connection break mid-transfer: its lease failed too
    owner_side = await peer.call("wait", request_id=rid)
    assert owner_side["error"] == "PeerClosedError", owner_side


@pytest.mark.parametrize("op", ["read", "write"])
async def test_a_cancelled_transfer_counts_for_nothing_and_keeps_the_link(
    peer: PeerClient, node: BlockNode, op: str
) -> None:
    name = unique("kv")
    local = make_layers(6, 2, 64, block_shape=BIG)
    before = [t.clone() for t in local]
    node.service.register(name, local, block_dim=1)
    await peer.ok("register", name=name, seed=7, layers=2, blocks=64, block_shape=BIG)
    rid = unique(op)
    blocks = list(range(64))
    grant = "expose" if op == "read" else "expect"
    await peer.ok(grant, request_id=rid, name=name, blocks=blocks, ttl=30)
    transfer = getattr(node.service, op)
    task = asyncio.ensure_future(transfer(peer.address, rid, name, blocks, blocks))
    segs = (await moving(node)).segs
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert segs.redirected  # from here on no byte touches the blocks
    await quiet(node)
    assert await peer.ok("state", request_id=rid) == {"ended": False, "remaining": 128}
    if op == "write":  # a cancelled write's source blocks were only read
        assert all(torch.equal(a, b) for a, b in zip(local, before, strict=True))

    await transfer(peer.address, rid, name, blocks, blocks)  # again, on the same link
    await peer.ok("wait", request_id=rid)
    assert node.dials == 1
    if op == "read":
        expected = make_layers(7, 2, 64, block_shape=BIG)
        assert all(torch.equal(a, b) for a, b in zip(local, expected, strict=True))
    else:
        landed = await peer.ok("blocks", name=name, blocks=blocks)
        assert all(torch.equal(a, b) for a, b in zip(landed, local, strict=True))
