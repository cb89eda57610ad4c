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
import json
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
from aiokvpipe.integrations.vllm.trace import TRACE_ENV

NEW_TOKENS = 16
#: (label, prefill server, decode server) of the connectors --compare measures
#: (--also and --previous add theirs before the baseline); the last one is the
#: baseline of the ratios.
PAIRS = [("aiokvpipe", "prefill", "decode"), ("ExampleConnector", "ex_prefill", "ex_decode")]


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
) -> tuple[float, list[int], tuple[float, float]]:
    """Prefill, then time the decode request alone: arrival to first token.

    Also returns the decode request's wall-clock window (sent, first token),
    which picks its events out of the decode server's trace."""
    pre = await prefill.complete_plain(client, prompt, 1, {"do_remote_decode": True})
    sent = time.time()
    out = await decode.complete(client, prompt, NEW_TOKENS, pre.kv_transfer_params)
    return out.first_token_seconds, out.token_ids, (sent, sent + out.first_token_seconds)


async def demo(
    args: argparse.Namespace, servers: dict[str, VllmServer], traces: dict[str, Path]
) -> int:
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
                await compare(client, servers, prompts, traces, args.repeat)
    finally:
        await runner.cleanup()
    print(f"\n{len(prompts) - failures}/{len(prompts)} outputs identical to colocated")
    return 1 if failures else 0


#: The decode-side phases of the breakdown, in order: (name, from event, to event).
PHASES = (
    ("http+queue", "sent", "matched"),
    ("until scheduled", "matched", "scheduled"),
    ("  to worker", "matched", "issue"),
    ("  to loop thread", "issue", "pull_start"),
    ("  pull", "pull_start", "pull_end"),
    ("  pull->reported", "pull_end", "reported"),
    ("  reported->sched", "reported", "scheduled"),
    ("step", "scheduled", "step_out"),
    ("  load (in step)", "load_start", "load_end"),
    ("out+http", "step_out", "first"),
)


def breakdown(trace: Path, windows: list[tuple[float, float]]) -> dict[str, list[float]]:
    """Per phase, the milliseconds each request spent in it (from the server's trace).

    A request's events are those of the engine request whose ``matched``
    event falls in its window (requests are sent one at a time). Workers'
    events that name no request (``load_*``) are taken from the window."""
    import json

    events = [json.loads(line) for line in trace.read_text().splitlines() if line]
    out: dict[str, list[float]] = {name: [] for name, _, _ in PHASES}
    for sent, first in windows:
        inside = [e for e in events if sent <= e["t"] <= first]
        rid = next((e["req"] for e in inside if e["ev"] == "matched"), None)
        if rid is None:
            continue
        mine = [e for e in inside if e["req"] in (rid, "")]
        t: dict[str, float] = {"sent": sent, "first": first}
        for e in mine:
            if e["ev"] == "step_out":
                if "scheduled" in t and "step_out" not in t:
                    t["step_out"] = e["t"]
            else:
                t.setdefault(e["ev"], e["t"])
        for name, a, b in PHASES:
            if a in t and b in t:
                out[name].append(1000 * (t[b] - t[a]))
    return out


async def compare(
    client: httpx.AsyncClient,
    servers: dict[str, VllmServer],
    prompts: list[list[int]],
    traces: dict[str, Path] | None = None,
    repeat: int = 1,
) -> None:
    """Decode-side TTFT, aiokvpipe vs ExampleConnector, same prompts, interleaved.

    ``traces`` (decode server name -> its trace file) adds the breakdown of
    where each decode's time to first token goes."""
    pairs = [(name, servers[p], servers[d]) for name, p, d in PAIRS if d in servers]
    ttft: dict[str, list[float]] = {name: [] for name, _, _ in pairs}
    windows: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in pairs}
    server_side: dict[str, tuple[float, float]] = {}
    per_rep: list[dict[str, float]] = []
    # Prompts neither decode has seen (a local prefix-cache hit would skip the
    # transfer being measured); a short first pass warms every pair up.
    passes = [(98, False)] + [(99 + r, True) for r in range(repeat)]
    for seed, measured in passes:
        batch = make_prompts(4 if not measured else len(prompts), seed=seed)
        rep: dict[str, list[float]] = {name: [] for name, _, _ in pairs}
        for prompt in batch:
            outs = []
            for name, prefill, decode in pairs:
                seconds, got, window = await decode_ttft(client, prefill, decode, prompt)
                outs.append(got)
                if measured:
                    ttft[name].append(seconds)
                    rep[name].append(seconds)
                    windows[name].append(window)
            if any(o != outs[0] for o in outs):
                print(f"  note: outputs differ between the connectors for len {len(prompt)}")
        if not measured:
            for _, _, decode in pairs:
                server_side[decode.name] = await ttft_histogram(client, decode)
        else:
            per_rep.append({name: statistics.median(v) for name, v in rep.items()})
    for _, _, decode in pairs:
        total, count = await ttft_histogram(client, decode)
        total0, count0 = server_side[decode.name]
        server_side[decode.name] = (total - total0, count - count0)
    base = pairs[-1][0]
    print(f"\ndecode-side time to first token (ms), same {len(prompts)} prompts x {repeat}:")
    print(f"{'':>18} {'p50':>8} {'mean':>8} {'max':>8} {'vLLM mean':>10}")
    for name, _, decode in pairs:
        ms = [1000 * v for v in ttft[name]]
        total, count = server_side[decode.name]
        print(
            f"{name:>18} {statistics.median(ms):>8.1f} {statistics.fmean(ms):>8.1f} "
            f"{max(ms):>8.1f} {1000 * total / max(count, 1):>10.1f}"
        )
    for name, _, _ in pairs[:-1]:
        ratio = statistics.median(ttft[name]) / statistics.median(ttft[base])
        reps = ", ".join(f"{r[name] / r[base]:.2f}" for r in per_rep)
        print(f"ratio {name} / {base} (client-side p50): {ratio:.2f}x (per pass: {reps})")
    if traces:
        print(
            "\nwhere the time goes (ms, median / mean per phase; events from the decode servers):"
        )
        names = [name for name, _, d in pairs if d.name in traces]
        print(f"{'':>18} " + " ".join(f"{n[:16]:>16}" for n in names))
        split = {
            name: breakdown(traces[decode.name], windows[name])
            for name, _, decode in pairs
            if decode.name in traces
        }
        for phase, _, _ in PHASES:
            cells = []
            for name in names:
                values = split[name][phase]
                if values:
                    cells.append(
                        f"{statistics.median(values):>7.1f} /{statistics.fmean(values):>6.1f}"
                    )
                else:
                    cells.append(" " * 15)
            print(f"{phase:>18} " + " ".join(cells))


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
    parser.add_argument(
        "--previous",
        action="store_true",
        help="with --compare, also the connector's earlier settings: load_mode=async "
        "(pull before scheduling), pin_blocks=false (the prefill engine steps until read)",
    )
    parser.add_argument(
        "--trace", action="store_true", help="with --compare, break each decode's TTFT down"
    )
    parser.add_argument("--repeat", type=int, default=1, help="measured passes of --compare")
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="with --compare, also a decode with this kv_connector_extra_config setting",
    )
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
        specs["ex_decode"] = kv_transfer_config("example", storage=storage, traced=args.trace)
        for i, setting in enumerate(args.also):
            key, _, value = setting.partition("=")
            name = f"decode_also{i}"
            specs[name] = kv_transfer_config(failure_policy="recompute", **{key: json.loads(value)})
            PAIRS.insert(-1, (f"aiokvpipe {setting}", "prefill", name))
        if args.previous:
            specs["prefill_held"] = kv_transfer_config(pin_blocks=False)
            specs["decode_async"] = kv_transfer_config(
                failure_policy="recompute", load_mode="async"
            )
            PAIRS.insert(-1, ("aiokvpipe previous", "prefill_held", "decode_async"))
    traces = {
        name: work / f"trace-{name}.jsonl" for name in specs if args.trace and "decode" in name
    }
    started = time.perf_counter()
    servers = {
        name: VllmServer(
            name,
            model,
            cfg,
            log_dir=work,
            env={TRACE_ENV: str(traces[name])} if name in traces else None,
        )
        for name, cfg in specs.items()
    }
    try:
        for server in servers.values():
            server.wait_ready()
        print(
            f"{len(servers)} vLLM servers up in {time.perf_counter() - started:.0f}s (logs: {work})"
        )
        return asyncio.run(demo(args, servers, traces))
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
