"""Disaggregated prefill/decode on vLLM's CPU build, KV pulled through aiokvpipe.

Starts a prefill and a decode ``vllm serve`` with AiokvpipeConnector, the
asyncio proxy of ``proxy.py`` in front of them, sends prompts (token ids)
through the proxy, and prints each output with its timings, checked against
the same prompts served colocated (plain requests to the prefill server).

``--compare`` also starts a prefill/decode pair with vLLM's own
ExampleConnector (KV saved to and loaded from shared storage) and measures,
on the same prompts, the decode-side time from request arrival to first
token for both connectors.

Needs vLLM's CPU build (``pip install 'aiokvpipe[vllm]'``, then remove
torchvision, torchaudio and torchcodec) and no download: the model is a
random-weight tiny Llama built on the spot. Example::

    python examples/vllm_disagg/run.py --prompts 20 --compare
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from proxy import serve

from aiokvpipe.integrations.vllm.serving import (
    TOKEN_ENV,
    VllmServer,
    free_port,
    kv_transfer_config,
)
from aiokvpipe.integrations.vllm.tiny_model import build_tiny_model

NEW_TOKENS = 16


def make_prompts(count: int, seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [8 + 392 * i // max(count - 1, 1) for i in range(count)]
    return [[rng.randrange(1, 1024) for _ in range(n)] for n in lengths]


async def via_proxy(
    client: httpx.AsyncClient, url: str, prompt: list[int]
) -> tuple[list[int], float, float]:
    """One streamed completion through the proxy: tokens, time to first token, total."""
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": NEW_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": True,
    }
    import json

    started = time.perf_counter()
    first = 0.0
    tokens: list[int] = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                new = choice.get("token_ids") or []
                if new and not tokens:
                    first = time.perf_counter() - started
                tokens.extend(new)
    return tokens, first, time.perf_counter() - started


async def decode_ttft(
    client: httpx.AsyncClient, prefill: VllmServer, decode: VllmServer, prompt: list[int]
) -> tuple[float, list[int]]:
    """Prefill, then time the decode request alone: arrival to first token."""
    pre = await prefill.complete_plain(client, prompt, 1, {"do_remote_decode": True})
    out = await decode.complete(client, prompt, NEW_TOKENS, pre.kv_transfer_params)
    return out.first_token_seconds, out.token_ids


async def demo(args: argparse.Namespace, servers: dict[str, VllmServer]) -> int:
    prompts = make_prompts(args.prompts)
    failures = 0
    port = free_port()
    runner = await serve(port, [servers["prefill"].url], [servers["decode"].url])
    proxy = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=300) as client:
            reference = [
                (await servers["prefill"].complete_plain(client, p, NEW_TOKENS)).token_ids
                for p in prompts
            ]
            print(f"\n{len(prompts)} prompts through the proxy ({proxy}):")
            print(f"{'len':>5} {'ttft ms':>8} {'total ms':>9}  ok  first tokens")
            for prompt, ref in zip(prompts, reference, strict=True):
                tokens, first, total = await via_proxy(client, proxy, prompt)
                ok = tokens == ref
                failures += not ok
                print(
                    f"{len(prompt):>5} {1000 * first:>8.1f} {1000 * total:>9.1f}  "
                    f"{'ok' if ok else 'XX'}  {tokens[:6]}"
                )
            if args.compare:
                await compare(client, servers, prompts)
    finally:
        await runner.cleanup()
    print(f"\n{len(prompts) - failures}/{len(prompts)} outputs identical to colocated")
    return 1 if failures else 0


async def compare(
    client: httpx.AsyncClient, servers: dict[str, VllmServer], prompts: list[list[int]]
) -> None:
    """Decode-side TTFT, aiokvpipe vs ExampleConnector, same prompts, interleaved."""
    ours: list[float] = []
    theirs: list[float] = []
    server_side: dict[str, tuple[float, float]] = {}
    # Prompts neither decode has seen (a local prefix-cache hit would skip the
    # transfer being measured); a short first pass warms both pairs up.
    for seed, measured in ((98, False), (99, True)):
        batch = make_prompts(4 if not measured else len(prompts), seed=seed)
        for prompt in batch:
            seconds, got = await decode_ttft(client, servers["prefill"], servers["decode"], prompt)
            ours.append(seconds)
            seconds, theirs_got = await decode_ttft(
                client, servers["ex_prefill"], servers["ex_decode"], prompt
            )
            theirs.append(seconds)
            if got != theirs_got:
                print(f"  note: outputs differ between the connectors for len {len(prompt)}")
        if not measured:
            ours.clear()
            theirs.clear()
            for name in ("decode", "ex_decode"):
                server_side[name] = await ttft_histogram(client, servers[name])
    for name in ("decode", "ex_decode"):
        total, count = await ttft_histogram(client, servers[name])
        total0, count0 = server_side[name]
        server_side[name] = (total - total0, count - count0)
    print("\ndecode-side time to first token (ms), same prompts:")
    print(f"{'':>16} {'p50':>8} {'mean':>8} {'max':>8}")
    for name, values in (("aiokvpipe", ours), ("ExampleConnector", theirs)):
        ms = [1000 * v for v in values]
        print(
            f"{name:>16} {statistics.median(ms):>8.1f} {statistics.fmean(ms):>8.1f} {max(ms):>8.1f}"
        )
    ratio = statistics.median(ours) / statistics.median(theirs)
    print(f"ratio aiokvpipe / ExampleConnector (client-side p50): {ratio:.2f}x")
    means = {name: 1000 * t / max(n, 1) for name, (t, n) in server_side.items()}
    print(
        "vLLM's own vllm:time_to_first_token_seconds on the decode servers (mean ms): "
        f"aiokvpipe {means['decode']:.1f}, ExampleConnector {means['ex_decode']:.1f}, "
        f"ratio {means['decode'] / max(means['ex_decode'], 1e-9):.2f}x"
    )


async def ttft_histogram(client: httpx.AsyncClient, server: VllmServer) -> tuple[float, float]:
    """(sum, count) of the server's time-to-first-token histogram (arrival to first token)."""
    total = await server.metric(client, "vllm:time_to_first_token_seconds_sum")
    count = await server.metric(client, "vllm:time_to_first_token_seconds_count")
    return total, count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="tiny model directory (built if missing)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--compare", action="store_true", help="also measure ExampleConnector")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vllm-disagg-"))
    model = build_tiny_model(args.model or work / "tiny-llama")
    os.environ.setdefault(TOKEN_ENV, secrets.token_hex(16))
    specs: dict[str, str] = {
        "prefill": kv_transfer_config(),
        "decode": kv_transfer_config(failure_policy="recompute"),
    }
    if args.compare:
        storage = str(work / "example-connector-storage")
        specs["ex_prefill"] = kv_transfer_config("example", storage=storage)
        specs["ex_decode"] = kv_transfer_config("example", storage=storage)
    started = time.perf_counter()
    servers = {name: VllmServer(name, model, cfg, log_dir=work) for name, cfg in specs.items()}
    try:
        for server in servers.values():
            server.wait_ready()
        print(
            f"{len(servers)} vLLM servers up in {time.perf_counter() - started:.0f}s (logs: {work})"
        )
        return asyncio.run(demo(args, servers))
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
