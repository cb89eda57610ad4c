"""2 prefill x 2 decode endpoints, one decode killed and restarted mid-run.

    python examples/xpyd.py [--requests 200] [--size 131072]

Four processes, each one :class:`aiokvpipe.Endpoint`. Every prefill sends
"KV" tensors (bytes only its id and the request number determine) to the
decodes in turn; a decode checks every byte and answers with the request's
id. Once d1 has served a quarter of the requests it is SIGKILLed (with
requests in flight) and restarted on the same address: the prefills see
PeerClosedError for what was bound to it (through ``send`` or the
``on_peer_event`` hook), route those requests to the other decode, and go back
to d1 once its new instance answers. The kill is triggered by d1's progress,
not by a clock, and the prefills hold their last quarter of requests until the
new d1 is up, so the scenario is the same on a fast or a slow machine. Nobody
else restarts. Prints a short report; exit status 0 only if every request was
answered and verified.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from typing import Any

import torch

from aiokvpipe import Endpoint, EndpointConfig, PeerClosedError, TransferTimeout, free_port
from aiokvpipe.peers import PeerEvent

TOKEN_ENV = "XPYD_TOKEN"


def kv(prefill: int, seq: int, nbytes: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(prefill * 1_000_003 + seq)
    body = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    return torch.cat([torch.tensor([prefill, seq], dtype=torch.int64).view(torch.uint8), body])


def config(name: str, port: int = 0) -> EndpointConfig:
    return EndpointConfig(
        name=name,
        port=port,
        token=os.environ[TOKEN_ENV],
        heartbeat_interval=0.2,
        peer_timeout=1.0,
        connect_timeout=3.0,
        buffer_bytes=16 << 20,
    )


async def stdin_closed() -> None:
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def stdin_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


# --------------------------------------------------------------------- decode


async def decode(args: argparse.Namespace) -> dict[str, Any]:
    async with await Endpoint.start(config(args.name, args.port)) as ep:
        print(json.dumps({"address": ep.address}), flush=True)
        served, bad = 0, 0

        async def serve() -> None:
            nonlocal served, bad
            while True:
                src, obj = await ep.recv()
                assert isinstance(obj, torch.Tensor)
                prefill, seq = (int(x) for x in obj[:16].view(torch.int64))
                if not torch.equal(obj, kv(prefill, seq, obj.numel() - 16)):
                    bad += 1
                    continue
                served += 1
                if served == args.report_at:  # the orchestrator's cue to kill this one
                    print(json.dumps({"progress": served}), flush=True)
                try:
                    await ep.send(src, torch.tensor([prefill, seq], dtype=torch.int64))
                except PeerClosedError:
                    pass  # that prefill is gone; serve the others

        task = asyncio.ensure_future(serve())
        await stdin_closed()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return {"served": served, "corrupt": bad}


# --------------------------------------------------------------------- prefill


async def prefill(args: argparse.Namespace) -> dict[str, Any]:
    decodes = args.decodes.split(",")
    async with await Endpoint.start(config(args.name)) as ep:
        print(json.dumps({"address": ep.address}), flush=True)
        loop = asyncio.get_running_loop()
        waiting: dict[int, tuple[str, asyncio.Future[None]]] = {}
        latencies: list[float] = []
        per_decode = dict.fromkeys(decodes, 0)
        rerouted = 0
        turn = 0

        def peer_gone(event: PeerEvent) -> None:  # fail what is bound to that instance
            for address, fut in list(waiting.values()):
                if address == event.address and not fut.done():
                    fut.set_exception(event.error)

        ep.on_peer_event(peer_gone)

        async def answers() -> None:
            while True:
                src, obj = await ep.recv()
                assert isinstance(obj, torch.Tensor)
                entry = waiting.get(int(obj[1]))
                if entry is not None and entry[0] == src and not entry[1].done():
                    entry[1].set_result(None)

        hold_from = args.requests * 3 // 4
        resumed = asyncio.ensure_future(stdin_line())  # "resume": the restarted d1 is up

        async def request(seq: int, gate: asyncio.Semaphore) -> None:
            nonlocal rerouted, turn
            if seq >= hold_from:
                await asyncio.shield(resumed)
            async with gate:
                started = time.perf_counter()
                for attempt in range(len(decodes) * 4):
                    address = decodes[turn % len(decodes)]
                    turn += 1
                    fut: asyncio.Future[None] = loop.create_future()
                    waiting[seq] = (address, fut)
                    try:
                        await ep.send(address, kv(args.id, seq, args.size))
                        await asyncio.wait_for(fut, 5.0)
                    except (PeerClosedError, TransferTimeout, asyncio.TimeoutError):
                        rerouted += 1  # that decode died or restarts: next one
                        await asyncio.sleep(0.05 * attempt)
                        continue
                    finally:
                        waiting.pop(seq, None)
                    per_decode[address] += 1
                    latencies.append(time.perf_counter() - started)
                    return
                raise RuntimeError(f"request {seq}: no decode answered")

        reader = asyncio.ensure_future(answers())
        gate = asyncio.Semaphore(8)
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(request(i, gate) for i in range(args.requests)), return_exceptions=True
        )
        seconds = time.perf_counter() - t0
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await stdin_closed()
        latencies.sort()
        return {
            "answered": len(latencies),
            "failed": [repr(r) for r in results if r is not None],
            "rerouted": rerouted,
            "per_decode": per_decode,
            "seconds": seconds,
            "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None,
        }


# --------------------------------------------------------------------- orchestration


class Proc:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise SystemExit(f"FAILED: {' '.join(args)} did not start")
        self.address = json.loads(line)["address"]

    def result(self) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=60)
        return dict(json.loads(out.strip().splitlines()[-1]))


def orchestrate(args: argparse.Namespace) -> int:
    os.environ.setdefault(TOKEN_ENV, secrets.token_hex(16))
    ports = [free_port(), free_port()]
    report_at = str(args.requests // 4)
    decodes = [
        Proc("--role", "decode", "--name", f"d{i}", "--port", str(p), "--report-at", report_at)
        for i, p in enumerate(ports)
    ]
    addresses = ",".join(d.address for d in decodes)
    common = ["--decodes", addresses, "--requests", str(args.requests), "--size", str(args.size)]
    prefills = [
        Proc("--role", "prefill", "--name", f"p{i}", "--id", str(i), *common) for i in range(2)
    ]
    print(f"decodes {addresses}; prefills {prefills[0].address}, {prefills[1].address}")
    t0 = time.perf_counter()
    killed = decodes[1]
    if not select.select([killed.proc.stdout], [], [], 60)[0]:
        raise SystemExit("FAILED: d1 reported no progress in 60 s")
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait()
    print(
        f"killed d1 (pid {killed.proc.pid}) after it served {args.requests // 4} "
        f"({time.perf_counter() - t0:.2f} s); restarting it in place"
    )
    time.sleep(0.3)
    decodes[1] = Proc("--role", "decode", "--name", "d1", "--port", str(ports[1]))
    assert decodes[1].address == killed.address
    for p in prefills:  # release the last quarter, which the new d1 shares
        p.proc.stdin.write("resume\n")  # type: ignore[union-attr]
        p.proc.stdin.flush()  # type: ignore[union-attr]
    reports = [p.result() for p in prefills]
    served = [d.result() for d in decodes]
    for name, r in zip(("p0", "p1"), reports, strict=True):
        print(
            f"{name}: {r['answered']}/{args.requests} answered in {r['seconds']:.2f} s, "
            f"{r['rerouted']} rerouted, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
            f"per decode {r['per_decode']}"
        )
    print(f"d0 served {served[0]['served']}, d1 (new instance) served {served[1]['served']}")
    ok = (
        all(r["answered"] == args.requests and not r["failed"] for r in reports)
        and all(s["corrupt"] == 0 for s in served)
        and served[1]["served"] > 0
    )
    print("OK: every request answered and verified" if ok else "FAILED")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("main", "decode", "prefill"), default="main")
    parser.add_argument("--name", default="")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--id", type=int, default=0)
    parser.add_argument("--decodes", default="")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--size", type=int, default=128 << 10)
    parser.add_argument("--report-at", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "main":
        return orchestrate(args)
    summary = asyncio.run(decode(args) if args.role == "decode" else prefill(args))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
