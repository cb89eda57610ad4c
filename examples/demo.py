"""Two processes, one Pipe: stream tensors from rank 0 to rank 1, then ping-pong.

Run it with ``python -m nox -s demo`` (or ``python examples/demo.py`` where
aiokvpipe is installed). This process is rank 0; it starts rank 1 as a child
process on 127.0.0.1 and a free port, with a fresh random token.

1. Rank 0 sends groups of distinct tensors (4 KiB, 1 MiB, 16 MiB and 64 MiB,
   several dtypes each, 16-192 MiB a group) and then a ``None``. Rank 1
   acknowledges each group once it holds every tensor, then checks every
   byte against the same deterministic pattern and reports the verdict.
   Every group goes four times in a row: a warm-up pass (fresh processes
   first touch their memory and code, which on a VM runs many times slower;
   rank 1's receive blocks are then reused warm), then three timed passes.
   Rank 0 prints a table of the median timed pass and the range of the
   three: bytes over the time from its first ``send`` to rank 1's "all
   here"; checking the bytes happens after the clock stopped. (One pass of
   the 64 MiB group is three messages; a single pass swung 3-9 GB/s between
   runs on the 2-vCPU VMs, so one pass alone told a user little.) A group
   is long (at least 16 MiB, ~100 messages for the 1 MiB one) so that waking
   two idle processes, a millisecond or two on a VM, is not what the figure
   shows.
2. 4 KiB round trips: rank 0 sends, rank 1 (whose ``send`` goes to rank 0 in
   a world of two) echoes back, back to back, after 100 untimed ones; rank 0
   prints p50/p99 latency and checks every echo after the timed loop.

Compare the table with the "distinct tensors held" rows of ``python -m
aiokvpipe.bench pipe``, which stream the same kind of traffic (distinct
tensors, kept by the receiver) for longer and take the best of two runs.
Its plain throughput rows send one tensor over and over to a receiver that
drops each, so everything stays in the CPU cache: expect those higher.

Exit status is 0 only if every tensor arrived intact, in order, and rank 1
exited cleanly. Only the public API is used.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import torch

from aiokvpipe import AiokvpipeError, Pipe, PipeConfig, free_port

KiB = 1 << 10
MiB = 1 << 20
TOKEN_ENV = "AIOKVPIPE_DEMO_TOKEN"
PATTERN_PERIOD = 4099  # prime, so it never lines up with an element size or row
TIMEOUT = 60.0  # no single step of the demo should come near this
WARMUP_PASSES = 1  # every group goes once to warm up...
TIMED_PASSES = 3  # ...then three times timed; the table shows the median and the range
PASSES = WARMUP_PASSES + TIMED_PASSES


@dataclass(frozen=True)
class Group:
    nbytes: int
    count: int
    dtypes: tuple[torch.dtype, ...]

    @property
    def label(self) -> str:
        return f"{self.nbytes // MiB} MiB" if self.nbytes >= MiB else f"{self.nbytes // KiB} KiB"


# Rank 1 holds a whole group until it is verified. A receiver reuses the blocks
# of tensors it has dropped (up to 256 MiB of them); a block it must allocate
# afresh is first-touch memory, which on a VM faults in at ~0.5 GB/s. So each
# group stays under 256 MiB: after its warm-up pass every tensor of its timed
# pass lands in a warm block, as in a steady stream.
GROUPS = (
    Group(4 * KiB, 4096, (torch.float32, torch.int64, torch.uint8, torch.bool)),
    Group(1 * MiB, 96, (torch.float16, torch.bfloat16, torch.int32)),
    Group(16 * MiB, 12, (torch.float32, torch.bfloat16)),
    Group(64 * MiB, 3, (torch.float32, torch.int8, torch.float16)),
)
assert all(g.nbytes * g.count <= 256 * MiB for g in GROUPS)
PING_BYTES = 4 * KiB


def expected_tensor(group: int, index: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """The tensor rank 0 sends as message ``index`` of ``group``; rank 1 rebuilds it to compare.

    A byte pattern shifted per message, so a dropped, reordered or corrupted
    message shows. Built as bytes and viewed as ``dtype`` (so floats may hold
    NaN bit patterns: compare bytes, not values). Shaped 2-D to carry a shape.
    """
    seed = group * 1000 + index
    period = (torch.arange(PATTERN_PERIOD, dtype=torch.int32) * 31 + seed) % 251
    if dtype == torch.bool:
        period &= 1  # only 0 and 1 are valid bools
    pattern = period.to(torch.uint8)
    data = pattern.repeat(nbytes // PATTERN_PERIOD + 1)[:nbytes]
    itemsize = torch.empty((), dtype=dtype).element_size()
    cols = 256 if nbytes >= 256 * itemsize else 1
    return data.view(dtype).reshape(-1, cols)


def same_bytes(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (
        got.dtype == want.dtype
        and got.shape == want.shape
        and torch.equal(got.contiguous().view(torch.uint8), want.view(torch.uint8))
    )


def messages(group_no: int) -> list[tuple[int, torch.dtype]]:
    group = GROUPS[group_no]
    return [(i, group.dtypes[i % len(group.dtypes)]) for i in range(group.count)]


def counter(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64)


# ----------------------------------------------------------------------------- rank 1


async def rank1(cfg: PipeConfig, pings: int) -> int:
    """Receive, acknowledge, verify, report; then echo ``pings`` messages back."""
    async with await Pipe.connect(cfg) as pipe:
        bad = 0
        for group_no, group in [(no, g) for no, g in enumerate(GROUPS) for _ in range(PASSES)]:
            received = [await pipe.recv() for _ in range(group.count)]
            await pipe.send(counter(len(received)))  # "all here": stops rank 0's clock
            group_bad = 0
            for (index, dtype), got in zip(messages(group_no), received, strict=True):
                want = expected_tensor(group_no, index, group.nbytes, dtype)
                if got is None or not same_bytes(got, want):
                    group_bad += 1
                    print(f"rank 1: {group.label} #{index} ({dtype}) is wrong", file=sys.stderr)
            bad += group_bad
            del received, got  # its blocks go back to the pool before the next group
            await pipe.send(counter(group_bad))  # verdict for this group
        last = await pipe.recv()
        if last is not None:
            print(f"rank 1: expected None after the stream, got {last!r}", file=sys.stderr)
            bad += 1
        await pipe.send(counter(bad))
        for _ in range(pings):
            await pipe.send(await pipe.recv())
    return 1 if bad else 0


# ----------------------------------------------------------------------------- rank 0


@dataclass
class Row:
    group: Group
    seconds: float
    bad: int

    @property
    def mb_per_s(self) -> float:
        return self.group.nbytes * self.group.count / self.seconds / 1e6


@dataclass
class Summary:
    """A group's timed passes: the median shown, the range beside it; every
    pass's wrong messages counted."""

    passes: list[Row]

    @property
    def group(self) -> Group:
        return self.passes[0].group

    @property
    def bad(self) -> int:
        return sum(row.bad for row in self.passes)

    @property
    def mb_per_s(self) -> float:
        return statistics.median(row.mb_per_s for row in self.passes)

    @property
    def spread(self) -> str:
        rates = [row.mb_per_s for row in self.passes]
        return f"{min(rates):.0f}-{max(rates):.0f}"


async def rank0(cfg: PipeConfig, pings: int, warmup: int) -> int:
    async with await Pipe.connect(cfg) as pipe:
        print(f"connected: {pipe!r}")
        rows: list[Summary] = []
        for no, group in enumerate(GROUPS):
            tensors = [expected_tensor(no, i, group.nbytes, d) for i, d in messages(no)]
            passes = [await send_group(pipe, group, tensors) for _ in range(PASSES)]
            warmup_bad = sum(row.bad for row in passes[:WARMUP_PASSES])
            summary = Summary(passes[WARMUP_PASSES:])  # rank 1 verifies every pass
            summary.passes[0].bad += warmup_bad
            rows.append(summary)
            del tensors
        await pipe.send(None)
        total_bad = await pipe.recv()
        assert total_bad is not None
        print_table(rows, pipe.send_transport)

        ping = expected_tensor(99, 0, PING_BYTES, torch.uint8)
        samples, echoes = [], []
        for _ in range(warmup + pings):
            start = time.perf_counter()
            await pipe.send(ping)
            echo = await pipe.recv()
            samples.append(time.perf_counter() - start)
            echoes.append(echo)
        # checked after the timed loop, so the check does not disturb it
        for i, echo in enumerate(echoes):
            if echo is None or not same_bytes(echo, ping):
                raise RuntimeError(f"ping {i}: the echo differs from what was sent")
        samples = sorted(samples[warmup:])
        p50 = statistics.median(samples) * 1e6
        p99 = samples[min(len(samples) - 1, round(0.99 * len(samples)))] * 1e6
        print(
            f"\n4 KiB round trip over {len(samples)} pings: p50 {p50:.0f} us, p99 {p99:.0f} us "
            f"(after {warmup} warm-up pings; send + recv back to back, rank 1 echoes each "
            "one, processes unpinned; echoes checked after timing)"
        )
    bad = int(total_bad.item())
    if bad:
        print(f"\nFAILED: rank 1 found {bad} wrong message(s)", file=sys.stderr)
        return 1
    return 0


async def send_group(pipe: Pipe, group: Group, tensors: list[torch.Tensor]) -> Row:
    """One group, timed from the first send to rank 1's "all here"; then its verdict."""
    start = time.perf_counter()
    for tensor in tensors:
        await pipe.send(tensor)
    ack = await pipe.recv()
    seconds = time.perf_counter() - start
    verdict = await pipe.recv()
    assert ack is not None and verdict is not None
    if int(ack.item()) != group.count:
        raise RuntimeError(f"rank 1 acknowledged {int(ack.item())} of {group.count}")
    return Row(group, seconds, int(verdict.item()))


def print_table(rows: list[Summary], transport: str) -> None:
    print(
        f"\ntransport {transport}; MB/s, median and range of {TIMED_PASSES} timed passes (after "
        "a warm-up pass of the same tensors), each from rank 0's first send to rank 1 "
        "holding them all"
    )
    header = f"{'size':>8}  {'count':>5}  {'dtypes':<34}  {'MB/s':>9}  {'range':>11}  verified"
    print(f"\n{header}\n{'-' * len(header)}")
    for row in rows:
        dtypes = ",".join(str(d).removeprefix("torch.") for d in row.group.dtypes)
        verdict = "ok" if row.bad == 0 else f"{row.bad} WRONG"
        print(
            f"{row.group.label:>8}  {row.group.count:>5}  {dtypes:<34}  "
            f"{row.mb_per_s:>9.1f}  {row.spread:>11}  {verdict}"
        )
    print("(+ one None message)")


# ----------------------------------------------------------------------------- plumbing


def pick_loop(name: str) -> tuple[str, Callable[[Coroutine[Any, Any, int]], int]]:
    """The event loop to run on: uvloop when importable (the loop servers use)."""
    if name in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if name == "uvloop":
                raise
        else:
            return f"uvloop {getattr(uvloop, '__version__', '')}".rstrip(), uvloop.run
    return "asyncio (default loop)", asyncio.run


def stop(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    parser.add_argument("--pings", type=int, default=1000, help="timed 4 KiB round trips")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warmup = 100
    loop_name, run = pick_loop(args.loop)

    if args.rank == 1:
        cfg = PipeConfig(
            rank=1,
            world_size=2,
            host=args.host,
            port=args.port,
            token=os.environ[TOKEN_ENV],
            connect_timeout=TIMEOUT,
            op_timeout=TIMEOUT,
        )
        return run(rank1(cfg, warmup + args.pings))

    # The token travels in the environment, not argv, so `ps` does not show it.
    token = secrets.token_hex(16)
    port = free_port(args.host)
    print(
        f"aiokvpipe demo: rank 0 (pid {os.getpid()}) <-> rank 1 (child), "
        f"rendezvous on {args.host}:{port}, token required, event loop: {loop_name}"
    )
    cfg = PipeConfig(
        rank=0,
        world_size=2,
        host=args.host,
        port=port,
        token=token,
        connect_timeout=TIMEOUT,
        op_timeout=TIMEOUT,
    )
    child_args = [
        sys.executable,
        os.path.abspath(__file__),
        "--rank",
        "1",
        "--port",
        str(port),
        "--host",
        args.host,
        "--loop",
        args.loop,
        "--pings",
        str(args.pings),
    ]
    child = subprocess.Popen(child_args, env={**os.environ, TOKEN_ENV: token})
    started = time.perf_counter()
    try:
        status = run(rank0(cfg, args.pings, warmup))
        child_status = child.wait(TIMEOUT)
    except (AiokvpipeError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"\nFAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        stop(child)
    if child_status != 0:
        print(f"\nFAILED: rank 1 exited with status {child_status}", file=sys.stderr)
        return 1
    if status == 0:
        seconds = time.perf_counter() - started
        print(f"\nOK: every tensor verified by rank 1; {seconds:.1f} s in all")
    return status


if __name__ == "__main__":
    sys.exit(main())
