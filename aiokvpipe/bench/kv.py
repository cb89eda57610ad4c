"""``python -m aiokvpipe.bench kv``: KVLookupBuffer.drop_select latency.

Two fresh processes (spawn) per event loop: rank 0 is the producer
(prefill), rank 1 the consumer (decode). The entry has a realistic size for one request of a
small model: key and value of 2 layers x 32 tokens x 8 heads x 128 dims in
fp16 (128 KiB each), hidden states of 32 x 1024 fp16 (64 KiB), the token ids
and their mask — 320 KiB in five tensors.

Baseline, in the same processes and interleaved request by request (so a
noisy, shared machine slows both alike): a bare :class:`Pipe` round trip of
the same bytes — the consumer sends the token ids, the producer answers with
the same five tensors on one connection. The difference is what the buffer
costs on top of the transport: the control messages, the lookup, a second
pipe, and the hops through the background tasks on each side.

A miss (tokens never inserted) is measured against the bare round trip of
the token ids alone, answered by one ``None``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import torch

from ..ports import free_port
from .procs import percentile, report, run_loop, run_pair
from .report import Progress, Result

LAYERS, TOKENS, HEADS, HEAD_DIM, HIDDEN = 2, 32, 8, 128, 1024
WARMUP = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--requests",
        type=int,
        default=0,
        help="drop_selects measured per case (default: 2000, 300 with --quick)",
    )


def make_entry(
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens, roi, key, value, hidden of one request (fp16 KV)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 32000, (TOKENS,), generator=gen)
    roi = torch.ones(TOKENS, dtype=torch.bool)
    shape = (LAYERS, TOKENS, HEADS, HEAD_DIM)
    key = torch.randn(shape, generator=gen).half()
    value = torch.randn(shape, generator=gen).half()
    hidden = torch.randn(TOKENS, HIDDEN, generator=gen).half()
    return tokens, roi, key, value, hidden


def entry_nbytes() -> int:
    return sum(t.numel() * t.element_size() for t in make_entry(0))


# ----------------------------------------------------------------- process plumbing


# ----------------------------------------------------------------- the worker


def _worker(rank: int, queue: Any, port: int, count: int, loop_name: str) -> None:
    """Both ranks: a KVLookupBuffer on ``port``/``port + 1``, a bare Pipe on ``port + 2``."""
    from ..config import PipeConfig
    from ..kv_buffer import KVLookupBuffer, Role
    from ..pipe import Pipe

    # torch's intra-op worker threads spin for a while after every parallel
    # op (here: the check of each answer), stealing the cores both event loops
    # need; measured, that doubled the hit latency on a 2-core machine. The
    # transfers themselves use no torch parallelism.
    torch.set_num_threads(1)

    async def main() -> dict[str, Any]:
        role: Role = "producer" if rank == 0 else "consumer"
        total = WARMUP + count
        buf, pipe = await asyncio.gather(
            KVLookupBuffer.connect(role, port=port, buffer_bytes=1 << 40, connect_timeout=60),
            Pipe.connect(PipeConfig(rank=rank, port=port + 2, connect_timeout=60)),
        )
        async with buf, pipe:
            entry = make_entry(0)
            tokens, roi, key, value, hidden = entry
            if rank == 0:
                # Entries share their KV tensors (the buffer keeps references),
                # so thousands of them cost no memory; only the tokens differ.
                for i in range(total):
                    await buf.insert(tokens + i * 32000, roi, key, value, hidden)
                await pipe.send(None)  # ready
                # The bare-pipe side of the baseline; the buffer serves by itself.
                for _ in range(total):
                    await pipe.recv()
                    for tensor in entry:
                        await pipe.send(tensor)
                    await pipe.recv()
                    await pipe.send(None)
                await pipe.recv()  # the consumer is done: both may close
                return {}
            await pipe.recv()
            samples: dict[str, list[float]] = {"hit": [], "miss": [], "full": [], "small": []}
            for i in range(total):
                t0 = time.perf_counter()
                got = await buf.drop_select(tokens + i * 32000, roi)
                t1 = time.perf_counter()
                await buf.drop_select(tokens - 1)  # never inserted
                t2 = time.perf_counter()
                await pipe.send(tokens)
                for _ in entry:
                    await pipe.recv()
                t3 = time.perf_counter()
                await pipe.send(tokens)
                await pipe.recv()
                t4 = time.perf_counter()
                if got[2] is None or not got[2].equal(key):
                    raise RuntimeError(f"request {i}: wrong or missing KV")
                if i >= WARMUP:
                    samples["hit"].append(t1 - t0)
                    samples["miss"].append(t2 - t1)
                    samples["full"].append(t3 - t2)
                    samples["small"].append(t4 - t3)
            await pipe.send(None)
            await pipe.flush()
            return samples

    report(queue, lambda: run_loop(loop_name, main))


# ----------------------------------------------------------------- the suite


def run(args: argparse.Namespace) -> list[Result]:
    count = int(getattr(args, "requests", 0)) or (300 if args.quick else 2000)
    loops = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
    size_kib = entry_nbytes() / 1024
    progress = Progress(len(loops), "kv")
    results: list[Result] = []
    for loop_name in loops:
        got = run_pair(_worker, free_port(count=3), count, loop_name)
        progress.step(f"drop_select {loop_name}")
        extra = {"loop": loop_name, "entry_bytes": entry_nbytes(), "requests": count}
        hit50, base50 = percentile(got["hit"], 0.5), percentile(got["full"], 0.5)
        same = f"bare Pipe round trip of the same bytes ({loop_name})"
        results += [
            Result(
                "kv",
                f"drop_select hit p50, {size_kib:.0f} KiB entry ({loop_name})",
                hit50 * 1e6,
                "us",
                same,
                base50 * 1e6,
                "<= 2x bare pipe",
                hit50 <= 2 * base50,
                extra,
            ),
            Result(
                "kv",
                f"drop_select hit p99, {size_kib:.0f} KiB entry ({loop_name})",
                percentile(got["hit"], 0.99) * 1e6,
                "us",
                same,
                percentile(got["full"], 0.99) * 1e6,
                extra=extra,
            ),
            Result(
                "kv",
                f"drop_select miss p50 ({loop_name})",
                percentile(got["miss"], 0.5) * 1e6,
                "us",
                f"bare Pipe round trip, tokens -> None ({loop_name})",
                percentile(got["small"], 0.5) * 1e6,
                extra=extra,
            ),
        ]
    return results
