"""Disaggregated prefill/decode: a prefill process hands KV caches to a decode process.

Run it with ``python examples/disagg_prefill_decode.py`` (CPU is enough).
This process is the *decode* side; it starts the *prefill* side as a child
process, on 127.0.0.1 and two free ports (signal and data pipe).

* Prefill "computes" each request's KV cache (deterministic fp16 tensors
  derived from the request, standing in for a model's forward pass), and
  ``insert`` s it into its :class:`~aiokvpipe.KVLookupBuffer`, keyed by the
  prompt's token ids. Requests finish prefill one after another.
* Decode serves all requests at once (one task each). Each task
  ``drop_select`` s its prompt: five ``None`` s mean prefill is not done yet
  (a real server could also recompute instead), so it tries again shortly.
  Once its KV arrives, it checks every byte against what prefill must have
  produced and reports the fetch latency.
* Prefill waits until decode took everything (``wait_drained``), then both
  close.

Exit status is 0 only if every request's KV arrived bit-exact and both
processes finished cleanly. Only the public API is used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import torch

from aiokvpipe import AiokvpipeError, KVLookupBuffer, free_port

LAYERS, HEADS, HEAD_DIM, HIDDEN = 4, 8, 64, 512
PROMPT_LENGTHS = (24, 96, 57, 128, 16, 75, 110, 40)  # tokens per request
PREFILL_SECONDS_PER_TOKEN = 0.0003  # stands in for the forward pass
RETRY_SECONDS = 0.005  # decode's pause between attempts while prefill works
TIMEOUT = 30.0  # no step of the example comes near this
MiB = 1 << 20


def prompt(request: int) -> torch.Tensor:
    """Token ids of request ``request`` (distinct per request)."""
    gen = torch.Generator().manual_seed(1000 + request)
    return torch.randint(0, 32000, (PROMPT_LENGTHS[request],), generator=gen)


def kv_cache(request: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The key, value and hidden states prefill produces for ``request``.

    Decode recomputes them to check what it received, byte for byte.
    """
    n = PROMPT_LENGTHS[request]
    gen = torch.Generator().manual_seed(request)
    key = torch.randn(LAYERS, n, HEADS, HEAD_DIM, generator=gen).half()
    value = torch.randn(LAYERS, n, HEADS, HEAD_DIM, generator=gen).half()
    hidden = torch.randn(n, HIDDEN, generator=gen).half()
    return key, value, hidden


def same_bytes(got: torch.Tensor | None, want: torch.Tensor) -> bool:
    return (
        got is not None
        and got.dtype == want.dtype
        and got.shape == want.shape
        and got.view(torch.uint8).equal(want.view(torch.uint8))
    )


# ----------------------------------------------------------------- prefill (child)


async def prefill(port: int) -> None:
    async with await KVLookupBuffer.connect(
        "producer", port=port, buffer_bytes=64 * MiB, connect_timeout=TIMEOUT
    ) as buf:
        for request in range(len(PROMPT_LENGTHS)):
            tokens = prompt(request)
            await asyncio.sleep(PREFILL_SECONDS_PER_TOKEN * len(tokens))  # "forward pass"
            key, value, hidden = kv_cache(request)
            roi = torch.ones_like(tokens, dtype=torch.bool)
            await buf.insert(tokens, roi, key, value, hidden, timeout=TIMEOUT)
            print(
                f"[prefill] request {request}: {len(tokens)} tokens, "
                f"{buf.buffered_bytes / MiB:.2f} MiB buffered",
                flush=True,
            )
        await buf.wait_drained(timeout=TIMEOUT)
        print(f"[prefill] all {buf.stats.served_hits} KV caches taken by decode", flush=True)


# ----------------------------------------------------------------- decode (parent)


async def fetch(buf: KVLookupBuffer, request: int) -> tuple[float, float, int, bool]:
    """Fetch one request's KV: (fetch seconds, total wait seconds, misses, intact)."""
    tokens = prompt(request)
    roi = torch.ones_like(tokens, dtype=torch.bool)
    start = time.perf_counter()
    misses = 0
    while True:
        t0 = time.perf_counter()
        got = await buf.drop_select(tokens, roi, timeout=TIMEOUT)
        fetched = time.perf_counter() - t0
        if got[0] is not None:
            break
        misses += 1
        if time.perf_counter() - start > TIMEOUT:
            raise TimeoutError(f"request {request}: prefill never produced its KV")
        await asyncio.sleep(RETRY_SECONDS)  # prefill has not finished this one yet
    key, value, hidden = kv_cache(request)
    intact = (
        got[0].equal(tokens)
        and same_bytes(got[1], roi)
        and same_bytes(got[2], key)
        and same_bytes(got[3], value)
        and same_bytes(got[4], hidden)
    )
    return fetched, time.perf_counter() - start, misses, intact


async def decode(port: int) -> bool:
    async with await KVLookupBuffer.connect("consumer", port=port, connect_timeout=TIMEOUT) as buf:
        results = await asyncio.gather(
            *(fetch(buf, request) for request in range(len(PROMPT_LENGTHS)))
        )
        print("request  tokens  KV MiB  fetch ms  waited ms  misses  bytes")
        for request, (fetched, waited, misses, intact) in enumerate(results):
            n = PROMPT_LENGTHS[request]
            size = sum(t.numel() * t.element_size() for t in kv_cache(request)) / MiB
            print(
                f"{request:>7}  {n:>6}  {size:>6.2f}  {fetched * 1e3:>8.2f}  "
                f"{waited * 1e3:>9.1f}  {misses:>6}  {'ok' if intact else 'CORRUPT'}"
            )
        fetches = sorted(r[0] for r in results)
        p50, worst = fetches[len(fetches) // 2], fetches[-1]
        print(
            f"fetch latency over {len(fetches)} requests: "
            f"p50 {p50 * 1e3:.2f} ms, max {worst * 1e3:.2f} ms"
        )
        return all(r[3] for r in results)


# ----------------------------------------------------------------- plumbing


def runner(loop: str) -> tuple[str, Callable[[Coroutine[Any, Any, Any]], Any]]:
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise
        else:
            return "uvloop", uvloop.run
    return "asyncio", asyncio.run


def main() -> int:
    # The KV tensors are made on the CPU only to stand in for a GPU forward
    # pass; torch's CPU worker threads would spin after each op and take the
    # cores that the two event loops need to move data.
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    parser.add_argument("--prefill-port", type=int, help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    loop_name, run = runner(args.loop)
    if args.prefill_port is not None:
        try:
            run(prefill(args.prefill_port))
        except AiokvpipeError as exc:
            print(f"[prefill] FAILED: {type(exc).__name__}: {exc}", flush=True)
            return 1
        return 0

    print(f"event loop: {loop_name}; {len(PROMPT_LENGTHS)} requests", flush=True)
    port = free_port(count=2)  # the signal and data pipes
    child = subprocess.Popen(
        [sys.executable, __file__, "--loop", loop_name, "--prefill-port", str(port)]
    )
    ok = False
    try:
        ok = run(decode(port))
    except (AiokvpipeError, TimeoutError) as exc:
        print(f"FAILED: {type(exc).__name__}: {exc}")
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=TIMEOUT)
        if child.poll() is None:
            child.kill()
            child.wait()
    if not ok or child.returncode != 0:
        print(f"FAILED: decode ok={ok}, prefill exit status {child.returncode}")
        return 1
    print(f"OK: all {len(PROMPT_LENGTHS)} KV caches arrived bit-exact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
