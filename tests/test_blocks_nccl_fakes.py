"""Block transfers of GPU regions on two hosts by NCCL, on CPU through the fakes.

Two BlockNodes in this process, the owner pretending to be on another host,
each with its own FakeGpu (own fake device, own NCCL thread) on one fake
NCCL fabric: communicators really move bytes between the CPU tensors by
address, in NCCL's pairing order (the n-th send meets the n-th recv, sizes
equal, or the fake raises). What is real: the sockets, the block protocol,
the set-up steps (unique id, reserve/arm, warm-up), the path choice, the
segment plans and their checks, the stream order, the polling waits, the
bytes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
import torch
from blocks_net import BlockNode, _dial_raw, make_layers, unique

from aiokvpipe.blocks import protocol
from aiokvpipe.blocks.ncclpath import MAX_RUNS, run_counts
from aiokvpipe.cuda.testing import FakeDevice, FakeGpu, FakeIpc, FakeNccl
from aiokvpipe.errors import LeaseNotGrantedError, PeerClosedError, ProtocolError


@dataclass
class Pair:
    owner: BlockNode
    reader: BlockNode
    owner_gpu: FakeGpu
    reader_gpu: FakeGpu

    async def aclose(self) -> None:
        for gpu in (self.owner_gpu, self.reader_gpu):
            gpu.fake.paused = False
            if gpu.nccl_ is not None:
                gpu.nccl_.hang = False
        await self.reader.aclose()
        await self.owner.aclose()


async def make_pair(
    *, owner_nccl: bool = True, reader_nccl: bool = True, host: str | None = "elsewhere"
) -> Pair:
    fabric = FakeNccl(FakeDevice())
    ipc = FakeIpc()
    owner_gpu = FakeGpu("owner", ipc, nccl=fabric if owner_nccl else None)
    reader_gpu = FakeGpu("reader", ipc, nccl=fabric if reader_nccl else None)
    owner = await BlockNode.start(link="auto", host_id=host, gpu=owner_gpu)
    reader = await BlockNode.start(link="auto", gpu=reader_gpu)
    return Pair(owner, reader, owner_gpu, reader_gpu)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    p = await make_pair()
    try:
        yield p
    finally:
        await p.aclose()


def register(
    node: BlockNode, gpu: FakeGpu, name: str, seed: int, blocks: int, layers: int = 3
) -> list[torch.Tensor]:
    tensors = [gpu.tensor(t) for t in make_layers(seed, layers, blocks)]
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


def comms(gpu: FakeGpu) -> list[object]:
    assert gpu.nccl_ is not None
    return list(gpu.nccl_.comms)


def aborts(gpu: FakeGpu) -> int:
    assert gpu.nccl_ is not None
    return sum(c.abort_calls for c in gpu.nccl_.comms)


# ------------------------------------------------------------------ the path


async def test_pull_and_layer_wise_push_move_block_runs_by_nccl(pair: Pair) -> None:
    name = unique("kv")
    theirs = register(pair.owner, pair.owner_gpu, name, seed=1, blocks=32)
    mine = register(pair.reader, pair.reader_gpu, name, seed=2, blocks=16)
    remote, local = [3, 4, 5, 20, 9], [0, 1, 2, 7, 15]
    rid = unique("pull")
    lease = pair.owner.service.expose(rid, name, remote, ttl=10)
    await pair.reader.service.read(pair.owner.address, rid, name, remote, local)
    assert same_blocks(mine, local, theirs, remote)
    await asyncio.wait_for(lease.wait(), 5)

    wid = unique("push")
    targets = [30, 31, 10]
    wlease = pair.owner.service.expect(wid, name, targets, ttl=10)
    for layer in range(3):
        await pair.reader.service.write(
            pair.owner.address, wid, name, [8, 9, 10], targets, layers=[layer]
        )
        assert not wlease.ended or layer == 2
    await asyncio.wait_for(wlease.wait(), 5)
    assert same_blocks(theirs, targets, mine, [8, 9, 10])

    region = pair.reader.service.regions.get(name)
    nbytes = region.nbytes(5 + 3, range(3))
    for node in (pair.owner, pair.reader):
        assert node.service.payload_bytes == {"tcp": 0, "shm": 0, "cuda_ipc": 0, "nccl": nbytes}
        assert node.service.staged_bytes == 0
    # One communicator per side for the whole connection (set up once, lazily).
    assert len(comms(pair.owner_gpu)) == 1 and len(comms(pair.reader_gpu)) == 1
    assert pair.reader.dials == 1
    # Every NCCL call of each fake process ran on that process's NCCL thread.
    for gpu in (pair.owner_gpu, pair.reader_gpu):
        assert gpu.nccl_ is not None
        assert gpu.nccl_.thread_names() == {f"aiokvpipe: nccl ({gpu.name})"}


async def test_segments_pair_send_for_recv_in_order_on_the_transport_stream(pair: Pair) -> None:
    name = unique("kv")
    register(pair.owner, pair.owner_gpu, name, seed=1, blocks=16, layers=2)
    register(pair.reader, pair.reader_gpu, name, seed=2, blocks=16, layers=2)
    # Adjacent on the owner (4, 5, 6) but not on the reader (0, 1, 9): two runs,
    # cut identically on both sides.
    remote, local = [4, 5, 6, 12], [0, 1, 9, 10]
    assert run_counts(local, remote) == [2, 1, 1]
    rid = unique("order")
    pair.owner.service.expose(rid, name, remote, ttl=10)
    await pair.reader.service.read(pair.owner.address, rid, name, remote, local)
    region = pair.owner.service.regions.get(name)
    size = region.layout(0).block_bytes
    # 2 layers x K/V x 3 runs, in stream order, sizes matching one for one.
    runs = [2, 1, 1] * 4
    # (The warm-up byte went the other way: reader send, owner recv.)
    sent = [a for a in pair.owner_gpu.nccl_ops() if a.startswith("nccl_send")]
    received = [a for a in pair.reader_gpu.nccl_ops() if a.startswith("nccl_recv")]
    assert sent == [f"nccl_send {n * size}B" for n in runs], sent
    assert received == [f"nccl_recv {n * size}B" for n in runs], received
    # The reader's group waited for the caller's stream (at the call and at
    # enqueue) on the communicator's own stream, then recorded the event it polls.
    streams = pair.reader_gpu.fake.streams.values()
    side = [s.name for s in streams if s.name.startswith("reader.side")]
    assert len(side) == 1  # the communicator's stream: one per connection
    actions = pair.reader_gpu.fake.actions(side[0])
    tail = actions[-(len(runs) + 3) :]
    assert tail[:2] == ["wait reader.current-1", "wait reader.current-2"], actions
    assert [a.split()[0] for a in tail[2:]] == ["nccl_recv"] * len(runs) + ["record"]


@pytest.mark.parametrize(
    ("case", "payload"),
    [
        ("nccl", "nccl"),
        ("owner-without-nccl", "tcp"),
        ("reader-without-nccl", "tcp"),
        ("one-host", "cuda_ipc"),
    ],
)
async def test_the_path_for_gpu_regions(case: str, payload: str) -> None:
    p = await make_pair(
        owner_nccl=case != "owner-without-nccl",
        reader_nccl=case != "reader-without-nccl",
        host=None if case == "one-host" else "elsewhere",  # None: this host
    )
    try:
        name = unique("kv")
        theirs = register(p.owner, p.owner_gpu, name, 1, 16)
        mine = register(p.reader, p.reader_gpu, name, 2, 16)
        for i in range(2):
            rid = unique("pull")
            p.owner.service.expose(rid, name, [3 + i, 7], ttl=10)
            await p.reader.service.read(p.owner.address, rid, name, [3 + i, 7], [10, 2 + i])
            assert same_blocks(mine, [10, 2 + i], theirs, [3 + i, 7])
            wid = unique("push")
            p.owner.service.expect(wid, name, [12, 13], ttl=10)
            await p.reader.service.write(p.owner.address, wid, name, [0, 1], [12, 13])
            assert same_blocks(theirs, [12, 13], mine, [0, 1])
        got = p.reader.service.payload_bytes
        assert got[payload] > 0 and sum(got.values()) == got[payload], got
        if payload == "tcp":
            assert p.reader.service.staged_bytes > 0
            # Refused once, remembered: no set-up per transfer.
            assert all(not g.nccl_ or not g.nccl_.comms for g in (p.owner_gpu, p.reader_gpu))
    finally:
        await p.aclose()


async def test_a_failed_communicator_set_up_falls_back_to_staging() -> None:
    p = await make_pair()
    try:
        for gpu in (p.owner_gpu, p.reader_gpu):
            assert gpu.nccl_ is not None
            gpu.nccl_.init_timeout = 0.3  # the reader's rank gives up waiting for the owner's
        assert p.owner_gpu.nccl_ is not None
        p.owner_gpu.nccl_.fail_init = RuntimeError("ncclCommInitRank: unhandled system error")
        name = unique("kv")
        theirs = register(p.owner, p.owner_gpu, name, 1, 8, layers=1)
        mine = register(p.reader, p.reader_gpu, name, 2, 8, layers=1)
        for i in range(2):
            rid = unique("pull")
            lease = p.owner.service.expose(rid, name, [3 + i], ttl=10)
            await p.reader.service.read(p.owner.address, rid, name, [3 + i], [i])
            await asyncio.wait_for(lease.wait(), 5)
        assert same_blocks(mine, [0, 1], theirs, [3, 4])
        got = p.reader.service.payload_bytes
        assert got["nccl"] == 0 and got["tcp"] > 0 and p.reader.service.staged_bytes > 0
        # Tried once (the failure is remembered for that peer), then staged.
        assert [c[0] for c in p.owner_gpu.nccl_.calls].count("NcclCommunicator") == 1
        assert "NCCL" in next(iter(p.reader.service._nccl_refused.values()))
        assert comms(p.reader_gpu) == []  # its half timed out waiting: nothing left built
    finally:
        await p.aclose()


# ------------------------------------------------------------------ checks before enqueue


async def test_blocks_the_lease_does_not_grant_are_refused_before_any_enqueue(pair: Pair) -> None:
    name = unique("kv")
    register(pair.owner, pair.owner_gpu, name, seed=1, blocks=8)
    register(pair.reader, pair.reader_gpu, name, seed=2, blocks=8)
    rid = unique("grant")
    pair.owner.service.expose(rid, name, [1, 2], ttl=10)
    with pytest.raises(LeaseNotGrantedError, match="does not grant blocks 3"):
        await pair.reader.service.read(pair.owner.address, rid, name, [1, 3], [0, 1])
    # The communicator was set up (warm-up byte), but no block run was queued.
    assert [a for a in pair.owner_gpu.nccl_ops() if a != "nccl_recv 1B"] == []
    assert [a for a in pair.reader_gpu.nccl_ops() if a != "nccl_send 1B"] == []


async def test_lying_run_lengths_are_cut_off_before_any_enqueue(pair: Pair) -> None:
    name = unique("kv")
    theirs = register(pair.owner, pair.owner_gpu, name, seed=1, blocks=8, layers=1)
    register(pair.reader, pair.reader_gpu, name, seed=2, blocks=8, layers=1)
    before = theirs[0].clone()
    rid = unique("lie")
    pair.owner.service.expect(rid, name, [1, 5], ttl=10)
    # Claim blocks 1 and 5 form one run: the owner would write 1..2 (2 ungranted).
    service = pair.reader.service
    real = service._request

    async def request(conn: object, op: object, mapped: object, link: object) -> None:
        if link is None:
            await real(conn, op, mapped, link)  # type: ignore[arg-type]
            return
        body, ids = op.request  # type: ignore[attr-defined]
        await protocol.send_message(
            conn.sock,  # type: ignore[attr-defined]
            protocol.Kind.REQUEST,
            {**body, "nccl": [2]},
            "lying",
            ids,
        )

    service._request = request  # type: ignore[method-assign,assignment]
    with pytest.raises((ProtocolError, PeerClosedError)):
        await pair.reader.service.write(pair.owner.address, rid, name, [0, 1], [1, 5])
    await until(lambda: pair.owner.service.cut_off == 1)
    assert "not adjacent" in pair.owner.service.last_cut_off
    assert [a for a in pair.owner_gpu.nccl_ops() if a != "nccl_recv 1B"] == []
    assert torch.equal(theirs[0], before)
    # The connection (and its communicator) went: aborted once on each side.
    await until(lambda: aborts(pair.owner_gpu) == 1 and aborts(pair.reader_gpu) == 1)


# ------------------------------------------------------------------ completion, death, cancel


async def test_the_lease_completes_only_after_the_owners_event(pair: Pair) -> None:
    name = unique("kv")
    theirs = register(pair.owner, pair.owner_gpu, name, seed=1, blocks=8, layers=1)
    mine = register(pair.reader, pair.reader_gpu, name, seed=2, blocks=8, layers=1)
    # A first transfer builds the communicator; the second is the one held.
    rid = unique("warm")
    pair.owner.service.expose(rid, name, [0], ttl=10)
    await pair.reader.service.read(pair.owner.address, rid, name, [0], [0])
    rid = unique("held")
    lease = pair.owner.service.expect(rid, name, [1, 2], ttl=10)
    assert lease.fence is not None and lease.fence.query()  # the owner's work before the grant
    pair.owner_gpu.fake.paused = True  # the owner's recvs queue up but do not run
    queued = len(pair.owner_gpu.nccl_ops())
    write = asyncio.ensure_future(
        pair.reader.service.write(pair.owner.address, rid, name, [5, 6], [1, 2])
    )
    await until(lambda: len(pair.owner_gpu.nccl_ops()) > queued)
    await asyncio.sleep(0.05)
    assert not write.done() and not lease.ended and lease.remaining == 2
    pair.owner_gpu.fake.paused = False
    await asyncio.wait_for(write, 5)
    await asyncio.wait_for(lease.wait(), 5)
    assert same_blocks(theirs, [1, 2], mine, [5, 6])


async def test_the_owner_dying_mid_read_is_peer_closed_and_aborts_once(pair: Pair) -> None:
    name = unique("kv")
    register(pair.owner, pair.owner_gpu, name, seed=1, blocks=8, layers=1)
    register(pair.reader, pair.reader_gpu, name, seed=2, blocks=8, layers=1)
    rid = unique("warm")
    pair.owner.service.expose(rid, name, [0], ttl=10)
    await pair.reader.service.read(pair.owner.address, rid, name, [0], [0])
    rid = unique("dies")
    pair.owner.service.expose(rid, name, [1, 2], ttl=10)
    assert pair.owner_gpu.nccl_ is not None
    pair.owner_gpu.nccl_.hang = True  # the sends never complete
    queued = len(pair.reader_gpu.nccl_ops())
    read = asyncio.ensure_future(
        pair.reader.service.read(pair.owner.address, rid, name, [1, 2], [3, 4])
    )
    await until(lambda: len(pair.reader_gpu.nccl_ops()) > queued)
    await pair.owner.aclose()  # its sockets close mid-transfer
    with pytest.raises(PeerClosedError):
        await asyncio.wait_for(read, 5)
    await until(lambda: aborts(pair.reader_gpu) == 1 and aborts(pair.owner_gpu) == 1)
    for gpu in (pair.owner_gpu, pair.reader_gpu):
        assert all(c.concurrent_aborts == 0 for c in gpu.nccl_.comms)  # type: ignore[union-attr]
    await asyncio.sleep(0.05)
    assert aborts(pair.reader_gpu) == 1  # once, not per path that noticed


async def test_the_reader_dying_mid_read_fails_the_lease_and_a_fresh_comm_follows() -> None:
    p = await make_pair()
    try:
        name = unique("kv")
        theirs = register(p.owner, p.owner_gpu, name, seed=1, blocks=8, layers=1)
        mine = register(p.reader, p.reader_gpu, name, seed=2, blocks=8, layers=1)
        rid = unique("warm")
        p.owner.service.expose(rid, name, [0], ttl=10)
        await p.reader.service.read(p.owner.address, rid, name, [0], [0])
        rid = unique("reader-dies")
        lease = p.owner.service.expose(rid, name, [1, 2], ttl=10)
        p.reader_gpu.fake.paused = True  # its recvs never run
        queued = len(p.reader_gpu.nccl_ops())
        read = asyncio.ensure_future(
            p.reader.service.read(p.owner.address, rid, name, [1, 2], [3, 4])
        )
        await until(lambda: len(p.reader_gpu.nccl_ops()) > queued)
        p.reader.lose(p.owner.address, p.owner.instance, PeerClosedError("link lost"))
        with pytest.raises(PeerClosedError, match="link lost"):
            await asyncio.wait_for(read, 5)
        with pytest.raises(PeerClosedError, match="mid-read"):
            await asyncio.wait_for(lease.wait(), 5)
        await until(lambda: aborts(p.reader_gpu) == 1 and aborts(p.owner_gpu) == 1)
        p.reader_gpu.fake.paused = False
        # The next transfer builds a fresh communicator on a fresh connection.
        rid = unique("again")
        lease = p.owner.service.expose(rid, name, [1, 2], ttl=10)
        await p.reader.service.read(p.owner.address, rid, name, [1, 2], [3, 4])
        await asyncio.wait_for(lease.wait(), 5)
        assert same_blocks(mine, [3, 4], theirs, [1, 2])
        assert len(comms(p.reader_gpu)) == 2 and p.reader.dials == 2
    finally:
        await p.aclose()


@pytest.mark.parametrize("op", ["read", "write"])
async def test_a_cancelled_nccl_transfer_counts_for_nothing_and_keeps_the_link(
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
    warm = unique("warm")
    grant(warm, name, [0], ttl=10)
    await call(pair.owner.address, warm, name, [0], [0])  # builds the communicator
    pair.reader_gpu.fake.paused = True
    queued = len(pair.reader_gpu.nccl_ops())
    task = asyncio.ensure_future(call(pair.owner.address, rid, name, *ids))
    await until(lambda: len(pair.reader_gpu.nccl_ops()) > queued)  # our half is queued
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pair.reader_gpu.fake.paused = False
    await until(lambda: not pair.reader.service._ops)  # the pair's framing finished
    assert not lease.ended and lease.remaining == 4  # nothing counted
    await call(pair.owner.address, rid, name, *ids)
    await asyncio.wait_for(lease.wait(), 5)
    if op == "read":
        assert same_blocks(mine, [5, 6], theirs, [1, 2])
    else:
        assert same_blocks(theirs, [1, 2], mine, [5, 6])
    assert pair.reader.dials == 1 and len(comms(pair.reader_gpu)) == 1  # one link throughout
    assert aborts(pair.reader_gpu) == 0


async def test_a_read_cancelled_before_its_recvs_were_queued_lands_in_scratch(
    pair: Pair,
) -> None:
    name = unique("kv")
    register(pair.owner, pair.owner_gpu, name, seed=1, blocks=8, layers=2)
    mine = register(pair.reader, pair.reader_gpu, name, seed=2, blocks=8, layers=2)
    warm = unique("warm")
    pair.owner.service.expose(warm, name, [0], ttl=10)
    await pair.reader.service.read(pair.owner.address, warm, name, [0], [0])
    before = [t.clone() for t in mine]
    rid = unique("early")
    # The owner holds its REPLY until the work queued before the grant is done.
    pair.owner_gpu.fake.paused = True
    lease = pair.owner.service.expose(rid, name, [1, 2], ttl=10)
    queued = len(pair.reader_gpu.nccl_ops())
    task = asyncio.ensure_future(
        pair.reader.service.read(pair.owner.address, rid, name, [1, 2], [5, 6])
    )
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(pair.reader_gpu.nccl_ops()) == queued  # nothing posted yet
    pair.owner_gpu.fake.paused = False
    await until(lambda: not pair.reader.service._ops)
    # The pair's framing completed: the owner's sends met receives into scratch.
    assert len(pair.reader_gpu.nccl_ops()) == queued + 4
    assert all(torch.equal(a, b) for a, b in zip(mine, before, strict=True))
    assert not lease.ended and lease.remaining == 4
    assert aborts(pair.reader_gpu) == 0 and pair.reader.dials == 1


async def test_a_requester_that_never_arms_is_cut_off_and_its_reservation_dropped() -> None:
    gpu = FakeGpu("owner", nccl=FakeNccl(FakeDevice()))
    owner = await BlockNode.start(link="auto", host_id="elsewhere", gpu=gpu, op_timeout=0.3)
    try:
        name = unique("kv")
        register(owner, gpu, name, seed=1, blocks=8, layers=1)
        rid = unique("unarmed")
        owner.service.expose(rid, name, [1], ttl=10)
        sock, _ = await _dial_raw(owner.address, "auto")
        with sock:
            sock.setblocking(False)
            body = {"nccl": 1, "step": "uid", "uid": os.urandom(128).hex()}
            await protocol.send_message(
                sock, protocol.Kind.SETUP, {**body, "region": name, "request_id": rid}, "raw"
            )
            answer = await protocol.expect_message(sock, protocol.Kind.SETUP, "raw")
            assert answer.body["step"] == "reserved"
            # ...and never arm: the owner gives up after op_timeout and hangs up.
            assert (
                await asyncio.wait_for(protocol.read_message(sock, "raw", eof_ok=True), 5) is None
            )
        assert "never armed" in owner.service.last_device_error
        thread = gpu.nccl_thread
        assert all(t.future.cancelled() for t in thread._tickets)
        assert gpu.nccl_ is not None and gpu.nccl_.comms == []
    finally:
        await owner.aclose()


async def test_a_request_of_more_runs_than_one_request_carries_stages(pair: Pair) -> None:
    name = unique("kv")
    n = MAX_RUNS + 1
    theirs = register(pair.owner, pair.owner_gpu, name, seed=1, blocks=n, layers=1)
    mine = register(pair.reader, pair.reader_gpu, name, seed=2, blocks=2 * n, layers=1)
    remote, local = list(range(n)), list(range(0, 2 * n, 2))  # every block its own run
    rid = unique("scattered")
    lease = pair.owner.service.expose(rid, name, remote, ttl=10)
    await pair.reader.service.read(pair.owner.address, rid, name, remote, local)
    await asyncio.wait_for(lease.wait(), 5)
    assert same_blocks(mine, local, theirs, remote)
    got = pair.reader.service.payload_bytes
    assert got["nccl"] == 0 and got["tcp"] > 0
    assert comms(pair.reader_gpu) == []  # not even set up for it
    # A request within the limit on the same connection takes NCCL.
    rid = unique("runs")
    pair.owner.service.expose(rid, name, remote[:4], ttl=10)
    await pair.reader.service.read(pair.owner.address, rid, name, remote[:4], local[:4])
    assert pair.reader.service.payload_bytes["nccl"] > 0
