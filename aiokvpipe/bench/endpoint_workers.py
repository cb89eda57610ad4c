"""Worker-process side of ``python -m aiokvpipe.bench endpoint``.

Each worker runs in a fresh spawned process (see :mod:`.procs`) and reports
one dict through a queue. The Pipe baselines reuse the pipe suite's worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import torch

from .procs import cpu_seconds, report, run_loop

TOKEN = "bench-endpoint-token-0123456789"


def _config(
    name: str, port: int = 0, transport: str = "auto", window: int = 64 << 20, idle: bool = False
) -> Any:
    """Fast heartbeats for the fault cases; the defaults (0.5 s / 2 s) for ``idle``."""
    from ..config import EndpointConfig

    return EndpointConfig(
        name=name,
        port=port,
        token=TOKEN,
        transport=transport,  # type: ignore[arg-type]
        buffer_bytes=window,
        heartbeat_interval=0.5 if idle else 0.2,
        peer_timeout=2.0 if idle else 1.0,
        connect_timeout=60,
    )


def endpoint_pair_worker(
    rank: int,
    queue: Any,
    mode: str,
    port: int,
    size: int,
    count: int,
    loop_name: str,
    transport: str,
    window: int,
) -> None:
    """The pipe suite's throughput and rtt cases, between two endpoints:
    rank 1 listens on ``port``, rank 0 dials it."""
    from ..endpoint import Endpoint

    async def main() -> dict[str, Any]:
        cfg = _config(f"e{rank}", port if rank == 1 else 0, transport, window)
        async with await Endpoint.start(cfg) as ep:
            peer = f"127.0.0.1:{port}"
            out: dict[str, Any] = {}
            payload = torch.ones(size // 4, dtype=torch.float32)
            if mode == "throughput":
                if rank == 0:
                    for _ in range(count + 2):
                        await ep.send(peer, payload)
                    await ep.flush()
                    await ep.recv()  # done marker
                    out["transport0"] = ep.stats()[peer].send_transport
                else:
                    src, _ = await ep.recv()
                    await ep.recv()  # warm-up
                    start = time.perf_counter()
                    for _ in range(count):
                        await ep.recv()
                    out["seconds"] = time.perf_counter() - start
                    await ep.send(src, None)
            else:  # rtt
                if rank == 0:
                    samples = []
                    for i in range(count + 50):
                        t0 = time.perf_counter()
                        await ep.send(peer, payload)
                        await ep.recv()
                        if i >= 50:
                            samples.append(time.perf_counter() - t0)
                    out["samples"] = samples
                else:
                    for _ in range(count + 50):
                        src, obj = await ep.recv()
                        await ep.send(src, obj)
            return out

    report(queue, lambda: run_loop(loop_name, main))


def idle_worker(
    rank: int, queue: Any, port: int, peers: int, seconds: float, transport: str
) -> None:
    """Rank 1: a hub on ``port``; rank 0: ``peers`` endpoints, each linked
    both ways with the hub. Both then sit idle for ``seconds`` and report
    the CPU they used meanwhile."""
    from ..endpoint import Endpoint

    async def main() -> dict[str, Any]:
        hub = f"127.0.0.1:{port}"
        if rank == 1:
            async with await Endpoint.start(_config("hub", port, transport, 4 << 20, True)) as ep:
                for _ in range(peers):
                    src, _ = await ep.recv()
                    await ep.send(src, None)
                return await _idle(f"cpu{rank}", seconds)
        eps = [
            await Endpoint.start(_config(f"peer{i}", 0, transport, 4 << 20, True))
            for i in range(peers)
        ]
        try:
            for ep in eps:
                await ep.send(hub, None)
            for ep in eps:
                await ep.recv()
            return await _idle(f"cpu{rank}", seconds)
        finally:
            for ep in eps:
                await ep.aclose()

    report(queue, lambda: run_loop("asyncio", main))


async def _idle(key: str, seconds: float) -> dict[str, Any]:
    await asyncio.sleep(0.5)  # settle
    before = cpu_seconds()
    await asyncio.sleep(seconds)
    return {key: (cpu_seconds() - before) / seconds}


def decode_proc(port: int, name: str, ready: Any) -> None:
    """A decode for the 2P x 2D case: answer each request with its id."""
    from ..endpoint import Endpoint
    from ..errors import PeerClosedError

    async def main() -> None:
        async with await Endpoint.start(_config(name, port)) as ep:
            ready.set()
            while True:
                src, obj = await ep.recv()
                assert isinstance(obj, torch.Tensor)
                try:
                    await ep.send(src, obj[:8].clone())
                except PeerClosedError:
                    pass

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(main())


def prefill_proc(
    ident: int, queue: Any, decodes: list[str], count: int, size: int, go: Any
) -> None:
    """A prefill for the 2P x 2D case: ``count`` requests round-robin, at most
    8 outstanding; a request whose decode fails goes to the next one.
    Reports per-request latency and which decode answered."""
    from ..endpoint import Endpoint
    from ..errors import PeerClosedError, TransferTimeout

    async def main() -> dict[str, Any]:
        async with await Endpoint.start(_config(f"p{ident}")) as ep:
            loop = asyncio.get_running_loop()
            waiting: dict[int, tuple[str, asyncio.Future[None]]] = {}
            done: list[tuple[float, str]] = []
            turn = 0

            def gone(event: Any) -> None:
                for address, fut in list(waiting.values()):
                    if address == event.address and not fut.done():
                        fut.set_exception(event.error)

            ep.on_peer_event(gone)

            async def answers() -> None:
                while True:
                    src, obj = await ep.recv()
                    assert isinstance(obj, torch.Tensor)
                    entry = waiting.get(int(obj.view(torch.int64)[0]))
                    if entry is not None and entry[0] == src and not entry[1].done():
                        entry[1].set_result(None)

            async def one(seq: int, gate: asyncio.Semaphore) -> None:
                nonlocal turn
                body = torch.zeros(size, dtype=torch.uint8)
                body[:8].view(torch.int64)[0] = seq
                async with gate:
                    t0 = time.perf_counter()
                    while True:
                        address = decodes[turn % len(decodes)]
                        turn += 1
                        fut: asyncio.Future[None] = loop.create_future()
                        waiting[seq] = (address, fut)
                        try:
                            await ep.send(address, body)
                            await asyncio.wait_for(fut, 5.0)
                            break
                        except (PeerClosedError, TransferTimeout, asyncio.TimeoutError):
                            await asyncio.sleep(0.01)
                        finally:
                            waiting.pop(seq, None)
                    done.append((time.perf_counter() - t0, address))

            reader = asyncio.ensure_future(answers())
            await loop.run_in_executor(None, go.wait)
            gate = asyncio.Semaphore(8)
            t0 = time.perf_counter()
            await asyncio.gather(*(one(i, gate) for i in range(count)))
            seconds = time.perf_counter() - t0
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            return {"seconds": seconds, "done": done}

    report(queue, lambda: asyncio.run(main()))


def rtt_alternating_worker(
    rank: int,
    queue: Any,
    port: int,
    pipe_port: int,
    size: int,
    rounds: int,
    block: int,
    loop_name: str,
    transport: str,
) -> None:
    """4 KiB round trips through an Endpoint pair and a Pipe pair living in
    the same two processes, alternating in blocks of ``block``.

    Both see the same scheduler placement and the same neighbours at nearly
    the same time, which separate runs of each (whose p50 moves 2x between
    placements on these VMs) do not.
    """
    from ..config import PipeConfig
    from ..endpoint import Endpoint
    from ..pipe import Pipe

    async def main() -> dict[str, Any]:
        pcfg = PipeConfig(
            rank=rank,
            port=pipe_port,
            transport=transport,  # type: ignore[arg-type]
            buffer_bytes=64 << 20,
            connect_timeout=60,
        )
        ecfg = _config(f"e{rank}", port if rank == 1 else 0, transport, 64 << 20)
        async with await Endpoint.start(ecfg) as ep, await Pipe.connect(pcfg) as pipe:
            peer = f"127.0.0.1:{port}"
            payload = torch.ones(size // 4, dtype=torch.float32)
            samples: dict[str, list[float]] = {"endpoint": [], "pipe": []}
            if rank == 0:
                await ep.send(peer, None)  # the endpoint link is up before timing
                await ep.recv()
            else:
                src, _ = await ep.recv()
                await ep.send(src, None)
            for r in range(rounds):
                for kind in ("endpoint", "pipe") if r % 2 == 0 else ("pipe", "endpoint"):
                    for i in range(block + 5):  # 5 to settle after the switch
                        if rank == 0:
                            t0 = time.perf_counter()
                            if kind == "endpoint":
                                await ep.send(peer, payload)
                                await ep.recv()
                            else:
                                await pipe.send(payload)
                                await pipe.recv()
                            if i >= 5:
                                samples[kind].append(time.perf_counter() - t0)
                        elif kind == "endpoint":
                            src, obj = await ep.recv()
                            await ep.send(src, obj)
                        else:
                            await pipe.send(await pipe.recv())
            return {"samples": samples} if rank == 0 else {}

    report(queue, lambda: run_loop(loop_name, main))
