"""A hostile peer, fuzzed with seeded random frames, never writes outside its granted blocks.

The peer passes the token handshake (it is authenticated, just malicious or
broken) and then sends mutated block requests, payloads of the wrong size,
garbage trailers and truncated frames, pipelined without waiting for
answers. After every session the owner's memory outside the granted blocks
must be exactly what it was; a request whose byte claim is off must be cut
off before any payload byte lands anywhere; and the owner must still serve
an honest peer afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import struct
from typing import Any

import pytest
import torch
from blocks_net import BlockNode, make_layers

from aiokvpipe.blocks import protocol
from aiokvpipe.blocks.protocol import Kind
from aiokvpipe.errors import MalformedFrameError, PeerClosedError

GRANTED = [3, 4, 9]
LAYERS = 2
BLOCKS = 16
SESSIONS = 120


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: random payloads land NaNs in the granted blocks."""
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


async def session(hostile: BlockNode, address: str, frames: list[bytes]) -> None:
    """Send ``frames`` back to back on one authenticated connection, then drain to EOF."""
    loop = asyncio.get_running_loop()
    sock = (await hostile.dial(address, "blocks")).sock
    try:
        with contextlib.suppress(OSError):
            for frame in frames:
                await loop.sock_sendall(sock, frame)
            sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            async with asyncio.timeout(5):
                while await loop.sock_recv(sock, 1 << 16):
                    pass
    finally:
        sock.close()


def frames_for(
    rng: random.Random, rid: str, layouts: list[Any], block_bytes: int
) -> tuple[list[bytes], bool]:
    """One session's frames, and whether the request is refused before any payload lands."""
    op = rng.choice(["write", "write", "write", "read"])
    blocks = rng.sample(GRANTED, rng.randint(1, len(GRANTED)))
    layers = rng.sample(range(LAYERS), rng.randint(1, LAYERS))
    nbytes = len(blocks) * len(layers) * 2 * block_bytes
    body: dict[str, Any] = {
        "op": op,
        "request_id": rid,
        "region": "kv",
        "layers": layers,
        "layouts": [layouts[i] for i in layers],
        "nbytes": nbytes,
    }
    ids = list(blocks)
    refused = False
    mutation = rng.choice(
        ["none", "claim", "claim", "blocks", "layers", "field", "header", "truncate", "nids"]
    )
    if mutation == "claim":
        body["nbytes"] = max(0, nbytes + rng.choice([1, -1, 2, 4096, 1 << 20, 1 << 40, -nbytes]))
        refused = body["nbytes"] != nbytes
    elif mutation == "blocks":
        ids.append(rng.choice([0, 5, BLOCKS - 1, BLOCKS, 1 << 31, ids[0]]))
        refused = True
    elif mutation == "layers":
        body["layers"] = [*layers, rng.choice([LAYERS, 1 << 20, layers[0]])]
        body["layouts"] = [*body["layouts"], layouts[0]]
        refused = True
    elif mutation == "field":
        key = rng.choice(list(body))
        body[key] = rng.choice([None, True, -1, 1.5, "x" * 300, [], {}, [[1, [2], [3]]], 1 << 62])
        refused = True
    raw = bytearray(protocol.encode(Kind.REQUEST, body, ids))
    if mutation == "header":
        raw[rng.randrange(16)] ^= 1 << rng.randrange(8)
        refused = True
    elif mutation == "truncate":
        raw = raw[: rng.randrange(len(raw))]
        refused = True
    elif mutation == "nids":
        struct.pack_into("<I", raw, 12, len(ids) + rng.choice([1, 5, 1 << 19]))
        refused = True
    frames = [bytes(raw)]
    if op == "write":
        extra = rng.choice([0, 0, 0, 1, 100, -1, -100, 1 << 16])
        frames.append(rng.randbytes(max(0, nbytes + extra)))
        frames.append(
            rng.choice(
                [
                    protocol.encode(Kind.STATUS, {"status": "commit"}),
                    protocol.encode(Kind.STATUS, {"status": rng.choice(["landed", "??", 7])}),
                    protocol.encode(Kind.REQUEST, body, ids),
                    rng.randbytes(rng.randint(1, 64)),
                    json.dumps({"status": "commit"}).encode(),
                ]
            )
        )
    else:
        frames.append(protocol.encode(Kind.STATUS, {"status": rng.choice(["done", "abort", "x"])}))
    return frames, refused


@pytest.mark.timeout(120)
async def test_a_fuzzing_peer_never_writes_outside_the_granted_blocks() -> None:
    rng = random.Random(1234)
    async with await BlockNode.start() as owner, await BlockNode.start() as hostile:
        region = make_layers(0, LAYERS, BLOCKS)
        owner.service.register("kv", region, block_dim=1)
        reg = owner.service.regions.get("kv")
        layouts = [reg.layout(i).to_wire() for i in range(LAYERS)]
        block_bytes = reg.layout(0).block_bytes
        outside = [b for b in range(BLOCKS) if b not in GRANTED]
        pristine = [t.clone() for t in region]
        generation = 0
        for _ in range(SESSIONS):
            rid = f"req-{generation}"
            leases = [
                owner.service.leases._live.get((kind, rid, "kv")) for kind in ("read", "write")
            ]
            if any(lease is None or lease.ended for lease in leases):
                generation += 1  # the last session completed or broke a lease: grant afresh
                rid = f"req-{generation}"
                owner.service.expose(rid, "kv", GRANTED, ttl=60)
                owner.service.expect(rid, "kv", GRANTED, ttl=60)
            before = [t.clone() for t in region]
            frames, refused = frames_for(rng, rid, layouts, block_bytes)
            await session(hostile, owner.address, frames)
            for now, old in zip(region, pristine, strict=True):
                assert same_bits(now[:, outside], old[:, outside]), frames[0][:200]
            if refused:  # cut off or refused before a payload byte was read
                assert all(same_bits(a, b) for a, b in zip(region, before, strict=True)), frames[0]
        assert owner.service.cut_off > 0
        for lease in owner.service.leases.leases():
            lease.cancel()

        # Still serving: an honest writer fills granted blocks.
        async with await BlockNode.start() as honest:
            source = make_layers(9, LAYERS, 4)
            honest.service.register("kv", source, block_dim=1)
            lease = owner.service.expect("honest", "kv", GRANTED, ttl=10)
            await honest.service.write(owner.address, "honest", "kv", [0, 1, 2], GRANTED)
            await lease.wait()
            for mine, theirs in zip(region, source, strict=True):
                assert torch.equal(mine[:, GRANTED], theirs[:, [0, 1, 2]])


# ------------------------------------------------------------------ over shared memory

RING = 1 << 20  # 4 chunks of 256 KiB: a write of the granted blocks spans several


async def shm_session(
    hostile: BlockNode, address: str, rng: random.Random, rid: str, layouts: list[Any], size: int
) -> str:
    """A write whose payload crosses the ring in chunks, one of them (maybe) lying.

    Returns the mutation made. The request itself is honest: only the
    chunk headers (transfer number, offset, length) or the chunk count lie.
    """
    from aiokvpipe.blocks.shmpath import _CHUNK, _HEAD, RingPath

    sock = (await hostile.dial(address, "blocks")).sock
    sock.setblocking(False)
    path = RingPath(True, RING)
    try:
        await path.open(sock, "push", "hostile")
        assert path.tx is not None, path.refusal
        layers = rng.sample(range(LAYERS), rng.randint(1, LAYERS))
        ids = rng.sample(GRANTED, rng.randint(1, len(GRANTED)))
        nbytes = len(ids) * len(layers) * size
        body, _ = protocol.request(
            "write", rid, "kv", layers, [layouts[i] for i in layers], nbytes, ids
        )
        body["layouts"] = [layouts[i].to_wire() for i in layers]
        await protocol.send_message(sock, Kind.REQUEST, body, "hostile", ids)
        reply = await protocol.expect_message(sock, Kind.REPLY, "hostile")
        assert reply.body.get("ok") is True, reply.body
        room = path.tx.buffer.max_chunk_bytes - _HEAD
        mutation = rng.choice(["none", "number", "offset", "zero", "room", "past-end", "short"])
        bad_at = rng.randrange(max(1, -(-nbytes // room)))
        offset, index = 0, 0
        while offset < nbytes:
            n = min(room, nbytes - offset)
            number, claim_offset, claim_n = 1, offset, n
            if index == bad_at:
                if mutation == "number":
                    number = rng.choice([0, 2, 1 << 31])
                elif mutation == "offset":
                    claim_offset = offset + rng.choice([1, -1 if offset else 7, room, 1 << 40])
                elif mutation == "zero":
                    claim_n = 0
                elif mutation == "room":
                    claim_n = room + rng.choice([1, 4096, 1 << 30])
                elif mutation == "past-end":
                    claim_n = min(room, nbytes - offset + rng.randint(1, 64))
                elif mutation == "short":
                    break  # stop sending: the owner waits, then sees us close
            async with path.tx.acquire_write() as buf:
                _CHUNK.pack_into(buf, 0, number, claim_n, claim_offset)
                buf[_HEAD : _HEAD + n] = rng.randbytes(n)
            offset += n
            index += 1
        if mutation in ("none", "past-end") and offset >= nbytes and claim_n == n:
            mutation = "none"  # past-end on a chunk that was already the last one's size
        if mutation == "none":
            await protocol.send_message(sock, Kind.STATUS, protocol.status("commit"), "hostile")
            answer = await protocol.expect_message(sock, Kind.STATUS, "hostile")
            assert answer.body.get("status") == "landed", answer.body
        return mutation
    finally:
        sock.close()
        path.close()


@pytest.mark.timeout(120)
async def test_lying_shm_chunks_never_write_outside_the_granted_blocks() -> None:
    rng = random.Random(4321)
    async with (
        await BlockNode.start(link="auto") as owner,
        await BlockNode.start(link="auto") as hostile,
    ):
        region = make_layers(0, LAYERS, BLOCKS, block_shape=(64, 8, 16))
        owner.service.register("kv", region, block_dim=1)
        reg = owner.service.regions.get("kv")
        layouts = [reg.layout(i) for i in range(LAYERS)]
        size = 2 * layouts[0].block_bytes  # K and V of one block, one layer
        outside = [b for b in range(BLOCKS) if b not in GRANTED]
        pristine = [t.clone() for t in region]
        mutations: set[str] = set()
        for generation in range(40):
            rid = f"shm-{generation}"
            lease = owner.service.expect(rid, "kv", GRANTED, ttl=60)
            cut_before = owner.service.cut_off
            mutation = await shm_session(hostile, owner.address, rng, rid, layouts, size)
            mutations.add(mutation)
            for now, old in zip(region, pristine, strict=True):
                assert same_bits(now[:, outside], old[:, outside]), mutation
            if mutation == "short":  # it closed mid-payload: the lease failed
                with pytest.raises(PeerClosedError):
                    await asyncio.wait_for(lease.wait(), 5)
            elif mutation != "none":  # a lying chunk: cut off, nothing counted
                for _ in range(200):
                    if owner.service.cut_off > cut_before:
                        break
                    await asyncio.sleep(0.005)
                assert owner.service.cut_off == cut_before + 1, mutation
                assert "shared-memory chunk claims" in owner.service.last_cut_off
                assert not lease.ended
            lease.cancel()
        assert mutations >= {"none", "number", "offset", "zero", "room", "short"}, mutations
        assert owner.service.payload_bytes["tcp"] == 0


@pytest.mark.parametrize("lie", ["offset", "number", "length"])
async def test_a_lying_owner_cannot_steer_a_readers_bytes(lie: str) -> None:
    """Over shm the owner fills the ring; a chunk claiming another offset,
    transfer or length is refused before a byte is copied, and none of the
    reader's blocks change."""
    from blocks_net import TOKEN, local_info

    from aiokvpipe.blocks.shmpath import _CHUNK, _HEAD, RingPath
    from aiokvpipe.links import Incoming, Listener

    taken: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    listener = Listener("127.0.0.1", 0, token=TOKEN, what="lying owner").start()

    async def handler(incoming: Incoming) -> None:
        await incoming.accept(local_info(listener.port, "auto"))
        taken.set_result(incoming.sock)

    listener.serve("blocks", handler)
    path = RingPath(True, RING)
    try:
        async with await BlockNode.start(link="auto") as reader:
            local = make_layers(1, 1, 8)
            before = local[0].clone()
            reader.service.register("kv", local, block_dim=1)
            owner = f"127.0.0.1:{listener.port}"
            read = asyncio.ensure_future(reader.service.read(owner, "r", "kv", [0, 1], [2, 5]))
            sock = await taken
            sock.setblocking(False)
            setup = await protocol.expect_message(sock, Kind.SETUP, "owner")
            await path.answer(sock, setup, "owner")
            assert path.tx is not None
            message = await protocol.expect_message(sock, Kind.REQUEST, "owner")
            nbytes = protocol.parse_request(message, "owner").nbytes
            await protocol.send_message(sock, Kind.REPLY, protocol.reply_ok(nbytes), "owner")
            n = nbytes // 2
            claims = {"offset": (1, n, 1), "number": (2, n, 0), "length": (1, nbytes + 1, 0)}
            async with path.tx.acquire_write() as buf:
                _CHUNK.pack_into(buf, 0, *claims[lie])
                buf[_HEAD : _HEAD + n] = b"\xff" * n
            with pytest.raises(MalformedFrameError, match="shared-memory chunk claims"):
                await asyncio.wait_for(read, 5)
            assert torch.equal(local[0], before)  # not even the destination blocks
            sock.close()
    finally:
        path.close()
        await listener.aclose()
