"""Regions, block id lists, leases and the block protocol's parser, on their own."""

from __future__ import annotations

import asyncio
import random
import socket
import struct

import pytest
import torch

from aiokvpipe.blocks import protocol
from aiokvpipe.blocks.lease import LeaseTable
from aiokvpipe.blocks.region import RegionTable
from aiokvpipe.blocks.runs import as_ids, coalesce
from aiokvpipe.blocks.sgio import IOV_MAX, Segments, send_segments
from aiokvpipe.errors import (
    BadMagicError,
    BlockIdError,
    BlockShapeError,
    ConfigError,
    LeaseCancelledError,
    LeaseCompletedError,
    LeaseError,
    LeaseExpiredError,
    LeaseNotGrantedError,
    MalformedFrameError,
    RegionError,
    TransferTimeout,
    UnknownRegionError,
)


def vllm_layers(layers: int = 2, blocks: int = 10) -> list[torch.Tensor]:
    """vLLM's CPU layout, with contents that say where each element sits."""
    numel = 2 * blocks * 4 * 2 * 8
    return [
        torch.arange(numel, dtype=torch.int32).view(2, blocks, 4, 2, 8) + 1_000_000 * layer
        for layer in range(layers)
    ]


# ------------------------------------------------------------------ register


def test_register_checks_every_tensor() -> None:
    table = RegionTable()
    layers = vllm_layers()
    table.register("kv", layers, block_dim=1)
    with pytest.raises(RegionError, match="already registered"):
        table.register("kv", layers, block_dim=1)
    with pytest.raises(RegionError, match=r"different numbers of blocks on dim 1: \[10, 9\]"):
        table.register("odd", [layers[0], torch.zeros(2, 9, 4, 2, 8)], block_dim=1)
    with pytest.raises(RegionError, match="tensor 0 is not contiguous"):
        table.register("strided", layers[0].transpose(0, 1), block_dim=1)
    with pytest.raises(RegionError, match="only CPU or CUDA memory"):
        table.register("meta", torch.empty(2, 10, 4, device="meta"), block_dim=1)
    with pytest.raises(RegionError, match="only dense tensors"):
        table.register("sparse", torch.eye(4).to_sparse(), block_dim=0)
    with pytest.raises(RegionError, match="block_dim=5 is not one of its dims"):
        table.register("dim", layers, block_dim=5)
    with pytest.raises(RegionError, match=r"not a torch\.Tensor"):
        table.register("list", [[1, 2]], block_dim=0)
    with pytest.raises(RegionError, match="no tensors"):
        table.register("empty", [], block_dim=0)
    with pytest.raises(UnknownRegionError, match="'nope'"):
        table.get("nope")
    assert "kv" in table and "odd" not in table  # a refused register leaves nothing behind


def test_dtypes_and_block_shapes_may_differ_between_tensors() -> None:
    region = RegionTable().register(
        "mixed", [torch.zeros(2, 6, 4, 8, dtype=torch.bfloat16), torch.zeros(1, 6, 3)], 1
    )
    assert region.num_blocks == 6
    assert region.nbytes(2, [0, 1]) == 2 * (2 * 4 * 8 * 2 + 3 * 4)


def test_a_run_of_adjacent_blocks_is_one_segment_per_outer_index() -> None:
    region = RegionTable().register("kv", vllm_layers(), block_dim=1)
    ids = [3, 4, 5, 9, 0]
    segs = region.segments(ids, [0, 1]).views()
    # per layer: K and V, each with runs (3..5), (9), (0)
    assert len(segs) == 2 * 2 * 3
    stream = torch.frombuffer(bytearray(b"".join(segs)), dtype=torch.int32)
    expected = torch.cat([layer[kv, ids].reshape(-1) for layer in vllm_layers() for kv in range(2)])
    assert torch.equal(stream, expected)
    assert sum(len(s) for s in segs) == region.nbytes(len(ids), [0, 1])


def test_block_ids_are_validated_with_the_argument_named() -> None:
    region = RegionTable().register("kv", vllm_layers(), block_dim=1)
    with pytest.raises(BlockIdError) as info:
        region.check_blocks("local_blocks", [1, 10, 12, -1])
    assert info.value.argument == "local_blocks" and info.value.values == (-1, 10, 12)
    assert "valid: 0..9" in str(info.value)
    with pytest.raises(BlockIdError, match="block id 2 appears more than once") as info:
        region.check_blocks("blocks", [2, 3, 2])
    assert info.value.values == (2,)
    with pytest.raises(BlockIdError, match="layer 2 out of range") as info:
        region.check_layers("layers", [0, 2])
    assert info.value.argument == "layers"
    with pytest.raises(BlockIdError, match="empty list of layers"):
        region.check_layers("layers", [])
    with pytest.raises(BlockIdError, match="not an integer"):
        as_ids("blocks", [1, True])
    with pytest.raises(BlockIdError, match="not an integer"):
        as_ids("blocks", [1.0])
    with pytest.raises(BlockIdError, match="sequence of block ids"):
        as_ids("blocks", 3)
    assert as_ids("blocks", torch.tensor([4, 5])) == (4, 5)
    assert as_ids("blocks", range(2)) == (0, 1)


def test_layouts_must_match_between_sides() -> None:
    mine = RegionTable().register("kv", vllm_layers(), block_dim=1)
    theirs = RegionTable().register("kv", [t.to(torch.int16) for t in vllm_layers()], block_dim=1)
    mine.check_layouts([0, 1], [mine.layout(0), mine.layout(1)])
    with pytest.raises(BlockShapeError, match=r"int32\[2, N, 4, 2, 8\].*int16\[2, N, 4, 2, 8\]"):
        mine.check_layouts([1], [theirs.layout(1)])


def test_repeated_id_lists_give_the_same_bytes_from_the_cache_within_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A layer-wise push plans the same ids once per layer: the ranges come
    from a per-region cache, which must give every layer its own blocks,
    tell id lists apart, and stay within its bound."""
    from aiokvpipe.blocks import region as region_module

    region = RegionTable().register("kv", vllm_layers(layers=3), block_dim=1)
    ids = (3, 4, 5, 9, 0)

    def stream(ids: object, layers: list[int]) -> bytes:
        return b"".join(region.segments(ids, layers).views())  # type: ignore[arg-type]

    one_by_one = [stream(ids, [layer]) for layer in range(3)]
    assert len(set(one_by_one)) == 3  # each layer's own bytes, not the first one's
    assert b"".join(one_by_one) == stream(list(ids), [0, 1, 2])  # a list hits the tuple's entry
    for layer, got in enumerate(one_by_one):
        expected = torch.cat([vllm_layers(3)[layer][kv, list(ids)].reshape(-1) for kv in range(2)])
        assert got == expected.numpy().tobytes()
    assert stream((3, 4, 5, 9, 1), [0]) != one_by_one[0]  # another id list, another entry

    monkeypatch.setattr(region_module, "_RANGE_CACHE_RANGES", 16)  # 4 ranges an entry at most
    fresh = RegionTable().register("kv", vllm_layers(layers=1), block_dim=1)
    for start in range(8):
        fresh.segments((start, start + 2), [0])  # 2 runs x K/V: 4 ranges each
        assert fresh._range_cached == sum(len(s) for s, _ in fresh._range_cache.values()) <= 16
    fresh.segments(tuple(range(0, 10, 2)), [0])  # 10 ranges: above a quarter, not kept
    assert len(fresh._range_cache) == 4
    expected = torch.cat([vllm_layers(1)[0][kv, [6, 8]].reshape(-1) for kv in range(2)])
    assert b"".join(fresh.segments((6, 8), [0]).views()) == expected.numpy().tobytes()


def test_coalesce_merges_only_ascending_neighbours() -> None:
    assert coalesce([3, 4, 5, 9, 2, 3, 1]) == [(3, 3), (9, 1), (2, 2), (1, 1)]
    assert coalesce([]) == []
    assert coalesce([5, 4]) == [(5, 1), (4, 1)]


def test_redirected_segments_stop_touching_the_views() -> None:
    target = bytearray(10)
    segs = Segments([memoryview(target)[:4], memoryview(target)[6:]], receive=True)
    segs.advance(3)
    segs.redirect()
    assert segs.remaining == 5
    for view in segs.batch():
        view[:] = b"\xff" * len(view)
    assert target == bytearray(10)


@pytest.mark.parametrize("seed", range(4))
def test_segments_move_every_byte_in_order_through_any_batching(seed: int) -> None:
    """Batches of any size, partial syscalls, empty views, IOV_MAX caps and a redirect
    at any point: the bytes land in stream order up to the redirect, none after it."""
    rng = random.Random(seed)
    for _ in range(1500):
        sizes = [rng.choice([0, 1, 3, 7, 64, 100]) for _ in range(rng.randint(0, 12))]
        data = bytes(rng.randrange(1, 256) for _ in range(sum(sizes)))
        out = bytearray(len(data))
        views, pos = [], 0
        for size in sizes:
            views.append(memoryview(out)[pos : pos + size])
            pos += size
        segs = Segments(views, receive=True)
        assert segs.total == len(data)
        redirect_at = rng.choice([None, rng.randint(0, len(data))])
        cut = None
        while segs.remaining:
            if redirect_at is not None and segs.moved >= redirect_at and cut is None:
                segs.redirect()
                cut = segs.moved
            batch = segs.batch(rng.choice([1, 2, 5, 50, 1000]))
            size = sum(len(v) for v in batch)
            assert batch and 0 < size <= segs.remaining
            take, got = rng.randint(1, size), 0  # a syscall moves a prefix of the batch
            for view in batch:
                n = min(len(view), take - got)
                if n <= 0:
                    break
                view[:n] = data[segs.moved + got : segs.moved + got + n]
                got += n
            segs.advance(got)
        if cut is None:
            assert bytes(out) == data
        else:
            assert bytes(out[:cut]) == data[:cut] and not any(out[cut:])


def test_a_batch_takes_at_most_iov_max_views() -> None:
    views = [memoryview(bytearray(1)) for _ in range(IOV_MAX + 5)]
    segs = Segments(views, receive=True)
    assert len(segs.batch()) == IOV_MAX
    segs.advance(IOV_MAX)
    assert len(segs.batch()) == 5


class _RecordingSocket(socket.socket):
    """A real socket that remembers what each ``sendmsg`` was handed."""

    calls: list[list[bytes]]

    def sendmsg(self, buffers, *args):  # type: ignore[no-untyped-def, override]
        buffers = list(buffers)
        self.calls.append([bytes(b) for b in buffers])
        return super().sendmsg(buffers, *args)


async def _send_over_a_socketpair(
    views: list[memoryview], prefix: bytes, sndbuf: int | None = None
) -> tuple[bytes, list[list[bytes]], Segments]:
    """``send_segments`` through a real socketpair: what arrived, what each
    ``sendmsg`` was handed, and the spent Segments."""
    want = len(prefix) + sum(len(v) for v in views)
    left, right = socket.socketpair()
    sender = _RecordingSocket(fileno=left.detach())
    sender.calls = []
    with sender, right:
        if sndbuf is not None:
            sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sender.setblocking(False)
        right.setblocking(False)
        loop = asyncio.get_running_loop()

        async def drain() -> bytes:
            got = bytearray()
            while len(got) < want:
                got += await loop.sock_recv(right, 65536)
            return bytes(got)

        reader = asyncio.ensure_future(drain())
        segs = Segments(views, receive=False)
        await send_segments(sender, segs, "test send", prefix)
        return await reader, sender.calls, segs


@pytest.mark.timeout(30)
@pytest.mark.parametrize("payload_sizes", [[], [5], [1 << 20, 3, 1 << 20]])
async def test_a_prefix_leaves_in_the_payloads_first_sendmsg_and_survives_partial_sends(
    payload_sizes: list[int],
) -> None:
    """A read's REPLY goes out in the same syscall as the payload's first bytes; a
    send buffer far smaller than both still delivers every byte in order."""
    rng = random.Random(len(payload_sizes))
    prefix = rng.randbytes(3000)
    chunks = [rng.randbytes(n) for n in payload_sizes]
    got, calls, segs = await _send_over_a_socketpair(
        [memoryview(c) for c in chunks], prefix, sndbuf=4096
    )
    assert got == prefix + b"".join(chunks)
    assert segs.remaining == 0
    first = calls[0]
    assert first[0] == prefix
    if chunks:  # the payload's first bytes ride along with the prefix
        assert len(first) > 1 and first[1] == chunks[0][: len(first[1])]


@pytest.mark.timeout(30)
async def test_only_a_large_payload_moves_the_receive_low_water_mark(
    loopback_pair: tuple[socket.socket, socket.socket],
) -> None:
    """A wait for a control message keeps the socket's SO_RCVLOWAT at 1 (no
    setsockopt on an idle peer's every wake-up); a large payload raises it
    while it waits, and it is 1 again afterwards. Real loopback TCP."""
    from aiokvpipe.blocks.sgio import recv_segments

    sender, receiver = loopback_pair
    receiver.setblocking(False)

    def lowat() -> int:
        return receiver.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)

    for size, waiting_mark in ((16, 1), (4 << 20, 1 << 20)):
        target = bytearray(size)
        task = asyncio.ensure_future(
            recv_segments(receiver, Segments([memoryview(target)], receive=True), "test")
        )
        try:
            for _ in range(5):
                await asyncio.sleep(0)  # the receive finds nothing and waits
            assert not task.done() and lowat() == waiting_mark, size
            sender.sendall(b"\x07" * size)
            await asyncio.wait_for(task, 10)
        finally:
            task.cancel()
        assert target == b"\x07" * size and lowat() == 1


@pytest.mark.timeout(30)
async def test_a_prefix_beside_a_full_batch_of_small_views_keeps_within_iov_max() -> None:
    """Small blocks fill a syscall's batch with IOV_MAX runs; the prefix must not
    make it IOV_MAX + 1 (EMSGSIZE, reported as a lost peer before this fix)."""
    views = [memoryview(bytes([i % 251]) * 8) for i in range(IOV_MAX + 5)]
    prefix = b"p" * 100
    got, calls, _ = await _send_over_a_socketpair(views, prefix)
    assert got == prefix + b"".join(bytes(v) for v in views)
    assert max(len(call) for call in calls) <= IOV_MAX


# ------------------------------------------------------------------ leases


async def test_lease_completes_when_every_layer_of_every_block_landed() -> None:
    table = LeaseTable()
    lease = table.grant("write", "r", "kv", (1, 2), (0, 1), ttl=5)
    lease.mark([1, 2], [0])
    assert not lease.ended and lease.remaining == 2
    lease.mark([1, 2], [0])  # the same pieces twice count once
    lease.mark([2], [1])
    assert not lease.ended and lease.remaining == 1
    lease.mark([1], [1])
    await lease.wait()
    assert lease.completed
    with pytest.raises(LeaseCompletedError, match="already completed"):
        table.find("write", "r", "kv")


async def test_lease_expires_at_ttl_and_refuses_later_requests() -> None:
    table = LeaseTable()
    lease = table.grant("read", "r", "kv", (1,), (0,), ttl=0.05)
    with pytest.raises(LeaseExpiredError, match=r"expired after ttl=0.05s with 0 of 1") as info:
        await lease.wait()
    assert isinstance(info.value, TransferTimeout)
    with pytest.raises(LeaseExpiredError):
        table.find("read", "r", "kv")


async def test_cancelled_lease_redirects_its_transfers_and_refuses_access() -> None:
    table = LeaseTable()
    lease = table.grant("write", "r", "kv", (1,), (0,), ttl=5)
    target = bytearray(8)
    segs = Segments([memoryview(target)], receive=True)
    lease.attach(segs)
    lease.cancel()
    assert segs.redirected
    lease.mark([1], [0])  # a transfer that finishes after the end counts for nothing
    with pytest.raises(LeaseCancelledError):
        await lease.wait()
    with pytest.raises(LeaseCancelledError):
        table.find("write", "r", "kv")


async def test_lease_access_is_only_what_it_grants() -> None:
    table = LeaseTable()
    lease = table.grant("read", "r", "kv", (1, 2), (0,), ttl=5)
    with pytest.raises(LeaseNotGrantedError, match="does not grant blocks 3"):
        lease.check("read", [1, 3], [0])
    with pytest.raises(LeaseNotGrantedError, match="does not grant layers 1"):
        lease.check("read", [1], [1])
    with pytest.raises(LeaseNotGrantedError, match="granted read, not write"):
        table.find("write", "r", "kv")
    with pytest.raises(LeaseNotGrantedError, match="no read lease for request 'x'"):
        table.find("read", "x", "kv")
    with pytest.raises(LeaseError, match="already holds a live read lease"):
        table.grant("read", "r", "kv", (5,), (0,), ttl=5)
    with pytest.raises(ConfigError, match="ttl"):
        table.grant("read", "s", "kv", (5,), (0,), ttl=0)
    lease.cancel()


# ------------------------------------------------------------------ protocol


async def _parse(raw: bytes) -> protocol.Message | None:
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        b.sendall(raw)
        b.shutdown(socket.SHUT_WR)
        return await protocol.read_message(a, "test", eof_ok=True)


async def test_protocol_round_trip_and_rejects_malformed_messages() -> None:
    region = RegionTable().register("kv", vllm_layers(), block_dim=1)
    body, ids = protocol.request("read", "req", "kv", [1], [region.layout(1)], 640, [7, 3])
    message = await _parse(protocol.encode(protocol.Kind.REQUEST, body, ids))
    assert message is not None
    request = protocol.parse_request(message, "test")
    assert request.blocks == (7, 3) and request.layouts == (region.layout(1),)
    assert await _parse(b"") is None  # EOF at a boundary is not an error

    header = struct.Struct("<4sBBHII")
    bad = {
        "magic": header.pack(b"XXXX", 1, 1, 0, 2, 0) + b"{}",
        "kind": header.pack(b"AKVB", 1, 9, 0, 2, 0) + b"{}",
        "json size": header.pack(b"AKVB", 1, 1, 0, protocol.MAX_JSON + 1, 0),
        "ids in a reply": header.pack(b"AKVB", 1, 2, 0, 2, 1) + b"{}" + bytes(4),
        "not json": header.pack(b"AKVB", 1, 1, 0, 2, 0) + b"{x",
        "not an object": header.pack(b"AKVB", 1, 1, 0, 2, 0) + b"[]",
    }
    for name, raw in bad.items():
        with pytest.raises((BadMagicError, MalformedFrameError)):
            await _parse(raw)
            pytest.fail(name)
    fields = [
        {**body, "op": "delete"},
        {**body, "nbytes": -1},
        {**body, "nbytes": True},
        {**body, "request_id": ""},
        {**body, "region": 3},
        {**body, "layers": [0, "1"]},
        {**body, "layouts": [[99, [2], [4]]]},
        {**body, "layouts": [[8, [2], [True]]]},
        {**body, "layouts": []},
    ]
    for broken in fields:
        message = await _parse(protocol.encode(protocol.Kind.REQUEST, broken, ids))
        assert message is not None
        with pytest.raises(MalformedFrameError):
            protocol.parse_request(message, "test")


def test_only_known_errors_travel() -> None:
    exc = BlockIdError("remote_blocks", [40], "block id 40 out of range")
    rebuilt = protocol.remote_error(protocol.error_body(exc), "owner x")
    assert isinstance(rebuilt, BlockIdError) and rebuilt.values == (40,)
    assert rebuilt.argument == "remote_blocks" and str(rebuilt).startswith("owner x: ")
    forged = protocol.remote_error({"error": "SystemExit", "message": "bye"}, "owner x")
    assert isinstance(forged, MalformedFrameError)


def test_a_view_plan_cut_anywhere_gives_the_same_stream() -> None:
    """Segments take a plan's views a batch at a time, cut at any byte: the
    bytes moved are the blocks in stream order whatever the cut points."""
    region = RegionTable().register("kv", vllm_layers(), block_dim=1)
    ids = [3, 4, 5, 9, 0, 7]
    plan = region.segments(ids, [1, 0])
    whole = b"".join(plan.views())
    for limit in (1, 5, 12, 64, 100, 1000, len(whole)):
        segs = Segments(plan, receive=False)
        got = bytearray()
        while segs.remaining:
            batch = segs.batch(limit)
            taken = b"".join(batch)[: max(1, limit // 2)]  # a short send
            got += taken
            segs.advance(len(taken))
        assert bytes(got) == whole, limit
