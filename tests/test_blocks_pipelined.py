"""Pipelined writes: a write's REQUEST, payload and commit go out without waiting,
the next write's bytes follow at once, and the answers come back in order.

Across a peer process (payloads over tcp and over shm): writes after the first
accepted one go pipelined and land; a refused write among them raises its own
typed error and leaves the others, the owner's memory and the lease alone; a
cancelled one is aborted without breaking the connection; an owner killed with
writes in flight fails every one of them with PeerClosedError. Against a raw
peer: a refused pipelined payload is read into scratch, never into a block, and
a pipelined claim the owner cannot bound is cut off before a byte is read.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator

import pytest
import torch
from blocks_net import PATHS, BlockNode, PeerClient, make_layers, node_beside, unique
from test_blocks_hostile import same_bits

from aiokvpipe.blocks import protocol
from aiokvpipe.blocks.protocol import Kind
from aiokvpipe.errors import (
    BlockError,
    BlockIdError,
    LeaseNotGrantedError,
    PeerClosedError,
)

BIG = (64, 8, 64)  # 64 KiB of bf16 per K or V block: a layer of 64 blocks is 8 MiB


@pytest.fixture(scope="module", params=sorted(PATHS))
def peer(request: pytest.FixtureRequest) -> Iterator[PeerClient]:
    client = PeerClient.spawn("asyncio", PATHS[request.param])
    yield client
    client.stop()


@pytest.fixture
async def node(peer: PeerClient) -> AsyncIterator[BlockNode]:
    async with node_beside(peer) as n:
        yield n
        assert not n.service._write_pipes  # every pipe retired with its last write


async def test_writes_after_an_accepted_one_go_pipelined_and_land(
    peer: PeerClient, node: BlockNode
) -> None:
    name = unique("kv")
    await peer.ok("register", name=name, seed=1, layers=4, blocks=32)
    local = make_layers(2, 4, 8)
    node.service.register(name, local, block_dim=1)
    remote = [4, 9, 10]
    for round_no in range(2):  # the second request reuses the pooled connection
        rid = unique("wise")
        await peer.ok("expect", request_id=rid, name=name, blocks=remote, ttl=10)
        writes = [
            node.service.write(peer.address, rid, name, [0, 1, 2], remote, layers=[layer])
            for layer in range(4)
        ]
        assert await asyncio.gather(*writes) == [None] * 4
        await peer.ok("wait", request_id=rid)
        # The first write of each request waits for the owner's REPLY; the rest do not.
        assert node.service.pipelined_writes == 3 * (round_no + 1)
    assert node.dials == 1
    landed = await peer.ok("blocks", name=name, blocks=list(range(32)))
    before = make_layers(1, 4, 32)
    keep = [b for b in range(32) if b not in remote]
    for got, mine, old in zip(landed, local, before, strict=True):
        assert torch.equal(got[:, remote], mine[:, [0, 1, 2]])
        assert torch.equal(got[:, keep], old[:, keep])


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ([4, 9, 11], LeaseNotGrantedError, "does not grant blocks 11"),
        ([4, 9, 99], BlockIdError, "block id 99 out of range"),
    ],
    ids=["ungranted", "out-of-range"],
)
async def test_a_refused_pipelined_write_leaves_the_others_landing(
    peer: PeerClient,
    node: BlockNode,
    bad: list[int],
    error: type[BlockError],
    match: str,
) -> None:
    name = unique("kv")
    await peer.ok("register", name=name, seed=3, layers=5, blocks=32)
    local = make_layers(4, 5, 8)
    node.service.register(name, local, block_dim=1)
    rid = unique("mid")
    remote = [4, 9, 10]
    await peer.ok("expect", request_id=rid, name=name, blocks=remote, ttl=10)
    writes = [
        node.service.write(
            peer.address, rid, name, [0, 1, 2], bad if layer == 2 else remote, layers=[layer]
        )
        for layer in range(5)
    ]
    results = await asyncio.gather(*writes, return_exceptions=True)

    assert [r is None for r in results] == [True, True, False, True, True], results
    assert isinstance(results[2], error), results[2]
    assert match in str(results[2]), results[2]
    assert node.service.pipelined_writes == 4  # the refused one was pipelined too
    # The lease still waits for exactly the refused layer; nothing else was touched.
    assert await peer.ok("state", request_id=rid) == {"ended": False, "remaining": 3}
    before = make_layers(3, 5, 32)
    landed = await peer.ok("blocks", name=name, blocks=list(range(32)))
    keep = [b for b in range(32) if b not in remote]
    for layer, (got, old) in enumerate(zip(landed, before, strict=True)):
        assert torch.equal(got[:, keep], old[:, keep])
        if layer == 2:
            assert torch.equal(got[:, remote], old[:, remote])

    # Same connection, still in step: the refused layer written right completes the lease.
    await node.service.write(peer.address, rid, name, [0, 1, 2], remote, layers=[2])
    await peer.ok("wait", request_id=rid)
    assert node.dials == 1
    landed = await peer.ok("blocks", name=name, blocks=remote)
    for got, mine in zip(landed, local, strict=True):
        assert torch.equal(got, mine[:, [0, 1, 2]])


async def test_cancelling_one_pipelined_write_aborts_it_alone(
    peer: PeerClient, node: BlockNode
) -> None:
    name = unique("kv")
    # 16 MiB a layer: more than a ring (8 MiB) or the socket buffers hold.
    shape = (64, 16, 64)
    await peer.ok("register", name=name, seed=5, layers=4, blocks=64, block_shape=shape)
    local = make_layers(6, 4, 64, block_shape=shape)
    node.service.register(name, local, block_dim=1)
    rid = unique("cancel")
    blocks = list(range(64))
    await peer.ok("expect", request_id=rid, name=name, blocks=blocks, ttl=30)
    tasks = layer_writes(node, peer, rid, name, blocks, 4)
    victim = None
    for _ in range(50_000):  # layer 2's write, pipelined, once it is under way
        for op in node.service._ops.values():
            if op.layers == (2,) and 0 < op.segs.moved < op.segs.total:
                victim = op
        if victim is not None:
            break
        await asyncio.sleep(0)
    assert victim is not None, "layer 2's write never got under way"
    assert node.service.pipelined_writes >= 2
    # Freeze the owner so the write cannot finish before the cancel is seen.
    os.kill(peer.pid, signal.SIGSTOP)
    try:
        tasks[2].cancel()
        for _ in range(1000):
            if victim.segs.redirected:
                break
            await asyncio.sleep(0)
        assert victim.segs.redirected  # from the cancel on, no byte came from the blocks
        assert victim.segs.moved < victim.segs.total
    finally:
        os.kill(peer.pid, signal.SIGCONT)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[2], asyncio.CancelledError)
    assert [results[i] for i in (0, 1, 3)] == [None, None, None], results
    # The aborted layer counted for nothing; the connection stayed in step.
    assert await peer.ok("state", request_id=rid) == {"ended": False, "remaining": 64}
    await node.service.write(peer.address, rid, name, blocks, blocks, layers=[2])
    await peer.ok("wait", request_id=rid)
    assert node.dials == 1
    landed = await peer.ok("blocks", name=name, blocks=blocks)
    assert all(torch.equal(a, b) for a, b in zip(landed, local, strict=True))


async def test_an_owner_declared_dead_fails_every_write_in_flight(
    peer: PeerClient, node: BlockNode
) -> None:
    name = unique("kv")
    await peer.ok("register", name=name, seed=9, layers=6, blocks=64, block_shape=BIG)
    node.service.register(name, make_layers(10, 6, 64, block_shape=BIG), block_dim=1)
    rid = unique("lost")
    blocks = list(range(64))
    await peer.ok("expect", request_id=rid, name=name, blocks=blocks, ttl=30)
    tasks = layer_writes(node, peer, rid, name, blocks, 6)
    for _ in range(50_000):
        if node.service.pipelined_writes >= 1:
            break
        await asyncio.sleep(0)
    # Synchronously, so no answer can slip in between: whatever is not done now must fail.
    unanswered = [i for i, task in enumerate(tasks) if not task.done()]
    node.lose(peer.address, peer.instance, RuntimeError("missed 3 heartbeats"))
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    assert len(unanswered) >= 4, results
    for i in unanswered:
        assert isinstance(results[i], PeerClosedError), (i, results[i])
        assert "missed 3 heartbeats" in str(results[i])
    assert not node.service._write_pipes and not node.service._ops
    # the owner saw the connection break under its lease
    assert (await peer.call("wait", request_id=rid))["error"] == "PeerClosedError"


@pytest.mark.parametrize("transport", sorted(PATHS))
async def test_an_owner_killed_with_writes_in_flight_fails_them_all(transport: str) -> None:
    owner = PeerClient.spawn("asyncio", PATHS[transport])
    try:
        async with await BlockNode.start(link=owner.transport) as node:
            await owner.ok("register", name="kv", seed=7, layers=6, blocks=64, block_shape=BIG)
            node.service.register("kv", make_layers(8, 6, 64, block_shape=BIG), block_dim=1)
            blocks = list(range(64))
            await owner.ok("expect", request_id="doomed", name="kv", blocks=blocks, ttl=30)
            done: list[int] = []

            async def write(layer: int) -> None:
                svc = node.service
                await svc.write(owner.address, "doomed", "kv", blocks, blocks, layers=[layer])
                done.append(layer)

            tasks = [asyncio.ensure_future(write(layer)) for layer in range(6)]
            for _ in range(50_000):
                if node.service.pipelined_writes >= 2:
                    break
                await asyncio.sleep(0)
            # Freeze the owner with writes pipelined to it, see which ones it
            # had answered, then kill it: every other one must fail.
            os.kill(owner.pid, signal.SIGSTOP)
            await asyncio.sleep(0.2)
            answered = list(done)
            os.kill(owner.pid, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
            failed = [i for i in range(6) if i not in answered]
            assert len(failed) >= 3, (answered, results)
            for i in failed:
                assert isinstance(results[i], PeerClosedError), (i, results[i])
            assert not node.service._write_pipes and not node.service._ops
    finally:
        owner.stop()


# ------------------------------------------------------------------ a raw peer


def layer_writes(
    node: BlockNode, peer: PeerClient, rid: str, name: str, blocks: list[int], layers: int
) -> list[asyncio.Future[None]]:
    """One write per layer of ``blocks``, issued at once (they pipeline on one connection)."""
    return [
        asyncio.ensure_future(
            node.service.write(peer.address, rid, name, blocks, blocks, layers=[layer])
        )
        for layer in range(layers)
    ]


async def raw_writes(owner: BlockNode, frames: list[bytes], answers: int) -> list[protocol.Message]:
    """Send ``frames`` back to back on one block connection; the first ``answers`` messages."""
    async with await BlockNode.start() as hostile:
        sock = (await hostile.dial(owner.address, "blocks")).sock
        sock.setblocking(False)
        try:
            loop = asyncio.get_running_loop()
            for frame in frames:
                await loop.sock_sendall(sock, frame)
            got = []
            for _ in range(answers):
                message = await protocol.read_message(sock, "raw", eof_ok=True)
                if message is None:
                    break
                got.append(message)
            return got
        finally:
            sock.close()


def pipelined(
    owner: BlockNode, rid: str, blocks: list[int], payload: bytes | None = None, **lie: int
) -> list[bytes]:
    """A pipelined write of ``blocks`` (every layer) with its payload and commit."""
    region = owner.service.regions.get("kv")
    layers = list(range(region.num_layers))
    nbytes = region.nbytes(len(blocks), layers)
    layouts = [region.layout(i) for i in layers]
    body, ids = protocol.request(
        "write", rid, "kv", layers, layouts, nbytes, blocks, pipelined=True
    )
    body.update(lie)
    if payload is None:
        payload = b"\xff" * body["nbytes"]
    commit = protocol.encode(Kind.STATUS, {"status": "commit"})
    return [protocol.encode(Kind.REQUEST, body, ids), payload, commit]


async def test_a_refused_pipelined_payload_is_read_into_scratch_only() -> None:
    async with await BlockNode.start() as owner:
        region = make_layers(0, 2, 16)
        owner.service.register("kv", region, block_dim=1)
        pristine = [t.clone() for t in region]
        lease = owner.service.expect("r", "kv", [3, 4], ttl=10)
        good = bytes(range(256)) * (owner.service.regions.get("kv").nbytes(2, [0, 1]) // 256)
        frames = [
            *pipelined(owner, "r", [3, 5]),  # block 5 not granted: read, dropped
            *pipelined(owner, "nobody", [3]),  # no such lease
            *pipelined(owner, "r", [3, 4], good),  # lands
        ]
        answers = await raw_writes(owner, frames, 3)
        assert [m.body["status"] for m in answers] == ["error", "error", "landed"]
        assert answers[0].body["error"] == "LeaseNotGrantedError"
        assert "does not grant blocks 5" in answers[0].body["message"]
        assert answers[1].body["error"] == "LeaseNotGrantedError"
        await lease.wait()
        assert owner.service.cut_off == 0
        keep = [b for b in range(16) if b not in (3, 4)]
        for now, old in zip(region, pristine, strict=True):
            assert same_bits(now[:, keep], old[:, keep])  # 5 included: 0xff never landed
        assert not all(same_bits(now, old) for now, old in zip(region, pristine, strict=True))


@pytest.mark.parametrize(
    ("lie", "match"),
    [
        ({"nbytes_delta": 1}, "whose layouts hold"),
        ({"nbytes_delta": -2}, "whose layouts hold"),
        ({"many_ids": 1}, "more than any region here holds"),
    ],
    ids=["one-byte-more", "two-bytes-less", "beyond-every-region"],
)
async def test_a_pipelined_claim_the_owner_cannot_bound_is_cut_off(
    lie: dict[str, int], match: str
) -> None:
    async with await BlockNode.start() as owner:
        region = make_layers(0, 2, 16)
        owner.service.register("kv", region, block_dim=1)
        pristine = [t.clone() for t in region]
        lease = owner.service.expect("r", "kv", [3, 4], ttl=10)
        reg = owner.service.regions.get("kv")
        if "many_ids" in lie:
            ids = list(range(17))  # honest sizes, more blocks than the region has
            frames = pipelined(owner, "r", ids, b"")[:1]
        else:
            nbytes = reg.nbytes(2, [0, 1]) + lie["nbytes_delta"]
            frames = pipelined(owner, "r", [3, 4], b"", nbytes=nbytes)[:1]
            frames.append(b"\xff" * max(nbytes, 0))
        assert await raw_writes(owner, frames, 1) == []  # cut off: no answer, EOF
        assert owner.service.cut_off == 1
        assert match in owner.service.last_cut_off, owner.service.last_cut_off
        assert all(same_bits(a, b) for a, b in zip(region, pristine, strict=True))
        assert not lease.ended  # a lying connection does not end a lease it never touched
        lease.cancel()
