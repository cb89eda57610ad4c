"""The ring benchmark's worker processes: what runs inside each spawned process.

A worker is spawned once and then runs commands (:func:`serve`) sent by the
orchestrating process in :mod:`aiokvpipe.bench.ring`, one scenario after
another, each on a fresh ring.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ..shm import ShmRingBuffer, ShmRingBufferIO, ShmRingHandle
from ..shm.endpoint import DESC_SIZE
from ..shm.fence import fence
from ..shm.ring import DESC, DESC_STAMP, DESC_STAMP_OFF
from .procs import run_loop

SEQ = struct.Struct("<q")  # a stamped message's index, first in its bytes

# Latency runs: the sender reads the clock right before its send call, on a
# message built beforehand (building it is the benchmark's work, not the
# transport's), and returns those readings; a receiver returns the index and
# its clock reading after each receive returned. The orchestrator pairs them.


def _stamped(n: int, size: int) -> list[bytes]:
    pad = bytes(size - SEQ.size)
    return [SEQ.pack(i) + pad for i in range(n)]


def _received(msg: bytes, now: int, into: list[tuple[int, int]]) -> None:
    into.append((SEQ.unpack_from(msg)[0], now))


def ring_write(
    conn: Connection,
    handle: ShmRingHandle,
    loop_name: str,
    mode: str,
    n: int,
    size: int,
    interval: float,
) -> list[int]:
    io = ShmRingBufferIO.attach(handle, -1)
    clock = time.perf_counter_ns

    async def body() -> list[int]:
        sent = [0] * n
        if mode in ("stamped", "idle"):  # one stamped message every `interval`
            messages = _stamped(n, size)
            for i in range(n):
                await asyncio.sleep(interval)
                sent[i] = clock()
                await io.enqueue(messages[i], timeout=60)
        else:  # back to back
            payload = os.urandom(size)
            for _ in range(n):
                await io.enqueue(payload, timeout=60)
        return sent

    try:
        conn.send("ready")
        conn.recv()  # go
        return list(run_loop(loop_name, body))
    finally:
        io.close()


def ring_read(
    conn: Connection,
    handle: ShmRingHandle,
    rank: int,
    loop_name: str,
    mode: str,
    n: int,
    anticipate: bool = True,
) -> Any:
    io = ShmRingBufferIO.attach(handle, rank, anticipate=anticipate)

    async def body() -> Any:
        if mode == "stamped":
            # Latency from the writer's enqueue call, the reader's share of a
            # core, and latency from the publish (the chunk's own timestamp).
            got: list[tuple[int, int]] = []
            woke = []
            desc, stride, chunks = io._desc, DESC_SIZE, io.buffer.max_chunks
            clock, monotonic_ns = time.perf_counter_ns, time.monotonic_ns
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for _ in range(n):
                msg = await io.dequeue(timeout=60)
                done, now = clock(), monotonic_ns()
                _received(msg, done, got)
                at = ((io._seq - 1) % chunks) * stride + DESC_STAMP_OFF
                woke.append(now - DESC_STAMP.unpack_from(desc, at)[0])
            cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
            return (got, cpu, woke)
        if mode == "idle":
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await io.dequeue(timeout=120)
            return (time.process_time() - cpu0, time.perf_counter() - wall0)
        await io.dequeue(timeout=60)  # the clock starts at the first message
        t0, nbytes = time.perf_counter(), 0
        for _ in range(n - 1):
            nbytes += len(await io.dequeue(timeout=60))
        elapsed = time.perf_counter() - t0
        return ((n - 1) / elapsed, nbytes / elapsed)

    try:
        conn.send("ready")
        return run_loop(loop_name, body)
    finally:
        io.close()


def seed_read(conn: Connection, handle: ShmRingHandle, rank: int, n: int) -> Any:
    """The reference ring's reader, for the latency baseline (written for the bench).

    It waits the way the seed's ``ShmRingBuffer`` reader does: check the
    next chunk's "written" flag and its own read flag, and between checks
    ``time.sleep(1e-7)`` (a busy poll: no doorbell, no parking). It reads
    this project's ring (the flag layout is the seed's), so the writer is the
    same ``enqueue`` as for the library's readers and only the waiting differs.
    """
    ring = ShmRingBuffer.attach(handle)
    flags, desc, chunks = ring.flags, ring.descriptors, ring.chunks
    nflag, nchunks, rflag = 1 + ring.n_reader, ring.max_chunks, 1 + rank
    got: list[tuple[int, int]] = []
    clock, sleep = time.perf_counter_ns, time.sleep
    try:
        conn.send("ready")
        seq = 1
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            idx = seq % nchunks
            base = idx * nflag
            while not flags[base] or flags[base + rflag]:
                sleep(1e-7)
            total = DESC.unpack_from(desc, idx * DESC_SIZE)[1]
            msg = bytes(chunks[idx][:total])
            fence()  # the bytes are copied before the chunk is handed back
            flags[base + rflag] = 1
            seq += 1
            _received(msg, clock(), got)
        cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
        del flags, desc, chunks
        return (got, cpu, [])
    finally:
        ring.close()


def pipe_write(
    conn: Connection, pipes: list[Connection], to: int, mode: str, n: int, interval: float
) -> list[int]:
    conn.send("ready")
    conn.recv()
    targets = pipes[:to]
    sent = [0] * n
    if mode == "stamped":
        messages, clock = _stamped(n, 64), time.perf_counter_ns
        for i in range(n):
            time.sleep(interval)
            sent[i] = clock()
            for c in targets:
                c.send_bytes(messages[i])
    else:
        payload = bytes(64)
        for _ in range(n):
            for c in targets:
                c.send_bytes(payload)
    return sent


def pipe_read(conn: Connection, pipes: list[Connection], mode: str, n: int) -> Any:
    (pipe,) = pipes
    conn.send("ready")
    if mode == "stamped":
        got: list[tuple[int, int]] = []
        clock = time.perf_counter_ns
        for _ in range(n):
            msg = pipe.recv_bytes()
            _received(msg, clock(), got)
        return got
    pipe.recv_bytes()
    t0 = time.perf_counter()
    for _ in range(n - 1):
        pipe.recv_bytes()
    return ((n - 1) / (time.perf_counter() - t0), 0.0)


def poll_idle(conn: Connection, flag_name: str, seconds: float) -> tuple[float, float]:
    """The reference ring's waiting: poll a shared flag, sleeping 0.1 us between."""
    conn.send("ready")
    with ShmRingBuffer(0, 64, 1, name=flag_name) as ring:
        flags = ring.flags
        cpu0, wall0 = time.process_time(), time.perf_counter()
        deadline = wall0 + seconds
        while not flags[0] and time.perf_counter() < deadline:
            time.sleep(1e-7)
        result = (time.process_time() - cpu0, time.perf_counter() - wall0)
        del flags
    return result


def floor_read(conn: Connection, address: bytes, loop_name: str, n: int) -> list[tuple[int, int]]:
    """The environment's floor: a task awaiting a datagram, no ring at all."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)

    async def body() -> list[tuple[int, int]]:
        loop = asyncio.get_running_loop()
        got: list[tuple[int, int]] = []
        clock = time.perf_counter_ns
        fut: asyncio.Future[bytes] | None = None

        def on_readable() -> None:
            msg = sock.recv(64)
            if fut is not None and not fut.done():
                fut.set_result(msg)

        loop.add_reader(sock.fileno(), on_readable)
        try:
            conn.send("ready")
            for _ in range(n):
                fut = loop.create_future()
                msg = await fut
                _received(msg, clock(), got)
        finally:
            loop.remove_reader(sock.fileno())
        return got

    try:
        return list(run_loop(loop_name, body))
    finally:
        sock.close()


def floor_write(
    conn: Connection, address: bytes, loop_name: str, n: int, interval: float
) -> list[int]:
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    async def body() -> list[int]:
        sent, messages, clock = [0] * n, _stamped(n, 64), time.perf_counter_ns
        for i in range(n):
            await asyncio.sleep(interval)
            sent[i] = clock()
            sock.sendto(messages[i], address)
        return sent

    try:
        conn.send("ready")
        conn.recv()
        return list(run_loop(loop_name, body))
    finally:
        sock.close()


_HANDOFF_TIMEOUT = 60.0  # a handoff whose peer died must not spin forever


def handoff_write(conn: Connection, name: str, n: int, size: int) -> None:
    """The least a cross-process copy of ``size`` bytes costs here, for the
    1 MiB bandwidth context: one shared buffer and a flag, both sides
    spinning on it, nothing else (no ring, no loop, no doorbell)."""
    with ShmRingBuffer(0, size, 1, name=name) as shared:
        flags, chunk = shared.flags, shared.chunks[0]
        payload = os.urandom(size)
        try:
            conn.send("ready")
            conn.recv()  # go
            clock, deadline = time.perf_counter, time.perf_counter() + _HANDOFF_TIMEOUT
            for _ in range(n):
                while flags[0]:
                    if clock() > deadline:
                        raise TimeoutError("handoff: the reader stopped taking")
                chunk[:size] = payload
                fence()  # the bytes before the flag
                flags[0] = 1
        finally:
            del flags, chunk


def handoff_read(conn: Connection, name: str, n: int, size: int) -> float:
    """The reading side of :func:`handoff_write`: bytes per second, copied out
    into a fresh ``bytes`` each time, as the ring's ``dequeue`` returns."""
    with ShmRingBuffer(0, size, 1, name=name) as shared:
        flags, chunk = shared.flags, shared.chunks[0]
        try:
            conn.send("ready")
            t0, nbytes = 0.0, 0
            clock, deadline = time.perf_counter, time.perf_counter() + _HANDOFF_TIMEOUT
            for i in range(n):
                while not flags[0]:
                    if clock() > deadline:
                        raise TimeoutError("handoff: the writer stopped giving")
                fence()  # the flag before the bytes
                got = len(bytes(chunk[:size]))
                fence()  # the bytes are copied before the buffer is handed back
                flags[0] = 0
                if i:
                    nbytes += got
                else:
                    t0 = time.perf_counter()  # the clock starts at the first message
            return nbytes / (time.perf_counter() - t0)
        finally:
            del flags, chunk


_COMMANDS: dict[str, Callable[..., Any]] = {
    f.__name__: f
    for f in (
        ring_write,
        ring_read,
        seed_read,
        pipe_write,
        pipe_read,
        poll_idle,
        floor_read,
        floor_write,
        handoff_write,
        handoff_read,
    )
}


def serve(conn: Connection, pipes: list[Connection]) -> None:
    """Worker main: run commands until told to stop."""
    while (cmd := conn.recv()) is not None:
        name, args = cmd
        conn.send(("result", _COMMANDS[name](conn, *([pipes] if "pipe_" in name else []), *args)))
