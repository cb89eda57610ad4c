"""Worker processes of ``python -m aiokvpipe.bench blocks``.

Rank 0 is the prefill instance, rank 1 the decode instance. Each starts an
Endpoint with a BlockService attached (:func:`aiokvpipe.blocks.wiring.attach`)
and a Pipe forced onto the same transport for the baselines and for pacing;
both register the same vLLM CPU layout, ``layers`` tensors of
``[2, num_blocks, 16, 8, 128]`` bf16.

Phases, every figure beside its baseline in the same processes, interleaved
iteration by iteration so a noisy machine slows both alike:

1. pull: decode reads the request's scattered blocks; baselines: the best a
   user can do with the Pipe (prefill ``index_select`` per layer -> send ->
   decode recv -> ``index_copy_``), and one contiguous tensor of the same
   bytes over the Pipe;
2. small: a 16-block read against a Pipe round trip of the same bytes;
3. push: prefill writes every layer at once (transfer alone), sleeps
   ``compute`` per layer (compute alone), then computes and writes layer by
   layer, each write overlapping the next layer's compute;
4. the same push on a bare socket (tcp, :mod:`.raw_push`) or a bare ring
   (shm, :mod:`.raw_ring_push`), the baseline for the layer-wise overhead
   the machine and the loop show without the block protocol.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any, Literal

import torch

from ..links.net import connect_with_retry, listening_socket, tune_data_socket
from ..shm.io import ShmRingBufferIO
from ..tensors import byte_view
from ..transport._shm_setup import decode_handle, encode_handle
from . import raw_push, raw_ring_push
from .procs import report, run_loop

BLOCK = (16, 8, 128)  # tokens x kv heads x head dim, bf16: 32 KiB per K or V block
WARMUP = 1  # first iterations dial the block connections and fault pages in: not counted


async def _raw_connect(port: int) -> socket.socket:
    """A bare socket dialled the way our own links are (the same congestion
    control and options), so the baseline differs from us only in our code."""
    return await connect_with_retry("127.0.0.1", port, time.monotonic() + 30, "raw push")


def request_blocks(count: int, num_blocks: int, seed: int) -> tuple[list[int], list[int]]:
    """Scattered source and destination ids (distinct, unsorted), as a real request's."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randperm(num_blocks, generator=gen)[:count].tolist()
    dst = torch.randperm(num_blocks, generator=gen)[:count].tolist()
    return src, dst


def ids_for(phase: str, i: int, count: int, num_blocks: int) -> tuple[list[int], list[int]]:
    """Iteration ``i``'s ids in ``phase`` (``pull``, ``small``, ``all``, ``wise``): a
    fresh scattered list every time, as each request of a server has its own
    blocks (a repeated list would be planned once and then come from the
    regions' range cache)."""
    first = {"pull": 1_000_000, "small": 2_000_000, "all": 3_000_000, "wise": 4_000_000}[phase]
    return request_blocks(count, num_blocks, first + i)


def layer_zero(num_blocks: int, seed: int) -> torch.Tensor:
    """The first registered layer of the worker seeded ``seed`` (what a reader checks)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((2, num_blocks, *BLOCK), generator=gen).to(torch.bfloat16)


def copy_rates(region: Any, ids: list[int], layers: int, reps: int = 5) -> dict[str, list[float]]:
    """Seconds per pass of one core copying the request's blocks through a
    ring-sized chunk, with the shm path's own copy loops, beside the same
    bytes as one contiguous tensor (context for the shm pull throughput:
    scattered 32 KiB blocks copy slower than one contiguous run).

    ``gather``/``scatter``: blocks into / out of the chunk; ``contig_in`` /
    ``contig_out``: a contiguous tensor into / out of it.
    """
    from ..blocks.sgio import Segments
    from ..blocks.shmpath import _HEAD, _drain, _fill

    room = 2 << 20
    chunk = memoryview(bytearray(room + _HEAD))
    nbytes = region.nbytes(len(ids), list(range(layers)))
    contiguous = torch.ones(nbytes, dtype=torch.uint8)  # real pages, not the zero page
    flat = byte_view(contiguous)

    def plan(receive: bool, blocks: bool) -> Segments:
        views = region.segments(ids, list(range(layers))) if blocks else [flat]
        return Segments(views, receive=receive)

    def one_pass(receive: bool, blocks: bool) -> float:
        segs = plan(receive, blocks)
        t0 = time.perf_counter()
        while segs.remaining:
            if receive:
                _drain(chunk, min(room, segs.remaining), segs)
            else:
                _fill(chunk, segs, room)
        return time.perf_counter() - t0

    out: dict[str, list[float]] = {"gather": [], "scatter": [], "contig_in": [], "contig_out": []}
    for _ in range(reps + 1):  # the first pass faults and warms: dropped
        out["gather"].append(one_pass(False, True))
        out["scatter"].append(one_pass(True, True))
        out["contig_in"].append(one_pass(False, False))
        out["contig_out"].append(one_pass(True, False))
    return {key: value[1:] for key, value in out.items()}


def worker(
    rank: int,
    queue: Any,
    ports: tuple[int, int],
    token: str,
    loop_name: str,
    layers: int,
    num_blocks: int,
    count: int,
    iters: int,
    small_iters: int,
    compute_ms: float,
    transport: str,
) -> None:
    from ..config import EndpointConfig, PipeConfig
    from ..endpoint import Endpoint
    from ..pipe import Pipe

    # torch's intra-op threads spin after parallel ops (the baseline's gathers)
    # and steal the cores both loops need.
    torch.set_num_threads(1)
    block_numel = 2 * BLOCK[0] * BLOCK[1] * BLOCK[2]
    iters += WARMUP
    small_iters += WARMUP

    async def main() -> dict[str, Any]:
        ep_port, pipe_port = ports
        ep = await Endpoint.start(
            EndpointConfig(
                name=f"bench-{rank}",
                host="127.0.0.1",
                port=ep_port if rank == 0 else 0,
                token=token,
                transport=transport,  # type: ignore[arg-type]
            )
        )
        service = ep.blocks
        try:
            async with await Pipe.connect(
                PipeConfig(
                    rank=rank,
                    world_size=2,
                    port=pipe_port,
                    token=token,
                    transport=transport,  # type: ignore[arg-type]
                    buffer_bytes=1 << 30,
                    connect_timeout=60,
                )
            ) as pipe:
                gen = torch.Generator().manual_seed(rank)
                region = [
                    torch.randn((2, num_blocks, *BLOCK), generator=gen).to(torch.bfloat16)
                    for _ in range(layers)
                ]
                service.register("kv", region, block_dim=1)
                if rank == 0:
                    got = await prefill(service, pipe, region)
                else:
                    got = await decode(service, pipe, region, f"127.0.0.1:{ep_port}", ep.address)
                wrong: Literal["tcp", "shm"] = "tcp" if transport == "shm" else "shm"
                if service.payload_bytes[wrong]:  # the figures would be another path's
                    raise RuntimeError(f"block payloads took {wrong}, not {transport}")
                return got
        finally:
            await ep.aclose()

    async def prefill(service: Any, pipe: Any, region: list[torch.Tensor]) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(7)
        pulls = [ids_for("pull", i, count, num_blocks)[0] for i in range(iters)]
        leases = [service.expose(f"pull-{i}", "kv", pulls[i], ttl=3600) for i in range(iters)]
        leases += [
            service.expose(f"small-{i}", "kv", ids_for("small", i, 16, num_blocks)[0], ttl=3600)
            for i in range(small_iters)
        ]
        # Real bytes, as a server's KV is: an untouched torch.zeros maps every
        # page to the kernel's one zero page, so sending it reads a single
        # cache-hot page and flatters the baseline.
        contiguous = torch.randn(count * block_numel * layers, generator=gen).to(torch.bfloat16)
        small = torch.randn(16 * block_numel * layers, generator=gen).to(torch.bfloat16)
        await pipe.send(None)  # ready: the leases are granted
        for i in range(iters):
            index = torch.tensor(pulls[i])
            await pipe.recv()  # the baseline's request
            for layer in region:
                await pipe.send(layer.index_select(1, index))
            await pipe.recv()
            await pipe.send(contiguous)
        for _ in range(small_iters):
            await pipe.recv()
            await pipe.send(small)
        for lease in leases:
            await lease.wait()  # the reader reported every read done

        decode = bytes((await pipe.recv()).tolist()).decode()  # it expects our pushes now
        samples: dict[str, list[float]] = {"transfer": [], "compute": [], "overlap": []}
        for i in range(iters):
            local, dst = ids_for("all", i, count, num_blocks)
            t0 = time.perf_counter()
            await service.write(decode, f"all-{i}", "kv", local, dst)
            t1 = time.perf_counter()
            for _ in range(layers):
                await asyncio.sleep(compute_ms / 1e3)
            local, dst = ids_for("wise", i, count, num_blocks)
            t2 = time.perf_counter()
            writes = []
            for layer_no in range(layers):
                await asyncio.sleep(compute_ms / 1e3)  # compute layer ``layer_no``...
                writes.append(  # ...and ship it while the next one computes
                    asyncio.ensure_future(
                        service.write(decode, f"wise-{i}", "kv", local, dst, layers=[layer_no])
                    )
                )
            await asyncio.gather(*writes)
            t3 = time.perf_counter()
            if i >= WARMUP:
                samples["transfer"].append(t1 - t0)
                samples["compute"].append(t2 - t1)
                samples["overlap"].append(t3 - t2)
        await pipe.send(None)
        await pipe.recv()  # decode saw every push lease complete
        if transport == "tcp":  # the same push on a bare socket, as a baseline
            port = int((await pipe.recv()).item())
            raw = await _raw_connect(port)
            try:
                source = byte_view(contiguous)  # ``contiguous`` outlives the rounds
                got = await raw_push.send_rounds(raw, source, layers, iters, compute_ms)
            finally:
                raw.close()
            samples["raw_whole"] = got["whole"][WARMUP:]
            samples["raw_wise"] = got["wise"][WARMUP:]
        else:  # the same push through a bare ring, as a baseline
            ring = raw_ring_push.create_ring()
            try:
                offer = json.dumps(encode_handle(ring.export_handle())).encode()
                await pipe.send(torch.tensor(list(offer), dtype=torch.uint8))
                await pipe.recv()  # attached
                ring.buffer.unlink()
                source = byte_view(contiguous)
                got = await raw_ring_push.send_rounds(ring, pipe, source, layers, iters, compute_ms)
            finally:
                ring.close()
            samples["raw_whole"] = got["whole"][WARMUP:]
            samples["raw_wise"] = got["wise"][WARMUP:]
        return samples

    async def decode(
        service: Any, pipe: Any, region: list[torch.Tensor], owner: str, me: str
    ) -> dict[str, Any]:
        src, dst = ids_for("pull", 0, count, num_blocks)
        expected = layer_zero(num_blocks, 0)[:, src].clone()
        samples: dict[str, list[float]] = {"pull": [], "gather": [], "contig": []}
        samples.update(small=[], pipe_small=[])
        await pipe.recv()
        for i in range(iters):
            src, dst = ids_for("pull", i, count, num_blocks)
            index = torch.tensor(dst)
            t0 = time.perf_counter()
            await service.read(owner, f"pull-{i}", "kv", src, dst)
            t1 = time.perf_counter()
            if i == 0 and not torch.equal(region[0][:, dst], expected):
                raise RuntimeError("pulled blocks differ from the owner's")
            await pipe.send(None)
            for layer in region:
                layer.index_copy_(1, index, await pipe.recv())
            t2 = time.perf_counter()
            await pipe.send(None)
            await pipe.recv()
            t3 = time.perf_counter()
            if i >= WARMUP:
                samples["pull"].append(t1 - t0)
                samples["gather"].append(t2 - t1)
                samples["contig"].append(t3 - t2)
        for i in range(small_iters):
            small_src, small_dst = ids_for("small", i, 16, num_blocks)
            t0 = time.perf_counter()
            await service.read(owner, f"small-{i}", "kv", small_src, small_dst)
            t1 = time.perf_counter()
            await pipe.send(None)
            await pipe.recv()
            t2 = time.perf_counter()
            if i >= WARMUP:
                samples["small"].append(t1 - t0)
                samples["pipe_small"].append(t2 - t1)

        leases = []
        for i in range(iters):
            for phase in ("all", "wise"):
                push_dst = ids_for(phase, i, count, num_blocks)[1]
                leases.append(service.expect(f"{phase}-{i}", "kv", push_dst, ttl=3600))
        await pipe.send(torch.tensor(list(me.encode()), dtype=torch.uint8))
        await pipe.recv()  # prefill is done writing
        for lease in leases:
            await lease.wait()
        await pipe.send(None)
        samples.update(
            {f"copy_{k}": v for k, v in copy_rates(service.regions.get("kv"), dst, layers).items()}
        )
        if transport == "tcp":
            with listening_socket("127.0.0.1", 0, 1) as listener:
                await pipe.send(torch.tensor(listener.getsockname()[1]))
                raw, _ = await asyncio.get_running_loop().sock_accept(listener)
            with raw:
                tune_data_socket(raw)
                nbytes = count * block_numel * layers * 2
                await raw_push.receive_rounds(raw, nbytes, layers, iters)
        else:
            offer = json.loads(bytes((await pipe.recv()).tolist()))
            ring = ShmRingBufferIO.attach(decode_handle(offer, "raw ring"), 0, anticipate=False)
            try:
                ring.buffer.drop_name()
                await pipe.send(None)
                nbytes = count * block_numel * layers * 2
                await raw_ring_push.receive_rounds(ring, pipe, nbytes, layers, iters)
            finally:
                ring.close()
        return samples

    report(queue, lambda: run_loop(loop_name, main))
