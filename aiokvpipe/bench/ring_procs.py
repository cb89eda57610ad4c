"""The ring benchmark's orchestration: its worker processes and one scenario on them.

:mod:`aiokvpipe.bench.ring` decides which figures to measure against which
baselines; this module runs them. Workers (:mod:`aiokvpipe.bench.ring_workers`)
are spawned once and run one scenario after another, each on a fresh ring
(a spawned interpreter takes seconds to import the package).
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.connection import Connection
from typing import Any

from ..shm import ShmRingBuffer
from .ring_workers import serve

SPAWN = mp.get_context("spawn")


class Worker:
    def __init__(self, pipes: list[Connection] | None = None) -> None:
        self.conn, theirs = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=serve, args=(theirs, pipes or []), daemon=True)
        self.proc.start()
        theirs.close()

    def start(self, name: str, *args: Any) -> None:
        self.conn.send((name, args))

    def expect_ready(self) -> None:
        msg = self.conn.recv()
        if msg != "ready":
            raise RuntimeError(f"worker answered {msg!r} instead of 'ready'")

    def result(self) -> Any:
        tag, value = self.conn.recv()
        assert tag == "result"
        return value

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def run_scenario(
    writer: Worker, readers: list[Worker], wcall: tuple[Any, ...], rcalls: list[tuple[Any, ...]]
) -> tuple[list[Any], Any]:
    """Start readers, then the writer; go once all are attached; collect
    (each reader's result, the writer's)."""
    for reader, call in zip(readers, rcalls, strict=True):
        reader.start(*call)
    writer.start(*wcall)
    for w in (*readers, writer):
        w.expect_ready()
    writer.conn.send("go")
    results = [r.result() for r in readers]
    return results, writer.result()


def latencies(sent: list[int], got: list[tuple[int, int]]) -> list[int]:
    """Send-call-to-receive-return times (ns), pairing each receipt with its send."""
    return [done - sent[i] for i, done in got]


def run_ring(
    writer: Worker,
    readers: list[Worker],
    loop: str,
    mode: str,
    n: int,
    size: int,
    chunk: int,
    chunks: int,
    interval: float = 0.0,
    anticipate: bool = True,
    seed: bool = False,
) -> list[Any]:
    """Each reader's result; a stamped run's receipts become latencies (ns).

    ``seed``: the readers wait the way the reference ring's do (a busy poll).
    """
    with ShmRingBuffer(len(readers), chunk, chunks) as ring:
        h = ring.export_handle()
        rcalls = [
            ("seed_read", h, r, n) if seed else ("ring_read", h, r, loop, mode, n, anticipate)
            for r in range(len(readers))
        ]
        results, sent = run_scenario(
            writer, readers, ("ring_write", h, loop, mode, n, size, interval), rcalls
        )
    if mode == "stamped":
        return [(latencies(sent, got), cpu, woke) for got, cpu, woke in results]
    return results


def handoff(writer: Worker, reader: Worker, n: int, size: int) -> float:
    """Bytes per second through one shared buffer handed back and forth with a
    flag, between the same two processes as the ring's (no ring code at all).

    On these VMs the speed of copies between two processes' CPUs changes by
    up to 7x for seconds at a time (measured: 2.0 against 14.3 GB/s for this
    handoff, alternating with the ring in the same processes, and the ring
    slow in the same runs), while a copy inside one process does not: the
    1 MiB row's memcpy baseline cannot see that, this one does.
    """
    with ShmRingBuffer(0, size, 1) as shared:
        (rate,), _ = run_scenario(
            writer, [reader], ("handoff_write", shared.name, n, size),
            [("handoff_read", shared.name, n, size)],
        )  # fmt: skip
    return float(rate)
