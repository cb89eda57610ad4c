"""The ring across real processes (multiprocessing spawn).

This process plays one side on the test's loop (asyncio or uvloop); spawned
children play the others. Children start slowly (each imports the package),
so each test spawns as few as it can and starts them together.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import numpy as np
import pytest
import shm_workers

from aiokvpipe.errors import SlowReaderError, WriterGoneError
from aiokvpipe.shm import ShmRingBuffer, ShmRingBufferIO


@pytest.fixture(autouse=True, scope="module")
def _tracker() -> None:
    shm_workers.start_resource_tracker()


def _loop_name() -> str:
    return "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"


async def _recv(conn: object, timeout: float = 30.0) -> object:
    """Connection.recv without blocking the loop."""
    from aiokvpipe.shm.group import call_in_thread

    if not await call_in_thread(lambda: conn.poll(timeout)):  # type: ignore[attr-defined]
        raise TimeoutError("child did not answer")
    return conn.recv()  # type: ignore[attr-defined]


async def test_writer_process_to_reader_processes() -> None:
    loop = _loop_name()
    msgs = [b"a" * 10, {"step": 3}, np.arange(3000, dtype=np.float32), b"z" * 5000, None]
    with ShmRingBuffer(2, 1024, 4) as ring:
        handle = ring.export_handle()
        with (
            shm_workers.child(shm_workers.writer_send, handle, loop, msgs) as (_, wconn),
            shm_workers.child(shm_workers.reader_collect, handle, 1, loop, len(msgs)) as (_, rconn),
        ):
            async with ShmRingBufferIO(ring, 0) as me:
                assert await _recv(wconn) == "attached"
                assert await _recv(rconn) == "attached"
                wconn.send("go")
                mine = [await me.dequeue(timeout=30) for _ in msgs]
                theirs = await _recv(rconn)
                assert await _recv(wconn) == "sent"
                with pytest.raises(WriterGoneError):
                    await me.dequeue(timeout=5)  # the writer closed after sending
        for got in (mine, theirs):
            assert got[:2] == msgs[:2] and got[3:] == msgs[3:]  # type: ignore[index]
            np.testing.assert_array_equal(got[2], msgs[2])  # type: ignore[index]


async def test_writer_process_crash_is_detected_promptly() -> None:
    with shm_workers.child(shm_workers.create_and_hang) as (proc, conn):
        handle = await _recv(conn)
        reader = ShmRingBufferIO.attach(handle, 0)  # type: ignore[arg-type]
        try:
            assert await reader.dequeue(timeout=10) == b"before the crash"
            parked = asyncio.create_task(reader.dequeue(timeout=20))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            proc.kill()
            with pytest.raises(WriterGoneError, match=f"pid {proc.pid}"):
                await parked
            elapsed = time.monotonic() - started
            assert elapsed < 1.0, f"writer death noticed after {elapsed:.3f} s"
            with pytest.raises(WriterGoneError):
                async with reader.acquire_read(timeout=5):
                    pass
        finally:
            reader.close()
    # The crashed creator could not unlink; cleaning up by name works.
    assert handle.name in os.listdir("/dev/shm")  # type: ignore[attr-defined]
    assert ShmRingBuffer.unlink_stale(handle.name)  # type: ignore[attr-defined]


async def test_reader_process_that_stops_reading() -> None:
    with ShmRingBuffer(2, 128, 3) as ring:
        handle = ring.export_handle()
        with shm_workers.child(shm_workers.reader_stall, handle, 1) as (_, conn):
            assert await _recv(conn) == "attached"
            async with ShmRingBufferIO(ring, -1) as writer, ShmRingBufferIO(ring, 0) as fast:
                for i in range(3):
                    await writer.enqueue(b"%d" % i, timeout=5)
                    assert await fast.dequeue(timeout=5) == b"%d" % i
                with pytest.raises(SlowReaderError) as info:
                    await writer.enqueue(b"3", timeout=0.1)
                assert info.value.lagging_readers == (1,)
                assert "reader 1: pid" in str(info.value)
                conn.send("exit")


def test_create_from_process_group(tmp_path: Path) -> None:
    # A sync test (it runs once): the ranks themselves mix asyncio and uvloop.
    init = str(tmp_path / "pg")
    world, pg = 3, shm_workers.process_group_rank
    results = {}
    with (
        shm_workers.child(pg, 0, world, init, "asyncio") as (_, c0),
        shm_workers.child(pg, 1, world, init, "uvloop") as (_, c1),
        shm_workers.child(pg, 2, world, init, "uvloop") as (_, c2),
    ):
        for rank, conn in enumerate((c0, c1, c2)):
            assert conn.poll(120), f"rank {rank} did not answer"
            results[rank] = conn.recv()
    expected = [{"step": 1}, list(map(float, range(600))), b"end"]
    assert results[0] == expected and results[2] == expected
    assert results[1][:3] == expected  # the writer (rank 1) gets its own objects back
    assert results[1][3] is False, "the writer unlinks the name once every reader attached"
