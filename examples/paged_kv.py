"""Paged KV blocks between a prefill and a decode process: a pull, then a layer-wise push.

Run it with ``python examples/paged_kv.py`` (CPU is enough). This process
is the *decode* instance; it starts the *prefill* instance as a child.
Both register a vLLM-shaped paged cache, one tensor per layer of shape
``[2 (K, V), num_blocks, block_size, kv_heads, head_dim]`` (``block_dim=1``),
and move blocks by id, with no gather or scatter copy:

1. Pull: prefill ``expose`` s a request's scattered blocks (a read lease);
   decode ``read`` s them straight into its own, different, block ids.
2. Layer-wise push: decode ``expect`` s another request into its blocks (a
   write lease); prefill "computes" one layer at a time and ``write`` s each
   layer as soon as it is done, while the next one computes. Decode's lease
   completes once every layer of every block has landed.

Decode checks every byte against what prefill must hold (both sides derive
the contents from a seed) and prints sizes and speeds. On one host the
block payloads go through shared memory (``--transport tcp`` forces the
socket). Control messages (which blocks, which request) travel as small
tensors over the same endpoints (``ep.send`` / ``ep.recv``).

Exit status is 0 only if every block arrived bit-exact, nothing else in
either cache was touched, and both processes finished cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sys
import time
from typing import Any

import torch

from aiokvpipe import AiokvpipeError, Endpoint, EndpointConfig

BLOCK_SIZE, KV_HEADS, HEAD_DIM = 16, 8, 128  # bf16: 32 KiB per K or V block
TIMEOUT = 120.0


def cache(layers: int, num_blocks: int, seed: int | None) -> list[torch.Tensor]:
    """One paged tensor per layer; ``seed`` fills it deterministically (None: zeros)."""
    shape = (2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    if seed is None:
        return [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(layers)]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(layers)]


def computed_layer(layer: int, template: torch.Tensor, seed: int) -> torch.Tensor:
    """What prefill's "forward pass" writes into layer ``layer`` (decode rebuilds it)."""
    gen = torch.Generator().manual_seed(seed * 1000 + layer)
    return torch.randn(template.shape, generator=gen).to(torch.bfloat16)


def scattered(count: int, num_blocks: int, seed: int) -> list[int]:
    """``count`` distinct, unsorted block ids: a real request's blocks are anywhere."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(num_blocks, generator=gen)[:count].tolist()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


async def send_json(ep: Endpoint, peer: str, obj: Any) -> None:
    await ep.send(peer, torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8))


async def recv_json(ep: Endpoint) -> tuple[str, Any]:
    src, tensor = await asyncio.wait_for(ep.recv(), TIMEOUT)
    assert tensor is not None
    return src, json.loads(bytes(tensor.tolist()))


def config(name: str, token: str, transport: str) -> EndpointConfig:
    return EndpointConfig(
        name=name,
        host="127.0.0.1",
        port=0,
        token=token,
        transport=transport,  # type: ignore[arg-type]
    )


# ------------------------------------------------------------------ prefill (the child)


async def prefill(args: argparse.Namespace, token: str) -> None:
    async with await Endpoint.start(config("prefill", token, args.transport)) as ep:
        layers = cache(args.layers, args.num_blocks, seed=1)
        ep.register("kv", layers, block_dim=1)
        decode = args.decode
        # 1. A finished request's blocks, granted for reading.
        pull_blocks = scattered(args.request_blocks, args.num_blocks, seed=2)
        lease = ep.expose("req-pull", "kv", pull_blocks, ttl=TIMEOUT)
        await send_json(ep, decode, {"request": "req-pull", "blocks": pull_blocks})
        await asyncio.wait_for(lease.wait(), TIMEOUT)  # decode has read them all

        # 2. Decode granted a write; compute layer by layer, ship each at once.
        _, grant = await recv_json(ep)
        mine = scattered(args.request_blocks, args.num_blocks, seed=3)
        index = torch.tensor(mine)
        results = [computed_layer(i, t[:, mine], seed=4) for i, t in enumerate(layers)]
        writes = []
        start = time.perf_counter()
        for layer, tensor in enumerate(layers):
            await asyncio.sleep(args.compute_ms / 1e3)  # the layer's forward pass...
            tensor.index_copy_(1, index, results[layer])  # ...writes its KV blocks
            writes.append(
                asyncio.ensure_future(
                    ep.write(decode, grant["request"], "kv", mine, grant["blocks"], [layer])
                )
            )
        await asyncio.gather(*writes)
        pushed = time.perf_counter() - start
        await send_json(ep, decode, {"pushed_s": pushed})
        _, bye = await recv_json(ep)
        assert bye == {"bye": True}


# ------------------------------------------------------------------ decode (this process)


async def decode(args: argparse.Namespace, token: str) -> bool:
    async with await Endpoint.start(config("decode", token, args.transport)) as ep:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            *sys.argv[1:],
            "--decode",
            ep.address,
            env={**os.environ, "AIOKV_EXAMPLE_TOKEN": token},
        )
        ok = False
        try:
            ok = await _decode(args, ep)
        finally:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.wait(), TIMEOUT)
            if child.returncode is None:
                child.kill()
                await child.wait()
        if child.returncode != 0:
            print(f"FAILED: prefill exit status {child.returncode}")
            return False
        return ok


async def _decode(args: argparse.Namespace, ep: Endpoint) -> bool:
    layers = cache(args.layers, args.num_blocks, seed=None)
    ep.register("kv", layers, block_dim=1)
    block_bytes = 2 * BLOCK_SIZE * KV_HEADS * HEAD_DIM * 2  # K and V, one layer
    request_bytes = args.request_blocks * args.layers * block_bytes
    print(
        f"cache: {args.layers} layers x [2, {args.num_blocks}, {BLOCK_SIZE}, {KV_HEADS}, "
        f"{HEAD_DIM}] bf16 ({args.layers * args.num_blocks * block_bytes >> 20} MiB a side); "
        f"request: {args.request_blocks} scattered blocks ({request_bytes / 2**20:.0f} MiB); "
        f"transport: {args.transport}",
        flush=True,
    )
    ok = True
    source = cache(args.layers, args.num_blocks, seed=1)  # what prefill registered

    # 1. Pull the finished request into our own (different, scattered) blocks.
    prefill, offer = await recv_json(ep)
    dest = scattered(args.request_blocks, args.num_blocks, seed=5)
    start = time.perf_counter()
    await ep.read(prefill, offer["request"], "kv", offer["blocks"], dest)
    pulled = time.perf_counter() - start
    good = all(
        same_bits(mine[:, dest], theirs[:, offer["blocks"]])
        for mine, theirs in zip(layers, source, strict=True)
    )
    print(
        f"pull (cold: dials the connection): {args.request_blocks} blocks x {args.layers} "
        f"layers in {pulled * 1e3:.1f} ms "
        f"({request_bytes / pulled / 1e9:.2f} GB/s), bit-exact: {'yes' if good else 'NO'}",
        flush=True,
    )
    ok &= good

    # 2. Grant a write into other blocks and let prefill push layer by layer.
    target = [b for b in scattered(args.num_blocks, args.num_blocks, seed=6) if b not in dest]
    target = target[: args.request_blocks]
    before = [t.clone() for t in layers]
    lease = ep.expect("req-push", "kv", target, ttl=TIMEOUT)
    await send_json(ep, prefill, {"request": "req-push", "blocks": target})
    await asyncio.wait_for(lease.wait(), TIMEOUT)  # every layer of every block landed
    _, report = await recv_json(ep)
    pushed = report["pushed_s"]
    mine = scattered(args.request_blocks, args.num_blocks, seed=3)
    good = all(
        same_bits(t[:, target], computed_layer(i, source[i][:, mine], seed=4))
        for i, t in enumerate(layers)
    )
    untouched = [b for b in range(args.num_blocks) if b not in target]
    intact = all(
        same_bits(t[:, untouched], b[:, untouched]) for t, b in zip(layers, before, strict=True)
    )
    compute = args.layers * args.compute_ms
    print(
        f"layer-wise push: {args.layers} layers, {args.compute_ms:g} ms compute each "
        f"({compute:g} ms), done in {pushed * 1e3:.1f} ms "
        f"({request_bytes / pushed / 1e9:.2f} GB/s incl. compute), "
        f"bit-exact: {'yes' if good else 'NO'}, other blocks untouched: "
        f"{'yes' if intact else 'NO'}",
        flush=True,
    )
    ok &= good and intact
    await send_json(ep, prefill, {"bye": True})
    return ok


def main() -> int:
    torch.set_num_threads(1)  # torch's spinning worker threads would take the loops' cores
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--num-blocks", type=int, default=256, help="blocks per layer")
    parser.add_argument("--request-blocks", type=int, default=64, help="blocks per request")
    parser.add_argument("--compute-ms", type=float, default=2.0, help="simulated per layer")
    parser.add_argument("--transport", choices=("auto", "tcp"), default="auto")
    parser.add_argument("--decode", help=argparse.SUPPRESS)  # set for the prefill child
    args = parser.parse_args()
    if 2 * args.request_blocks > args.num_blocks:
        parser.error("--num-blocks must hold two requests' blocks")
    if args.decode is not None:
        try:
            asyncio.run(prefill(args, os.environ["AIOKV_EXAMPLE_TOKEN"]))
        except (AiokvpipeError, TimeoutError) as exc:
            print(f"[prefill] FAILED: {type(exc).__name__}: {exc}", flush=True)
            return 1
        return 0
    try:
        ok = asyncio.run(decode(args, secrets.token_hex(16)))
    except (AiokvpipeError, TimeoutError) as exc:
        print(f"FAILED: {type(exc).__name__}: {exc}")
        return 1
    if not ok:
        print("FAILED: a block did not arrive bit-exact, or another block changed")
        return 1
    print("OK: pulled and pushed blocks arrived bit-exact; nothing else changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
