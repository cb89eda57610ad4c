"""Endpoint processes for the endpoint tests (run as scripts, one per process).

``decode``: answers every request ``(sender, seq)`` with ``[sender, seq, gen]``
after checking the payload bit for bit and the per-sender order; on stdin
EOF it closes and prints a JSON summary.

``prefill``: sends ``count`` requests round-robin to ``targets``, at most
``inflight`` outstanding, checks every answer, prints a JSON summary with
per-request latencies.

The first stdout line of either is ``{"address": ..., "instance": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from typing import Any

import torch

from aiokvpipe import Endpoint, EndpointConfig, PeerClosedError

TOKEN = "endpoint-tests-token-0123456789"


def payload(sender: int, seq: int, nbytes: int) -> torch.Tensor:
    """A request: int64 header (sender, seq), then bytes only (sender, seq) determine."""
    gen = torch.Generator().manual_seed(sender * 1_000_003 + seq)
    body = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    return torch.cat([torch.tensor([sender, seq], dtype=torch.int64).view(torch.uint8), body])


def check(tensor: Any) -> tuple[int, int]:
    """``(sender, seq)`` of a request, after checking every byte of it."""
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.uint8, repr(tensor)
    sender, seq = (int(x) for x in tensor[:16].view(torch.int64))
    expected = payload(sender, seq, tensor.numel() - 16)
    assert torch.equal(tensor, expected), f"payload of ({sender}, {seq}) differs"
    return sender, seq


def config(args: argparse.Namespace, **extra: Any) -> EndpointConfig:
    return EndpointConfig(
        name=args.name,
        host=args.host,
        port=args.port,
        token=TOKEN,
        heartbeat_interval=args.hb,
        peer_timeout=args.peer_timeout,
        buffer_bytes=args.buffer,
        connect_timeout=args.connect_timeout,
        handshake_timeout=args.handshake_timeout,
        max_pending_handshakes=args.max_pending,
        **extra,
    )


def dump_tasks_on_sigusr1() -> None:
    """``kill -USR1 <pid>`` prints every task's stack to stderr (hung-test debugging)."""

    def dump() -> None:
        for task in asyncio.all_tasks():
            task.print_stack(file=sys.stderr)
        sys.stderr.flush()

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)


async def stdin_closed() -> None:
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def decode(args: argparse.Namespace) -> dict[str, Any]:
    dump_tasks_on_sigusr1()
    async with await Endpoint.start(config(args)) as ep:
        print(json.dumps({"address": ep.address, "instance": ep.instance}), flush=True)
        last: dict[str, int] = {}
        summary: dict[str, Any] = {"received": 0, "problems": []}

        async def serve() -> None:
            while True:
                src, obj = await ep.recv()
                try:
                    sender, seq = check(obj)
                except AssertionError as exc:
                    summary["problems"].append(str(exc))
                    continue
                if seq <= last.get(src, -1):
                    summary["problems"].append(f"{src}: seq {seq} after {last[src]}")
                last[src] = seq
                summary["received"] += 1
                try:
                    await ep.send(src, torch.tensor([sender, seq, args.gen], dtype=torch.int64))
                except PeerClosedError:
                    pass  # that prefill went away; serve the others

        server = asyncio.ensure_future(serve())
        await stdin_closed()
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        summary["stats"] = {k: v.__dict__ for k, v in ep.stats().items()}
        return summary


async def prefill(args: argparse.Namespace) -> dict[str, Any]:
    dump_tasks_on_sigusr1()
    targets = args.targets.split(",")
    async with await Endpoint.start(config(args)) as ep:
        print(json.dumps({"address": ep.address, "instance": ep.instance}), flush=True)
        started: dict[int, float] = {}
        waiting: dict[int, asyncio.Future[None]] = {}
        latencies: list[float] = []
        problems: list[str] = []
        order: dict[str, int] = {}
        window = asyncio.Semaphore(args.inflight)
        loop = asyncio.get_running_loop()

        async def answers() -> None:
            while True:
                src, obj = await ep.recv()
                assert isinstance(obj, torch.Tensor)
                sender, seq, _gen = (int(x) for x in obj)
                if sender != args.sender or seq not in waiting:
                    problems.append(f"unexpected answer {(sender, seq)} from {src}")
                    continue
                if seq <= order.get(src, -1):
                    problems.append(f"{src}: answer {seq} after {order[src]}")
                order[src] = seq
                latencies.append(time.perf_counter() - started.pop(seq))
                waiting.pop(seq).set_result(None)

        async def one(seq: int) -> None:
            async with window:
                started[seq] = time.perf_counter()
                waiting[seq] = loop.create_future()
                await ep.send(targets[seq % len(targets)], payload(args.sender, seq, args.size))
                await asyncio.wait_for(waiting[seq], 30)

        reader = asyncio.ensure_future(answers())
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(args.count)), return_exceptions=True)
        elapsed = time.perf_counter() - t0
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        problems += [repr(r) for r in results if r is not None]
        await stdin_closed()
        return {"answered": len(latencies), "problems": problems, "seconds": elapsed,
                "latencies": latencies}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("decode", "prefill"))
    parser.add_argument("--name", default="worker")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--hb", type=float, default=0.2)
    parser.add_argument("--peer-timeout", type=float, default=1.0)
    parser.add_argument("--connect-timeout", type=float, default=5.0)
    parser.add_argument("--buffer", type=int, default=8 << 20)
    parser.add_argument("--gen", type=int, default=1)
    parser.add_argument("--sender", type=int, default=0)
    parser.add_argument("--targets", default="")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--handshake-timeout", type=float, default=5.0)
    parser.add_argument("--max-pending", type=int, default=64)
    parser.add_argument("--max-fds", type=int, default=0, help="lower RLIMIT_NOFILE to this")
    args = parser.parse_args()
    if args.max_fds:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (args.max_fds, args.max_fds))
    summary = asyncio.run(decode(args) if args.role == "decode" else prefill(args))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
