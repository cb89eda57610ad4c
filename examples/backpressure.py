"""Backpressure: a fast producer, a slow consumer, and a small send window.

Run it with ``python examples/backpressure.py``. This process is the
producer (rank 0); it starts the consumer (rank 1) as a child process.

The producer sends 512 KiB tensors as fast as ``send`` lets it, through a
Pipe whose ``buffer_bytes`` (the send window) is only 4 MiB, and once a
6 MiB tensor — bigger than the whole window. The consumer takes one tensor
every 20 ms. Every 100 ms the producer prints how full its window is:

* the bytes accepted but not yet sent never exceed the window, except for
  the one oversize tensor, which is let through alone once the window is
  empty (otherwise it could never be sent);
* while ``send`` waits for room the producer sleeps in the event loop instead
  of polling: its CPU time over the blocked wall time stays near zero.

Exit status is 0 only if both hold and every tensor arrived intact.
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

from aiokvpipe import AiokvpipeError, Pipe, PipeConfig, free_port

KiB, MiB = 1 << 10, 1 << 20
WINDOW = 4 * MiB  # the producer's buffer_bytes
CHUNK = 512 * KiB
OVERSIZE = 6 * MiB
COUNT = 64  # regular tensors; the oversize one goes after the first half
CONSUMER_PAUSE = 0.020  # seconds per tensor: the slow consumer
SAMPLE_EVERY = 0.100
BLOCKED = 0.005  # a send that took longer than this waited for room
MAX_BLOCKED_CPU = 0.5  # fraction of a core; a polling sender would sit near 1.0
TIMEOUT = 60.0


def sizes() -> list[int]:
    half = COUNT // 2
    return [CHUNK] * half + [OVERSIZE] + [CHUNK] * (COUNT - half)


def make(index: int, nbytes: int) -> torch.Tensor:
    return torch.full((nbytes,), index % 251, dtype=torch.uint8)


# ----------------------------------------------------------------- the consumer (child)


async def consume(port: int) -> None:
    # A small receive buffer too, so the producer feels the slow reader soon.
    cfg = PipeConfig(rank=1, port=port, buffer_bytes=1 * MiB, connect_timeout=TIMEOUT)
    async with await Pipe.connect(cfg) as pipe:
        total = 0
        for index, nbytes in enumerate(sizes()):
            tensor = await pipe.recv(timeout=TIMEOUT)
            if tensor is None or not tensor.equal(make(index, nbytes)):
                raise RuntimeError(f"tensor {index} arrived damaged")
            total += nbytes
            await asyncio.sleep(CONSUMER_PAUSE)
        await pipe.send(None)  # tell the producer everything arrived
        await pipe.flush()
        print(f"[consumer] received {len(sizes())} tensors ({total / MiB:.1f} MiB) intact")


# ----------------------------------------------------------------- the producer (parent)


def bar(pending: int) -> str:
    width = 32
    filled = min(width, round(width * pending / WINDOW))
    over = " + oversize" if pending > WINDOW else ""
    return "[" + "#" * filled + "." * (width - filled) + "]" + over


async def produce(port: int) -> bool:
    cfg = PipeConfig(rank=0, port=port, buffer_bytes=WINDOW, connect_timeout=TIMEOUT)
    async with await Pipe.connect(cfg) as pipe:
        start = time.perf_counter()
        violations: list[str] = []
        peak = 0

        def check(where: str) -> None:
            nonlocal peak
            pending = pipe.pending_bytes
            peak = max(peak, pending)
            if pending > WINDOW and pending != OVERSIZE:
                violations.append(f"{where}: {pending} bytes pending over a {WINDOW} window")

        async def sampler() -> None:
            while True:
                check("sample")
                pending = pipe.pending_bytes
                print(
                    f"{time.perf_counter() - start:6.2f} s  {bar(pending)} "
                    f"{pending / MiB:5.2f} / {WINDOW / MiB:.2f} MiB",
                    flush=True,
                )
                await asyncio.sleep(SAMPLE_EVERY)

        blocked_wall = blocked_cpu = 0.0
        sampling = asyncio.ensure_future(sampler())
        try:
            for index, nbytes in enumerate(sizes()):
                tensor = make(index, nbytes)
                wall0, cpu0 = time.perf_counter(), time.process_time()
                await pipe.send(tensor, timeout=TIMEOUT)
                waited = time.perf_counter() - wall0
                if waited > BLOCKED:
                    blocked_wall += waited
                    blocked_cpu += time.process_time() - cpu0
                if nbytes == OVERSIZE and pipe.pending_bytes != OVERSIZE:
                    violations.append("the oversize tensor was accepted into a non-empty window")
                check(f"after send {index}")
        finally:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
        print(
            f"{time.perf_counter() - start:6.2f} s  all {len(sizes())} tensors accepted; the "
            f"rest drains from the socket buffers at the consumer's pace",
            flush=True,
        )
        await pipe.flush(timeout=TIMEOUT)
        ack = await pipe.recv(timeout=TIMEOUT)
        elapsed = time.perf_counter() - start
        share = blocked_cpu / blocked_wall if blocked_wall else 0.0
        print(
            f"sent {len(sizes())} tensors ({sum(sizes()) / MiB:.1f} MiB) in {elapsed:.2f} s; "
            f"peak {peak / MiB:.2f} MiB pending with a {WINDOW / MiB:.2f} MiB window "
            f"(the {OVERSIZE / MiB:.2f} MiB tensor went through alone)"
        )
        print(
            f"producer blocked in send for {blocked_wall:.2f} s of wall time, "
            f"using {blocked_cpu * 1e3:.1f} ms of CPU ({share:.1%} of a core)"
        )
        for violation in violations:
            print(f"VIOLATION: {violation}")
        if ack is not None:
            violations.append("the consumer did not acknowledge")
        if blocked_wall == 0.0:
            violations.append("send never waited: the window did not fill")
        if share > MAX_BLOCKED_CPU:
            violations.append(f"the producer burned {share:.0%} of a core while blocked")
        return not violations


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    parser.add_argument("--consumer-port", type=int, help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    loop_name, run = runner(args.loop)
    if args.consumer_port is not None:
        try:
            run(consume(args.consumer_port))
        except (AiokvpipeError, RuntimeError) as exc:
            print(f"[consumer] FAILED: {type(exc).__name__}: {exc}", flush=True)
            return 1
        return 0

    print(
        f"event loop: {loop_name}; window {WINDOW / MiB:.0f} MiB, {CHUNK // KiB} KiB tensors "
        f"and one {OVERSIZE / MiB:.0f} MiB tensor, consumer takes one per "
        f"{CONSUMER_PAUSE * 1e3:.0f} ms",
        flush=True,
    )
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, __file__, "--loop", loop_name, "--consumer-port", str(port)]
    )
    ok = False
    try:
        ok = run(produce(port))
    except AiokvpipeError as exc:
        print(f"FAILED: {type(exc).__name__}: {exc}")
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=TIMEOUT)
        if child.poll() is None:
            child.kill()
            child.wait()
    if not ok or child.returncode != 0:
        print(f"FAILED: producer ok={ok}, consumer exit status {child.returncode}")
        return 1
    print("OK: the window held, the producer waited without spinning, every tensor arrived")
    return 0


if __name__ == "__main__":
    sys.exit(main())
