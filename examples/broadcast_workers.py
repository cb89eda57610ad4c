"""One scheduler broadcasting to worker processes over the shared-memory ring.

Run it with ``python examples/broadcast_workers.py [--workers N]``. The
scheduler (this process, group rank 0) spawns N workers. All of them form a
``torch.distributed`` gloo group, and
``ShmRingBufferIO.create_from_process_group`` builds one ring over it: the
scheduler writes, every worker reads (the handle travels over the group in a
helper thread, so no event loop blocks).

For each step the scheduler broadcasts a small batch (request ids plus a
tensor of token ids). Each worker computes its share (a checksum of its
slice) and answers over its own Pipe to the scheduler. The scheduler checks
every answer and prints the broadcast-to-all-answers latency per step.

Exit status is 0 only if every answer matched.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import time
from typing import Any

import torch

from aiokvpipe import free_port

STEPS = 20
TOKENS = 4096


def run_loop(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def expected_answer(batch: torch.Tensor, worker: int, workers: int) -> int:
    """Worker ``worker`` (1-based) sums its strided share of the tokens."""
    return int(batch[worker - 1 :: workers].sum())


async def group_ring(rank: int, world: int, group_port: int) -> Any:
    import torch.distributed as dist

    from aiokvpipe.shm import ShmRingBufferIO

    await asyncio.to_thread(
        dist.init_process_group,
        "gloo",
        init_method=f"tcp://127.0.0.1:{group_port}",
        rank=rank,
        world_size=world,
    )
    return await ShmRingBufferIO.create_from_process_group(
        dist.group.WORLD, max_chunk_bytes=1 << 20, max_chunks=8, writer_rank=0
    )


def worker_main(rank: int, world: int, group_port: int, pipe_port: int) -> None:
    from aiokvpipe import Pipe, PipeConfig

    async def main() -> None:
        import torch.distributed as dist

        ring = await group_ring(rank, world, group_port)
        async with ring, await Pipe.connect(PipeConfig(rank=1, port=pipe_port)) as pipe:
            while True:
                message = await ring.dequeue(timeout=30)
                if message is None:  # the scheduler's "stop"
                    break
                step, batch = message["step"], message["tokens"]
                answer = expected_answer(batch, rank, world - 1)
                await pipe.send(torch.tensor([step, rank, answer], dtype=torch.int64))
            await pipe.flush()
        dist.destroy_process_group()

    run_loop(main())


async def scheduler(workers: int, group_port: int, pipe_ports: list[int]) -> int:
    import torch.distributed as dist

    from aiokvpipe import Pipe, PipeConfig

    world = workers + 1
    ring, pipes = await asyncio.gather(
        group_ring(0, world, group_port),
        asyncio.gather(*(Pipe.connect(PipeConfig(rank=0, port=p)) for p in pipe_ports)),
    )
    failures, latencies = 0, []
    generator = torch.Generator().manual_seed(0)
    try:
        print(f"scheduler: ring {ring.buffer.name!r} with {workers} readers, {STEPS} steps")
        for step in range(STEPS):
            batch = torch.randint(0, 50_000, (TOKENS,), generator=generator)
            started = time.perf_counter()
            await ring.broadcast_object({"step": step, "tokens": batch})
            answers = await asyncio.gather(*(p.recv(timeout=30) for p in pipes))
            latencies.append(time.perf_counter() - started)
            for answer in answers:
                got_step, worker, value = (int(v) for v in answer)
                want = expected_answer(batch, worker, workers)
                if got_step != step or value != want:
                    failures += 1
                    print(f"  step {step}: worker {worker} answered {value}, expected {want}")
        await ring.broadcast_object(None)
        ms = sorted(x * 1e3 for x in latencies)
        print(
            f"broadcast -> {workers} answers: p50 {statistics.median(ms):.2f} ms, "
            f"max {ms[-1]:.2f} ms over {STEPS} steps"
        )
    finally:
        for pipe in pipes:
            await pipe.aclose()
        ring.close()
        dist.destroy_process_group()
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    group_port = free_port()
    pipe_ports = [free_port() for _ in range(args.workers)]
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=worker_main, args=(r, args.workers + 1, group_port, pipe_ports[r - 1]))
        for r in range(1, args.workers + 1)
    ]
    for p in procs:
        p.start()
    try:
        failures = run_loop(scheduler(args.workers, group_port, pipe_ports))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    bad_exit = [p.exitcode for p in procs if p.exitcode != 0]
    if failures or bad_exit:
        print(f"FAILED: {failures} wrong answers, worker exit codes {bad_exit}")
        return 1
    print(f"OK: every worker answered every step correctly ({args.workers} workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
