"""Round-trip worker processes of ``python -m aiokvpipe.bench pipe``.

The raw asyncio ping-pong baseline, and the worker that interleaves several
Pipes (and a raw wake-up floor) in the same two processes; the cases that run
them are in :mod:`aiokvpipe.bench.pipe_rtt`. Like every worker, each is a
module-level function ``worker(rank, queue, ...)`` so that a spawned process
can import it; it reports one dict through ``queue`` (see
:mod:`aiokvpipe.bench.procs`).
"""

from __future__ import annotations

import asyncio
import ctypes
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ..links.net import tune_data_socket
from .procs import cpu_seconds, report, run_loop


def _cpu_reader() -> Callable[[], int]:
    """``sched_getcpu``: which CPU the calling thread runs on (-1 where unknown)."""
    if sys.platform == "linux":
        try:
            getcpu = ctypes.CDLL(None).sched_getcpu
        except (OSError, AttributeError):
            pass
        else:
            getcpu.restype = ctypes.c_int
            getcpu.argtypes = []
            return getcpu
    return lambda: -1


def same_cpu_share(senders: list[int], echoes: list[int]) -> float | None:
    """Share of round trips whose echo ran on the CPU the sender sent from
    (None where the CPU could not be read)."""
    pairs = [(a, b) for a, b in zip(senders, echoes, strict=True) if a >= 0 and b >= 0]
    if not pairs:
        return None
    return sum(a == b for a, b in pairs) / len(pairs)


def _asyncio_pingpong_worker(
    rank: int, queue: Any, port: int, size: int, count: int, loop_name: str
) -> None:
    """Bare BufferedProtocol ping-pong: the floor for any asyncio design."""

    class Echo(asyncio.BufferedProtocol):
        def __init__(self, on_full: Callable[[], None]) -> None:
            self.buf = bytearray(size)
            self.got = 0
            self.on_full = on_full
            self.transport: Any = None

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            tune_data_socket(transport.get_extra_info("socket"))

        def get_buffer(self, sizehint: int) -> memoryview:
            return memoryview(self.buf)[self.got :]

        def buffer_updated(self, nbytes: int) -> None:
            self.got += nbytes
            if self.got == size:
                self.got = 0
                self.on_full()

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        payload = bytearray(b"\x01") * size  # real pages: bytes(size) would read the zero page
        if rank == 1:
            done = loop.create_future()
            replies = 0

            def echo() -> None:
                nonlocal replies
                proto.transport.write(payload)
                replies += 1
                if replies == count + 50 and not done.done():
                    done.set_result(None)

            proto = Echo(echo)
            server = await loop.create_server(lambda: proto, "127.0.0.1", port)
            await done
            await asyncio.sleep(0.05)
            server.close()
            return {}
        waiter: asyncio.Future[None] | None = None

        def arrived() -> None:
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        client = Echo(arrived)
        for _ in range(500):
            try:
                transport, _ = await loop.create_connection(lambda: client, "127.0.0.1", port)
                break
            except ConnectionRefusedError:
                await asyncio.sleep(0.01)
        samples = []
        for i in range(count + 50):
            waiter = loop.create_future()
            t0 = time.perf_counter()
            transport.write(payload)
            await waiter
            if i >= 50:
                samples.append(time.perf_counter() - t0)
        transport.close()
        return {"samples": samples}

    report(queue, lambda: run_loop(loop_name, main))


def _rtt_mixed_worker(
    rank: int,
    queue: Any,
    ports: list[int],
    kinds: list[tuple[str, bool]],
    size: int,
    count: int,
    loop_name: str,
    gap: float,
    block: int = 10,
) -> None:
    """4 KiB round trips through several Pipes in the same two processes,
    interleaved (one Pipe per ``(transport, anticipate)`` in ``kinds``, each
    on its own port; the Pipe used rotates every ``block`` round trips).

    Separate process pairs land in different scheduler regimes on these VMs
    (one run's p50 moved 2x against the next), so a ratio between two
    transports is only trustworthy when both share processes and minutes.
    Rank 0 awaits ``asyncio.sleep(gap)`` before each round trip (jittered
    gaps, as an application's). Returns, per kind: ``samples`` (seconds,
    rank 0) and ``cpu<rank>`` (each side's CPU seconds per round trip,
    waiting included, counted over that kind's blocks) and ``where<rank>``
    (per kind, the CPU each round trip's send left from on rank 0 and the
    CPU its echo ran on on rank 1: see :func:`same_cpu_share`).
    """
    from ..config import PipeConfig
    from ..pipe import Pipe

    async def main() -> dict[str, Any]:
        pipes: list[Any] = []
        try:
            for port, (transport, anticipate) in zip(ports, kinds, strict=True):
                if transport == FLOOR:
                    pipes.append(await _FloorEcho.connect(rank, port, size))
                    continue
                cfg = PipeConfig(
                    rank=rank,
                    port=port,
                    transport=transport,  # type: ignore[arg-type]
                    buffer_bytes=1 << 30,
                    connect_timeout=60,
                    anticipate=anticipate,
                )
                pipes.append(await Pipe.connect(cfg))
            payload = torch.ones(size // 4, dtype=torch.float32)
            samples: list[list[float]] = [[] for _ in pipes]
            cpu = [0.0 for _ in pipes]
            where: list[list[int]] = [[] for _ in pipes]
            this_cpu = _cpu_reader()
            warm = 2 * block * len(pipes)
            c0 = cpu_seconds()
            for i in range(warm + count * len(pipes)):
                k = (i // block) % len(pipes)
                pipe = pipes[k]
                if rank == 0:
                    if gap:
                        await asyncio.sleep(gap)
                    sent_from = this_cpu()  # outside the timed round trip
                    t0 = time.perf_counter()
                    await pipe.send(payload)
                    await pipe.recv()
                    if i >= warm:
                        samples[k].append(time.perf_counter() - t0)
                        where[k].append(sent_from)
                else:
                    await pipe.send(await pipe.recv())
                    if i >= warm:  # read after the echo, off its critical path
                        where[k].append(this_cpu())
                if (i + 1) % block == 0:
                    c1 = cpu_seconds()
                    if i >= warm:
                        cpu[k] += c1 - c0
                    c0 = c1
            out: dict[str, Any] = {f"cpu{rank}": [c / count for c in cpu], f"where{rank}": where}
            if rank == 0:
                out["samples"] = samples
            return out
        finally:
            for pipe in pipes:
                await pipe.aclose()

    report(queue, lambda: run_loop(loop_name, main))


#: The kind in :func:`_rtt_mixed_worker` that is no Pipe at all.
FLOOR = "floor"


class _FloorEcho:
    """The least a cross-process round trip can cost here: 4 KiB each way over
    a Unix stream socket, read with the loop's own ``sock_recv_into``.

    No framing, no window, no anticipation: both sides park in epoll and are
    woken by the kernel, exactly the two wake-ups every parked transport pays
    per round trip. Interleaved with the Pipes in the same processes, it tells
    what share of their round trip is the machine's and what is theirs.
    """

    def __init__(self, sock: socket.socket, size: int) -> None:
        self._sock = sock
        self._buf = bytearray(size)
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, rank: int, port: int, size: int) -> _FloorEcho:
        address = f"\0aiokvpipe-bench-floor-{port}"
        loop = asyncio.get_running_loop()
        if rank == 0:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
                listener.bind(address)
                listener.listen(1)
                listener.setblocking(False)
                sock, _ = await loop.sock_accept(listener)
        else:
            deadline = time.monotonic() + 60
            while True:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, address)
                    break
                except (ConnectionRefusedError, FileNotFoundError):
                    sock.close()
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.01)
        sock.setblocking(False)
        return cls(sock, size)

    async def send(self, _payload: Any) -> None:
        await self._loop.sock_sendall(self._sock, self._buf)

    async def recv(self) -> None:
        view, got = memoryview(self._buf), 0
        while got < len(view):
            n = await self._loop.sock_recv_into(self._sock, view[got:])
            if not n:
                raise ConnectionError("floor echo: peer closed")
            got += n

    async def aclose(self) -> None:
        self._sock.close()
