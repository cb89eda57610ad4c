"""Block reads and writes between this process and a peer process, and every refusal.

One peer process serves the whole module (spawning one costs seconds of
torch import); each test uses its own request ids and region names. The
peer registers with ``make_layers(seed, ...)``, so this side knows what its
blocks hold without asking.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import shm_workers
import torch
from blocks_net import PATHS, BlockNode, PeerClient, make_layers, node_beside, unique

from aiokvpipe.errors import (
    BlockIdError,
    BlockShapeError,
    LeaseCompletedError,
    LeaseExpiredError,
    LeaseNotGrantedError,
    UnknownRegionError,
)


@pytest.fixture(scope="module", params=sorted(PATHS))
def peer(request: pytest.FixtureRequest) -> Iterator[PeerClient]:
    """The peer process; every test runs with payloads over tcp and over shm."""
    shm_workers.start_resource_tracker()  # spawn's process-wide helper: not a leak
    client = PeerClient.spawn("asyncio", PATHS[request.param])
    yield client
    client.stop()


@pytest.fixture
async def node(peer: PeerClient) -> AsyncIterator[BlockNode]:
    async with node_beside(peer) as n:  # no payload took the other path here...
        yield n
        other = "tcp" if peer.transport == "auto" else "shm"
        assert (await peer.ok("payload_bytes"))[other] == 0  # ...nor at the peer


async def remote_region(peer: PeerClient, seed: int, layers: int = 3, blocks: int = 64) -> str:
    name = unique("kv")
    await peer.ok("register", name=name, seed=seed, layers=layers, blocks=blocks)
    return name


def untouched_except(
    now: list[torch.Tensor], before: list[torch.Tensor], blocks: list[int]
) -> bool:
    keep = [b for b in range(before[0].shape[1]) if b not in blocks]
    return all(torch.equal(n[:, keep], b[:, keep]) for n, b in zip(now, before, strict=True))


async def test_pull_scattered_blocks_from_a_peer_process(peer: PeerClient, node: BlockNode) -> None:
    name = await remote_region(peer, seed=1)
    local = make_layers(2, 3, 40)
    before = [t.clone() for t in local]
    node.service.register(name, local, block_dim=1)
    remote, dest = [3, 4, 5, 17, 9, 60], [0, 1, 2, 20, 7, 39]
    rid = unique("pull")
    await peer.ok("expose", request_id=rid, name=name, blocks=remote, ttl=10)

    await node.service.read(peer.address, rid, name, remote_blocks=remote, local_blocks=dest)

    source = make_layers(1, 3, 64)
    for got, want in zip(local, source, strict=True):
        assert torch.equal(got[:, dest], want[:, remote])
    assert untouched_except(local, before, dest)
    await peer.ok("wait", request_id=rid)  # the owner's lease completed
    path = "shm" if peer.transport == "auto" else "tcp"
    assert node.service.payload_bytes[path] == node.service.regions.get(name).nbytes(6, [0, 1, 2])


async def test_a_read_and_a_pipelined_write_of_thousands_of_small_block_runs(
    peer: PeerClient, node: BlockNode
) -> None:
    """128-byte blocks, scattered: a 2 MiB syscall batch is IOV_MAX runs, and
    the REPLY (read) or REQUEST (pipelined write) riding with the payload's
    first bytes must still fit in one call (it made IOV_MAX + 1: EMSGSIZE)."""
    name = await remote_region(peer, seed=5, layers=2, blocks=1400)
    local = make_layers(6, 2, 1400)
    node.service.register(name, local, block_dim=1)
    remote = list(range(0, 1400, 2))  # 700 blocks, none adjacent: 2800 runs
    dest = list(range(1, 1400, 2))
    rid = unique("pull")
    await peer.ok("expose", request_id=rid, name=name, blocks=remote, ttl=10)
    await node.service.read(peer.address, rid, name, remote_blocks=remote, local_blocks=dest)
    source = make_layers(5, 2, 1400)
    for got, want in zip(local, source, strict=True):
        assert torch.equal(got[:, dest], want[:, remote])
    await peer.ok("wait", request_id=rid)

    wid = unique("push")
    await peer.ok("expect", request_id=wid, name=name, blocks=dest, ttl=10)
    for layer in (0, 1):  # the second write of the request goes pipelined
        await node.service.write(
            peer.address, wid, name, local_blocks=dest, remote_blocks=dest, layers=[layer]
        )
    await peer.ok("wait", request_id=wid)
    assert node.service.pipelined_writes >= 1


async def test_a_read_lease_completes_with_its_last_layer(
    peer: PeerClient, node: BlockNode
) -> None:
    name = await remote_region(peer, seed=3)
    local = make_layers(4, 3, 16)
    node.service.register(name, local, block_dim=1)
    rid = unique("layers")
    await peer.ok("expose", request_id=rid, name=name, blocks=[8, 9], ttl=10)
    await node.service.read(peer.address, rid, name, [8, 9], [0, 1], layers=[0])
    assert await peer.ok("state", request_id=rid) == {"ended": False, "remaining": 4}
    await node.service.read(peer.address, rid, name, [8, 9], [0, 1], layers=[2, 1])
    await peer.ok("wait", request_id=rid)
    for got, want in zip(local, make_layers(3, 3, 64), strict=True):
        assert torch.equal(got[:, [0, 1]], want[:, [8, 9]])


async def test_push_layer_by_layer_completes_the_write_lease(
    peer: PeerClient, node: BlockNode
) -> None:
    name = await remote_region(peer, seed=5, blocks=48)
    local = make_layers(6, 3, 8)
    node.service.register(name, local, block_dim=1)
    rid = unique("push")
    remote = [10, 11, 30]
    await peer.ok("expect", request_id=rid, name=name, blocks=remote, ttl=10)
    for layer in range(3):
        await node.service.write(peer.address, rid, name, [1, 2, 3], remote, layers=[layer])
        state = await peer.ok("state", request_id=rid)
        assert state == {"ended": layer == 2, "remaining": 3 * (2 - layer)}
    await peer.ok("wait", request_id=rid)
    landed = await peer.ok("blocks", name=name, blocks=list(range(48)))
    before = make_layers(5, 3, 48)
    for got, mine, old in zip(landed, local, before, strict=True):
        assert torch.equal(got[:, remote], mine[:, [1, 2, 3]])
        keep = [b for b in range(48) if b not in remote]
        assert torch.equal(got[:, keep], old[:, keep])  # nothing else was written


async def test_bad_local_input_is_refused_before_anything_is_dialled(node: BlockNode) -> None:
    node.service.register("kv", make_layers(0, 2, 8), block_dim=1)
    read = node.service.read
    owner = "127.0.0.1:9"  # never dialled
    cases = [
        (read(owner, "r", "kv", [1, 2], [0, 8]), "local_blocks", (8,)),
        (read(owner, "r", "kv", [1, 2], [3, 3]), "local_blocks", (3,)),
        (read(owner, "r", "kv", [5, 5], [0, 1]), "remote_blocks", (5,)),
        (read(owner, "r", "kv", [-1, 2], [0, 1]), "remote_blocks", (-1,)),
        (read(owner, "r", "kv", [1, 2, 3], [0, 1]), "remote_blocks", (2, 3)),
        (read(owner, "r", "kv", [1], [0], layers=[2]), "layers", (2,)),
        (node.service.write(owner, "r", "kv", [0, 1], [7], layers=[0]), "remote_blocks", (2, 1)),
    ]
    for call, argument, values in cases:
        with pytest.raises(BlockIdError) as info:
            await call
        assert (info.value.argument, info.value.values) == (argument, values), info.value
    with pytest.raises(UnknownRegionError, match="'nope'"):
        await read(owner, "r", "nope", [1], [1])
    with pytest.raises(BlockIdError, match="blocks: block id 8 out of range"):
        node.service.expose("r", "kv", [8], ttl=1)
    assert node.dials == 0


async def test_the_owner_refuses_what_the_lease_does_not_grant(
    peer: PeerClient, node: BlockNode
) -> None:
    name = await remote_region(peer, seed=7, blocks=32)
    odd = await remote_region(peer, seed=8, blocks=32)
    local = make_layers(9, 3, 8)
    before = [t.clone() for t in local]
    node.service.register(name, local, block_dim=1)
    node.service.register(odd, make_layers(9, 3, 8, dtype=torch.float16), block_dim=1)
    node.service.register("only-here", make_layers(9, 1, 8), block_dim=1)
    rid = unique("grant")
    await peer.ok("expose", request_id=rid, name=name, blocks=[1, 2, 3], ttl=10, layers=[0, 1])
    odd_rid = unique("odd")
    await peer.ok("expose", request_id=odd_rid, name=odd, blocks=[1], ttl=10)
    svc, owner = node.service, peer.address

    with pytest.raises(BlockIdError, match="block id 99 out of range") as info:
        await svc.read(owner, rid, name, [1, 99], [0, 1], layers=[0])
    assert (info.value.argument, info.value.values) == ("remote_blocks", (99,))
    with pytest.raises(LeaseNotGrantedError, match="does not grant blocks 4"):
        await svc.read(owner, rid, name, [1, 4], [0, 1], layers=[0])
    with pytest.raises(LeaseNotGrantedError, match="does not grant layers 2"):
        await svc.read(owner, rid, name, [1], [0], layers=[2])
    with pytest.raises(LeaseNotGrantedError, match="no read lease for request 'other'"):
        await svc.read(owner, "other", name, [1], [0], layers=[0])
    with pytest.raises(LeaseNotGrantedError, match="granted read, not write"):
        await svc.write(owner, rid, name, [0], [1], layers=[0])
    with pytest.raises(UnknownRegionError, match="'only-here'"):
        await svc.read(owner, rid, "only-here", [1], [0])
    with pytest.raises(BlockShapeError, match=r"bfloat16\[2, N, 4, 2, 8\].*float16"):
        await svc.read(owner, odd_rid, odd, [1], [0])

    assert all(torch.equal(a, b) for a, b in zip(local, before, strict=True))
    owner_now = await peer.ok("blocks", name=name, blocks=list(range(32)))
    assert all(torch.equal(a, b) for a, b in zip(owner_now, make_layers(7, 3, 32), strict=True))
    # The lease is unaffected and the connection still usable: one dial in all.
    assert await peer.ok("state", request_id=rid) == {"ended": False, "remaining": 6}
    await svc.read(owner, rid, name, [1, 2, 3], [5, 6, 7], layers=[0, 1])
    await peer.ok("wait", request_id=rid)
    assert node.dials == 1


async def test_expired_and_completed_leases_are_refused(peer: PeerClient, node: BlockNode) -> None:
    name = await remote_region(peer, seed=10, blocks=16)
    node.service.register(name, make_layers(11, 3, 16), block_dim=1)
    short, done = unique("short"), unique("done")
    await peer.ok("expose", request_id=short, name=name, blocks=[1], ttl=0.2)
    await peer.ok("expose", request_id=done, name=name, blocks=[2], ttl=10)
    expired = await peer.call("wait", request_id=short)
    assert expired["error"] == "LeaseExpiredError" and "ttl=0.2s" in expired["message"]
    with pytest.raises(LeaseExpiredError, match=r"expired after ttl=0\.2s"):
        await node.service.read(peer.address, short, name, [1], [1])
    await node.service.read(peer.address, done, name, [2], [2])
    await peer.ok("wait", request_id=done)
    with pytest.raises(LeaseCompletedError, match="already completed"):
        await node.service.read(peer.address, done, name, [2], [2])


async def test_concurrent_reads_each_get_a_connection(peer: PeerClient, node: BlockNode) -> None:
    name = await remote_region(peer, seed=12, blocks=32)
    local = make_layers(13, 3, 32)
    node.service.register(name, local, block_dim=1)
    rids = [unique("many") for _ in range(4)]
    for i, rid in enumerate(rids):
        await peer.ok("expose", request_id=rid, name=name, blocks=[i * 4, i * 4 + 1], ttl=10)
    await asyncio.gather(
        *(
            node.service.read(peer.address, rid, name, [i * 4, i * 4 + 1], [i, 31 - i])
            for i, rid in enumerate(rids)
        )
    )
    source = make_layers(12, 3, 32)
    for i, rid in enumerate(rids):
        await peer.ok("wait", request_id=rid)
        for got, want in zip(local, source, strict=True):
            assert torch.equal(got[:, [i, 31 - i]], want[:, [i * 4, i * 4 + 1]])


async def test_concurrent_layer_writes_of_one_request_queue_on_one_connection(
    peer: PeerClient, node: BlockNode
) -> None:
    """A layer-wise push fires a write per layer without awaiting the last: they
    run in call order on one connection instead of a connection each."""
    name = await remote_region(peer, seed=14, layers=4, blocks=32)
    local = make_layers(15, 4, 8)
    node.service.register(name, local, block_dim=1)
    rid = unique("wise")
    remote = [4, 9, 10]
    await peer.ok("expect", request_id=rid, name=name, blocks=remote, ttl=10)
    order: list[int] = []

    async def write(layer: int) -> None:
        await node.service.write(peer.address, rid, name, [0, 1, 2], remote, layers=[layer])
        order.append(layer)

    await asyncio.gather(*(write(layer) for layer in range(4)))
    await peer.ok("wait", request_id=rid)
    assert order == [0, 1, 2, 3]
    assert node.dials == 1
    assert not node.service._write_pipes  # nothing left behind
    landed = await peer.ok("blocks", name=name, blocks=remote)
    for got, mine in zip(landed, local, strict=True):
        assert torch.equal(got, mine[:, [0, 1, 2]])


@pytest.mark.parametrize(
    ("reader_options", "owner_options"),
    [({}, {"transport": "tcp"}), ({"transport": "tcp"}, {})],
    ids=["owner-refuses-shm", "reader-forces-tcp"],
)
async def test_one_side_forcing_tcp_keeps_payloads_on_the_socket(
    reader_options: dict[str, str], owner_options: dict[str, str]
) -> None:
    """Both nodes may share memory, but one service says transport="tcp": an
    owner refusing the ring is not an error, the read falls back to the socket."""
    async with (
        await BlockNode.start(link="auto", **owner_options) as owner,
        await BlockNode.start(link="auto", **reader_options) as reader,
    ):
        source = make_layers(1, 2, 8)
        owner.service.register("kv", source, block_dim=1)
        local = make_layers(2, 2, 8)
        reader.service.register("kv", local, block_dim=1)
        for i in range(2):  # the second read reuses the connection, offering nothing again
            lease = owner.service.expose(f"r{i}", "kv", [1, 5], ttl=10)
            await reader.service.read(owner.address, f"r{i}", "kv", [1, 5], [6, 2])
            await lease.wait()
        assert all(
            torch.equal(a[:, [6, 2]], b[:, [1, 5]]) for a, b in zip(local, source, strict=True)
        )
        for node in (owner, reader):
            assert node.service.payload_bytes["shm"] == 0
            assert node.service.payload_bytes["tcp"] == 2 * source[0][:, [1, 5]].nbytes * 2
        assert reader.dials == 1
