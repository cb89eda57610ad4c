"""The ring across real processes (multiprocessing spawn).

This process plays one side on the test's loop (asyncio or uvloop); spawned
children play the others. Children start slowly (each imports the package),
so each test spawns as few as it can and starts them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shm_workers

from aiokvpipe.backoff import Backoff
from aiokvpipe.errors import (
    PeerClosedError,
    ReaderGoneError,
    RingEmptyError,
    SlowReaderError,
    TransferTimeout,
    WriterGoneError,
)
from aiokvpipe.shm import ShmRingBuffer, ShmRingBufferIO
from aiokvpipe.shm.ring import READER_SLOTS_OFF, SLOT_BYTES, SLOT_PARKED, SLOT_SPINNING


@pytest.fixture(autouse=True, scope="module")
def _tracker() -> None:
    shm_workers.start_resource_tracker()


def _loop_name() -> str:
    return "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"


async def _recv(conn: object, timeout: float = 30.0) -> object:
    """Connection.recv without blocking the loop."""
    from aiokvpipe.shm.threads import call_in_thread

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


async def test_nowait_calls_across_processes() -> None:
    # A writer process that never waits and a reader here that never waits:
    # every message arrives once, in order, whole, through a ring far smaller
    # than the traffic; then the reader learns the writer is gone.
    msgs: list[Any] = [b"%d" % i * (i % 7 + 1) for i in range(300)]
    msgs += [{"n": i} for i in range(50)] + [np.arange(40, dtype=np.int64)]
    with ShmRingBuffer(1, 512, 3) as ring:
        handle = ring.export_handle()
        with shm_workers.child(shm_workers.writer_nowait, handle, msgs) as (_, wconn):
            async with ShmRingBufferIO(ring, 0) as me:
                assert await _recv(wconn) == "attached"
                wconn.send("go")
                got: list[Any] = []
                deadline = time.monotonic() + 30
                while len(got) < len(msgs):
                    try:
                        got.append(me.dequeue_nowait())
                    except RingEmptyError:
                        assert time.monotonic() < deadline, f"stuck after {len(got)} messages"
                        await asyncio.sleep(0.0002)
                tag, refused = await _recv(wconn)  # type: ignore[misc]
                assert tag == "sent" and refused > 0, "the ring never filled: a weak test"
                with pytest.raises(WriterGoneError):
                    for _ in range(1000):  # the writer closes right after reporting
                        with contextlib.suppress(RingEmptyError):
                            me.dequeue_nowait()
                        await asyncio.sleep(0.005)
        assert got[:-1] == msgs[:-1]
        np.testing.assert_array_equal(got[-1], msgs[-1])


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


async def _fill_and_block(writer: ShmRingBufferIO, count: int) -> asyncio.Task[None]:
    """Fill the ring with ``count`` messages, then start one more enqueue,
    without a timeout (the default), that must park: a reader holds its chunk."""
    for i in range(count):
        await writer.enqueue(b"%d" % i, timeout=5)
    blocked = asyncio.create_task(writer.enqueue(b"%d" % count))
    await asyncio.sleep(0.1)
    assert not blocked.done(), "the writer should be parked on a full ring"
    return blocked


async def test_killed_reader_fails_a_blocked_writer_and_spares_the_others() -> None:
    with ShmRingBuffer(2, 128, 2) as ring:
        handle = ring.export_handle()
        with (
            shm_workers.child(shm_workers.reader_stall, handle, 0) as (victim, vconn),
            shm_workers.child(shm_workers.reader_until_gone, handle, 1) as (_, rconn),
        ):
            assert await _recv(vconn) == "attached"
            assert await _recv(rconn) == "attached"
            with ShmRingBufferIO(ring, -1) as writer:
                blocked = await _fill_and_block(writer, 2)
                started = time.monotonic()
                victim.kill()  # SIGKILL: its endpoint never says goodbye
                with pytest.raises(
                    ReaderGoneError, match=f"reader 0: pid {victim.pid} exited"
                ) as info:
                    await asyncio.wait_for(blocked, 5)
                elapsed = time.monotonic() - started
                assert info.value.rank == 0 and info.value.lagging_readers == (0,)
                assert isinstance(info.value, PeerClosedError)
                assert elapsed < 1.0, f"dead reader noticed after {elapsed:.3f} s"
            # The writer gave up and closed: the live reader got everything
            # published, then WriterGoneError; it was never stuck.
            assert await _recv(rconn) == [b"0", b"1"]


async def test_reader_that_closes_fails_a_blocked_writer_at_once() -> None:
    # No safety recheck for 30 s: only the reader's close can wake the writer.
    no_recheck = Backoff(20e-6, 30.0, 30.0)
    with (
        ShmRingBuffer(1, 128, 2) as ring,
        shm_workers.child(shm_workers.reader_stall, ring.export_handle(), 0) as (_, conn),
        ShmRingBufferIO(ring, -1, backoff=no_recheck) as writer,
    ):
        assert await _recv(conn) == "attached"
        blocked = await _fill_and_block(writer, 2)
        started = time.monotonic()
        conn.send("exit")  # the reader closes its endpoint and exits
        with pytest.raises(ReaderGoneError, match="reader 0: closed") as info:
            await asyncio.wait_for(blocked, 5)
        assert info.value.rank == 0
        assert time.monotonic() - started < 1.0
        # Later calls say so at once, whatever their timeout.
        with pytest.raises(ReaderGoneError):
            writer.enqueue_nowait(b"2")
        with pytest.raises(ReaderGoneError):
            await writer.enqueue(b"2", timeout=20)


class _CheckLate(ShmRingBufferIO):
    """A reader whose first peer check runs ``cue`` before it: the writer then
    publishes and goes right between the reader's last poll and that check."""

    cue: Callable[[], None] | None = None

    def _check_peer(self, reason: str | None, parking: bool = False) -> None:
        cue, self.cue = self.cue, None
        if cue is not None:
            cue()
        super()._check_peer(reason, parking)


@pytest.mark.parametrize(
    ("how", "call"),
    [("close", "dequeue"), ("hang", "dequeue"), ("close", "dequeue_nowait")],
    ids=["writer-closes", "writer-killed", "writer-closes-nowait"],
)
async def test_reader_gets_what_a_writer_published_right_before_it_went(
    how: str, call: str
) -> None:
    msgs: list[Any] = [b"last", b"x" * 300, {"final": True}]  # the middle one spans chunks
    with (
        ShmRingBuffer(1, 128, 8) as ring,
        shm_workers.child(shm_workers.writer_on_cue, ring.export_handle(), msgs) as (proc, wconn),
        _CheckLate(ring, 0) as reader,
    ):
        assert await _recv(wconn) == "attached"

        def cue() -> None:
            wconn.send(how)
            assert wconn.poll(30) and wconn.recv() == "sent"
            if how == "hang":
                proc.kill()
                proc.join(10)

        reader.cue = cue
        first = await reader.dequeue(timeout=10) if call == "dequeue" else reader.dequeue_nowait()
        assert reader.cue is None, "the writer went between the poll and the check"
        got = [first] + [await reader.dequeue(timeout=10) for _ in msgs[1:]]
        assert got == msgs
        with pytest.raises(WriterGoneError):
            await reader.dequeue(timeout=10)


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


# -- readers anticipating a writer process's rhythm ----------------------------

RHYTHM_GAP = 0.002  # the writer publishes a small message every 2 ms


def _slot_byte(ring: ShmRingBuffer, rank: int, field: int) -> int:
    return int(ring.header[READER_SLOTS_OFF + SLOT_BYTES * rank + field])


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("n_reader", "anticipate"),
    [(1, True), (2, True), (2, False)],
    ids=["1-reader", "2-readers", "2-readers-park"],
)
async def test_readers_follow_a_writer_process_rhythm(n_reader: int, anticipate: bool) -> None:
    loop, count = _loop_name(), 50
    expected = [shm_workers.rhythm_message(i) for i in range(count)]
    with ShmRingBuffer(n_reader, 256, 4) as ring:
        handle = ring.export_handle()
        with contextlib.ExitStack() as stack:
            _, wconn = stack.enter_context(
                shm_workers.child(shm_workers.writer_rhythm, handle, count, RHYTHM_GAP)
            )
            rconns = [
                stack.enter_context(
                    shm_workers.child(
                        shm_workers.reader_rhythm, handle, rank, loop, count, anticipate
                    )
                )[1]
                for rank in range(1, n_reader)
            ]
            async with ShmRingBufferIO(ring, 0, anticipate=anticipate) as me:
                assert await _recv(wconn) == "attached"
                for rconn in rconns:
                    assert await _recv(rconn) == "attached"
                wconn.send("go")
                mine = [await me.dequeue(timeout=30) for _ in range(count)]
                assert _slot_byte(ring, 0, SLOT_SPINNING) == 0, "the flag is down after each wait"
                assert _slot_byte(ring, 0, SLOT_PARKED) & 1 == 0
                learned = me._cadence is not None and me._cadence.window() is not None
                theirs = [await _recv(rconn) for rconn in rconns]
                assert await _recv(wconn) == "sent"
                wconn.send("exit")
        assert mine == expected
        assert learned == anticipate, "an anticipating reader learns the 2 ms rhythm"
        for got, their_learned, their_flag in theirs:  # type: ignore[misc]
            assert got == expected
            assert their_learned == anticipate
            assert their_flag == 0
        for rank in range(n_reader):
            assert _slot_byte(ring, rank, SLOT_SPINNING) == 0


@pytest.mark.timeout(90)
async def test_reader_cancelled_in_a_rhythm_keeps_its_place() -> None:
    count = 60
    expected = [shm_workers.rhythm_message(i) for i in range(count)]
    with (
        ShmRingBuffer(1, 256, 4) as ring,
        shm_workers.child(shm_workers.writer_rhythm, ring.export_handle(), count, RHYTHM_GAP) as (
            _,
            wconn,
        ),
    ):
        async with ShmRingBufferIO(ring, 0) as me:
            assert await _recv(wconn) == "attached"
            wconn.send("go")
            got = [await me.dequeue(timeout=30) for _ in range(10)]
            assert me._cadence is not None and me._cadence.window() is not None
            # Tiny deadlines: calls are cancelled between messages (every other
            # one aimed just past the opening of the window the reader spins in).
            aim = False
            while len(got) < count:
                tiny = 0.0005
                window = me._cadence.window()
                if aim and window is not None:
                    tiny = max(0.0001, window[0] + 0.0001 - time.monotonic())
                aim = not aim
                try:
                    got.append(await asyncio.wait_for(me.dequeue(timeout=30), tiny))
                except asyncio.TimeoutError:
                    assert _slot_byte(ring, 0, SLOT_SPINNING) == 0
                    assert _slot_byte(ring, 0, SLOT_PARKED) & 1 == 0
            assert got == expected, "no message lost, repeated or reordered"
            # The writer stopped but is still attached: the rhythm predicts the
            # next message, and every call is cancelled, before, in or after its window.
            for _ in range(8):
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(me.dequeue(timeout=30), 0.0005)
                assert _slot_byte(ring, 0, SLOT_SPINNING) == 0
                assert _slot_byte(ring, 0, SLOT_PARKED) & 1 == 0
            assert await _recv(wconn) == "sent"
            # Deadlines too: waits time out, not "writer gone", and lower the flag.
            for timeout in (0.0005, 0.0019, 0.003, 0.05):
                with pytest.raises(TransferTimeout) as info:
                    await me.dequeue(timeout=timeout)
                assert not isinstance(info.value, WriterGoneError)
                assert _slot_byte(ring, 0, SLOT_SPINNING) == 0
            extra = shm_workers.rhythm_message(count)
            wconn.send(extra)
            assert await me.dequeue(timeout=30) == extra, (
                "the next message, after all those cancels"
            )
            assert await _recv(wconn) == "sent"
            wconn.send("exit")
            with pytest.raises(WriterGoneError):
                await me.dequeue(timeout=10)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("gap", [0.0, 60e-6, 0.002], ids=["back-to-back", "60us", "2ms"])
async def test_take_in_the_doorbell_callback_loses_no_wakeup_across_processes(gap: float) -> None:
    """``wait_readable(take=...)`` against a writer process: every chunk arrives,
    in order, through the callback or the task, and only a ring can end a park
    (a 30 s safety interval: a lost wake-up shows as a timeout), including
    the re-announced parks of ``keep`` between messages. Gaps around the
    20 us spin make the ring race the park."""
    import pickle

    count = 300 if gap < 1e-3 else 60
    expected = [shm_workers.rhythm_message(i) for i in range(count)]
    no_safety_net = Backoff(spin_seconds=20e-6, initial_sleep=30.0, max_sleep=30.0)
    with (
        ShmRingBuffer(1, 256, 4) as ring,
        shm_workers.child(shm_workers.writer_rhythm, ring.export_handle(), count, gap) as (
            _,
            wconn,
        ),
    ):
        async with ShmRingBufferIO(ring, 0, backoff=no_safety_net, anticipate=False) as me:
            assert await _recv(wconn) == "attached"
            wconn.send("go")
            got: list[Any] = []
            in_callback = 0

            def take(buf: memoryview) -> None:
                got.append(pickle.loads(buf))

            def keep() -> bool:  # stay parked in the callback between messages
                return len(got) < count

            while len(got) < count:
                if not me.read_chunk_nowait(take):
                    in_callback += await me.wait_readable(timeout=20, take=take, keep=keep)
            assert got == expected
            assert _slot_byte(ring, 0, SLOT_PARKED) & 1 == 0
            assert await _recv(wconn) == "sent"
            wconn.send("exit")
        if gap >= 1e-3:
            assert in_callback > 0, "2 ms apart, a parked reader is woken by the ring"
