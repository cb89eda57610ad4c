"""Worker processes of ``python -m aiokvpipe.bench pipe``: the pipe and its baselines.

Each worker is a module-level function ``worker(rank, queue, ...)`` so that a
spawned process can import it; it reports one dict through ``queue``
(see :mod:`aiokvpipe.bench.procs`). The round-trip-only workers (the raw
asyncio ping-pong, the interleaved shm/tcp/floor echo) are in
:mod:`aiokvpipe.bench.rtt_workers`.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from typing import Any

import torch

from ..links.net import avoid_pacing_congestion_control, listening_socket, tune_data_socket
from .procs import cpu_seconds, report, run_loop

# ----------------------------------------------------------------- the pipe


def _pipe_worker(
    rank: int,
    queue: Any,
    mode: str,
    port: int,
    size: int,
    count: int,
    loop_name: str,
    transport: str,
    window: int,
    anticipate: bool = True,
    gap: float = 0.0,
) -> None:
    """``gap`` (rtt): rank 0 awaits ``asyncio.sleep(gap)`` before each round
    trip, so the gaps jitter the way an application's do."""
    from ..config import PipeConfig
    from ..pipe import Pipe

    async def main() -> dict[str, Any]:
        cfg = PipeConfig(
            rank=rank,
            port=port,
            transport=transport,  # type: ignore[arg-type]
            buffer_bytes=window,
            connect_timeout=60,
            anticipate=anticipate,
        )
        async with await Pipe.connect(cfg) as pipe:
            out: dict[str, Any] = {f"transport{rank}": pipe.send_transport}
            if mode == "throughput":
                if rank == 0:
                    payload = torch.ones(size // 4, dtype=torch.float32)
                    for _ in range(count + 2):
                        await pipe.send(payload)
                    await pipe.flush()
                    await pipe.recv()  # done marker
                else:
                    await pipe.recv()
                    await pipe.recv()  # warm-up
                    start = time.perf_counter()
                    for _ in range(count):
                        await pipe.recv()
                    out["seconds"] = time.perf_counter() - start
                    await pipe.send(None)
            elif mode == "cold":
                await _cold_stream(pipe, rank, size, count, out)
            elif mode == "rtt":
                payload = torch.ones(size // 4, dtype=torch.float32)
                cpu0 = 0.0
                if rank == 0:
                    samples = []
                    for i in range(count + 50):
                        if i == 50:
                            cpu0 = cpu_seconds()
                        if gap:
                            await asyncio.sleep(gap)
                        t0 = time.perf_counter()
                        await pipe.send(payload)
                        await pipe.recv()
                        if i >= 50:
                            samples.append(time.perf_counter() - t0)
                    out["samples"] = samples
                else:
                    for i in range(count + 50):
                        if i == 50:
                            cpu0 = cpu_seconds()
                        await pipe.send(await pipe.recv())
                # CPU per round trip (waiting included: what anticipation spends)
                out[f"cpu{rank}"] = (cpu_seconds() - cpu0) / count
            elif mode == "lag":
                big: torch.Tensor | None = (
                    torch.ones(size, dtype=torch.uint8) if rank == 0 else None
                )
                lags: list[float] = []
                stop = asyncio.Event()

                async def ticker() -> None:
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        await asyncio.sleep(0.001)
                        lags.append(time.perf_counter() - t0 - 0.001)

                # Steady state: one warm-up transfer first. A fresh process's
                # first touch of guest memory faults at ~0.5 GB/s on these
                # VMs (single syscalls stall for ms); after it, the receive
                # pool hands back warm blocks.
                if rank == 0:
                    await pipe.send(big)
                else:
                    await pipe.recv()
                tick = asyncio.ensure_future(ticker())
                if rank == 0:
                    await pipe.recv()  # receiver ready
                    start = time.perf_counter()
                    for _ in range(count):
                        await pipe.send(big)
                    await pipe.flush()
                    await pipe.recv()
                    out["seconds"] = time.perf_counter() - start
                else:
                    await pipe.send(None)
                    for _ in range(count):
                        await pipe.recv()  # dropped at once: its block goes back to the pool
                    await pipe.send(None)
                stop.set()
                await tick
                out[f"lags{rank}"] = lags
            elif mode == "idle":  # ``count`` seconds with a receiver waiting
                if rank == 0:
                    await pipe.recv()
                    await asyncio.sleep(count)
                    await pipe.send(None)
                else:
                    await pipe.send(None)
                    cpu0, t0 = cpu_seconds(), time.perf_counter()
                    await pipe.recv()
                    out.update(idle_cpu=cpu_seconds() - cpu0, idle_wall=time.perf_counter() - t0)
                    await pipe.send(None)
                if rank == 0:
                    await pipe.recv()
            elif mode == "backpressure":
                if rank == 0:
                    payload = torch.ones(size, dtype=torch.uint8)
                    peak = 0
                    blocked_for = blocked_cpu = 0.0
                    for _ in range(count):
                        cpu0 = cpu_seconds()
                        t0 = time.perf_counter()
                        await pipe.send(payload)
                        waited = time.perf_counter() - t0
                        if waited > 0.2:  # this send waited for the stalled receiver
                            blocked_for += waited
                            blocked_cpu += cpu_seconds() - cpu0
                        peak = max(peak, pipe.pending_bytes)
                    out.update(peak=peak, blocked=blocked_for, cpu=blocked_cpu)
                    await pipe.recv()
                else:
                    await asyncio.sleep(2.0)  # a receiver that stops reading
                    for _ in range(count):
                        await pipe.recv()
                    await pipe.send(None)
            return out

    report(queue, lambda: run_loop(loop_name, main))


# ----------------------------------------------------------------- baselines


def _raw_socket_worker(rank: int, queue: Any, port: int, size: int, count: int) -> None:
    def main() -> dict[str, Any]:
        if rank == 1:
            srv = listening_socket("127.0.0.1", port, 1)  # set up as our own links' are
            srv.setblocking(True)
            conn, _ = srv.accept()
            tune_data_socket(conn)  # the options our own links use, for a fair baseline
            buf = bytearray(size)
            view = memoryview(buf)

            def recv_one() -> None:
                got = 0
                while got < size:
                    n = conn.recv_into(view[got:])
                    if not n:
                        raise ConnectionError("eof")
                    got += n

            recv_one()
            start = time.perf_counter()
            for _ in range(count):
                recv_one()
            seconds = time.perf_counter() - start
            conn.sendall(b"x")
            conn.close()
            srv.close()
            return {"seconds": seconds}
        sock = _connect_retry(port)
        payload = bytearray(b"\x01") * size  # real pages: bytes(size) would read the zero page
        for _ in range(count + 1):
            sock.sendall(payload)
        sock.recv(1)
        sock.close()
        return {}

    report(queue, main)


def _connect_retry(port: int) -> socket.socket:
    for _ in range(500):
        sock = socket.socket()
        avoid_pacing_congestion_control(sock)  # before connecting, as our links do
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            sock.close()
            time.sleep(0.01)
            continue
        tune_data_socket(sock)
        return sock
    raise ConnectionRefusedError(f"nobody listens on {port}")


def _gloo_worker(rank: int, queue: Any, mode: str, port: int, size: int, count: int) -> None:
    def main() -> dict[str, Any]:
        import torch.distributed as dist

        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
        )
        try:
            payload = torch.ones(size // 4, dtype=torch.float32)
            buf = torch.empty_like(payload)
            if mode == "throughput":
                if rank == 0:
                    for _ in range(count + 1):
                        dist.send(payload, 1)
                    dist.recv(buf[:1], 1)
                    return {}
                dist.recv(buf, 0)
                start = time.perf_counter()
                for _ in range(count):
                    dist.recv(buf, 0)
                seconds = time.perf_counter() - start
                dist.send(payload[:1], 0)
                return {"seconds": seconds}
            samples = []
            for i in range(count + 20):
                if rank == 0:
                    t0 = time.perf_counter()
                    dist.send(payload, 1)
                    dist.recv(buf, 1)
                    if i >= 20:
                        samples.append(time.perf_counter() - t0)
                else:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)
            return {"samples": samples} if rank == 0 else {}
        finally:
            dist.destroy_process_group()

    report(queue, main)


#: Bytes of distinct tensors each side of a "cold" stream cycles through: twice
#: the last-level cache here (32 MiB), so no tensor is still cached when it
#: comes round again, as in a stream of a server's KV blocks.
COLD_WORKING_SET = 64 << 20


async def _cold_stream(pipe: Any, rank: int, size: int, count: int, out: dict[str, Any]) -> None:
    """Distinct tensors, held: rank 0 cycles through COLD_WORKING_SET bytes of
    sources, rank 1 keeps the last COLD_WORKING_SET bytes it received (so its
    destinations are never the block it just dropped). Rank 1 reports the
    seconds of ``count`` messages after one pass of the working set."""
    k = max(2, COLD_WORKING_SET // size)
    if rank == 0:
        sources = [torch.full((size // 4,), float(i)) for i in range(k)]
        for i in range(count + k):
            await pipe.send(sources[i % k])
        await pipe.flush()
        await pipe.recv()  # done marker
        return
    held: deque[Any] = deque(maxlen=k)
    for _ in range(k):
        held.append(await pipe.recv())
    start = time.perf_counter()
    for _ in range(count):
        held.append(await pipe.recv())
    out["seconds"] = time.perf_counter() - start
    await pipe.send(None)


def memcpy_cold_bandwidth(size: int, total: int = 1 << 30) -> float:
    """Single-core memcpy of ``size``-byte tensors cycling through distinct
    sources and destinations of COLD_WORKING_SET bytes each, bytes/second."""
    k = max(2, COLD_WORKING_SET // size)
    sources = [torch.full((size,), i % 251, dtype=torch.uint8) for i in range(k)]
    dests = [torch.ones(size, dtype=torch.uint8) for _ in range(k)]  # touched
    torch.set_num_threads(1)
    reps = max(2 * k, total // size)
    t0 = time.perf_counter()
    for i in range(reps):
        dests[i % k].copy_(sources[i % k])
    return size * reps / (time.perf_counter() - t0)


def memcpy_bandwidth(size: int, repeat: int = 10) -> float:
    """Single-core memcpy of ``size`` bytes, bytes/second (best of ``repeat``)."""
    src = torch.ones(size, dtype=torch.uint8)
    dst = torch.empty_like(src)
    torch.set_num_threads(1)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return size / best
