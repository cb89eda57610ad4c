"""The shm transport's own behaviour (the conformance and fault suites run it too).

Choosing it, refusing it across hosts, leaving nothing in ``/dev/shm``, a
peer killed by SIGKILL on either side of the ring, and costing ~no CPU idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SHM_PREFIXES, free_port
from transport_conformance import assert_all_same, assert_same, opened, pipe_factory, tagged

from aiokvpipe import ConfigError, PeerClosedError, PipeConfig, TransferTimeout, rendezvous
from aiokvpipe.backoff import Backoff
from aiokvpipe.errors import HandleError, ProtocolError, WriterGoneError
from aiokvpipe.pipe import Pipe
from aiokvpipe.shm import ShmRingBuffer
from aiokvpipe.shm.ring import (
    CREATOR_OFF,
    IDENTITY,
    LAYOUT_MAGIC,
    READER_SLOTS_OFF,
    SLOT_PARKED,
)
from aiokvpipe.transport import shm as shm_transport
from aiokvpipe.transport._shm_setup import decode_handle, encode_handle, ring_geometry

SHM = pipe_factory("shm")
MiB = 1 << 20


def shm_names() -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIXES))


def rings_created_by(pids: set[int]) -> list[str]:
    """The ring names in ``/dev/shm`` whose creator is one of ``pids``.

    Other engineers' suites create and remove rings in the same ``/dev/shm``
    at the same time, so a test that counts every name fails on theirs.
    """
    found = []
    for name in shm_names():
        try:
            with open(os.path.join("/dev/shm", name), "rb") as f:
                head = f.read(CREATOR_OFF + IDENTITY.size)
        except OSError:
            continue  # removed meanwhile, or not ours to read
        if head[:8] == LAYOUT_MAGIC and len(head) == CREATOR_OFF + IDENTITY.size:
            if IDENTITY.unpack_from(head, CREATOR_OFF)[0] in pids:
                found.append(name)
    return found


# --------------------------------------------------------------------- choosing it


@pytest.mark.timeout(15)
async def test_auto_picks_shm_on_one_host_and_leaves_no_name() -> None:
    before = rings_created_by({os.getpid()})
    async with opened(pipe_factory("auto")) as (a, b):
        assert (a.send_transport, a.recv_transport) == ("shm", "shm")
        assert (b.send_transport, b.recv_transport) == ("shm", "shm")
        assert "send=shm->1" in repr(a)
        items = [tagged(1), None, torch.ones(3 * MiB, dtype=torch.uint8)]
        for item in items:
            await a.send(item)
        assert_all_same([await b.recv() for _ in items], items)
        # Both rings are mapped and working, yet no name is left to leak
        # (only this process's count: other test processes make rings too).
        assert rings_created_by({os.getpid()}) == before


@pytest.mark.timeout(15)
async def test_forced_shm_across_hosts_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    hosts = iter(range(1000))
    monkeypatch.setattr(rendezvous, "host_identity", lambda: f"host-{next(hosts)}")
    with pytest.raises(ConfigError, match="needs both ranks on one host") as info:
        await SHM()
    assert info.value.field == "transport"


@pytest.mark.timeout(15)
async def test_a_receiver_that_cannot_attach_fails_both_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise HandleError("no shared-memory ring named 'aiokv_x' (a test refuses)")

    monkeypatch.setattr(shm_transport.ShmRingBufferIO, "attach", refuse)
    port = free_port()
    configs = [PipeConfig(rank=r, port=port, transport="shm", connect_timeout=10) for r in (0, 1)]
    results = await asyncio.gather(*(Pipe.connect(c) for c in configs), return_exceptions=True)
    for result in results:
        assert isinstance(result, HandleError), result
        assert "a test refuses" in str(result)


# --------------------------------------------------------------------- set-up pieces


def test_ring_geometry_fits_cache_and_window() -> None:
    assert ring_geometry(1 << 30) == (2 * MiB, 4)  # 8 MiB ring: stays in the L3
    assert ring_geometry(3 * MiB) == (512 << 10, 6)
    assert ring_geometry(4096) == (256 << 10, 4)  # never below 1 MiB
    for window in (1, 4096, 3 * MiB, 1 << 40):
        piece, chunks = ring_geometry(window)
        assert piece & (piece - 1) == 0 and chunks >= 4


def test_handle_round_trip_and_refusals() -> None:
    with ShmRingBuffer(1, 4096 + 256, 4) as ring:
        handle = ring.export_handle()
        assert decode_handle(encode_handle(handle), "test") == handle
        for bad in (
            {**encode_handle(handle), "name": "../../etc/passwd"},
            {**encode_handle(handle), "name": "aiokv_/x"},
            {**encode_handle(handle), "n_reader": 2},
            {**encode_handle(handle), "max_chunk_bytes": 100},
            {**encode_handle(handle), "token": "zz"},
            {**encode_handle(handle), "max_chunks": True},
            {"name": handle.name},
            None,
        ):
            with pytest.raises(ProtocolError):
                decode_handle(bad, "test")
        with pytest.raises(HandleError, match="layout version"):
            decode_handle({**encode_handle(handle), "version": 99}, "test")


def test_unlink_drops_the_name_and_keeps_both_mappings() -> None:
    ring = ShmRingBuffer(1, 4096, 4)
    peer = ShmRingBuffer.attach(ring.export_handle())
    try:
        assert ring.name in shm_names()
        peer.unlink()  # attachers never unlink
        assert ring.name in shm_names()
        ring.unlink()
        ring.unlink()  # idempotent
        assert ring.name not in shm_names()
        ring.chunks[1][:5] = b"still"
        assert bytes(peer.chunks[1][:5]) == b"still"
        with pytest.raises(HandleError, match="no shared-memory ring"):
            ShmRingBuffer.attach(ring.export_handle())
    finally:
        peer.close()
        ring.close()  # the name is gone already: close only unmaps
        ring.close()


# --------------------------------------------------------------------- a peer killed

PEER = r"""
import asyncio, sys
import torch
from aiokvpipe import PipeConfig
from aiokvpipe.pipe import Pipe

async def main(rank, port, mode, ready):
    cfg = PipeConfig(
        rank=rank, port=port, transport="shm", connect_timeout=30, buffer_bytes=1 << 20
    )
    pipe = await Pipe.connect(cfg)
    await pipe.send(torch.arange(10))
    await pipe.flush()
    if mode == "mid-frame":  # the survivor stopped reading: this stalls halfway
        await pipe.send(torch.ones(1 << 20, dtype=torch.uint8))
        await pipe.send(torch.ones(64 << 20, dtype=torch.uint8))
        await asyncio.sleep(0.5)
    open(ready, "w").close()
    await asyncio.sleep(3600)  # never reads: our receiver's ring fills up

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]))
"""


@contextlib.asynccontextmanager
async def peer_process(
    rank: int, mode: str, tmp_path: Path
) -> AsyncIterator[tuple[Pipe, subprocess.Popen[bytes]]]:
    """The other rank in a child process (``rank`` is the child's); ours is yielded."""
    port = free_port()
    ready = tmp_path / "ready"
    # fork/exec returns at once; nothing below blocks on the child while it runs
    proc = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-c", PEER, str(rank), str(port), mode, str(ready)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    survivor: Pipe | None = None
    try:
        config = PipeConfig(
            rank=1 - rank, port=port, transport="shm", connect_timeout=30, buffer_bytes=1 << 20
        )
        survivor = await asyncio.wait_for(Pipe.connect(config), 40)
        assert_same(await asyncio.wait_for(survivor.recv(), 10), torch.arange(10))
        for _ in range(400):
            if ready.exists() or proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert ready.exists(), "the peer never got ready"
        yield survivor, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
        if survivor is not None:
            with contextlib.suppress(PeerClosedError, TransferTimeout):
                await survivor.aclose()


async def fill_the_ring(pipe: Pipe) -> list[Any]:
    """Send until nothing more is taken: the peer's ring and queue are full."""
    transfers = []
    for i in range(200):
        try:
            transfers.append(await pipe.send(torch.full((MiB,), i, dtype=torch.uint8), timeout=0.3))
        except TransferTimeout:
            return transfers
    raise AssertionError("the peer kept reading")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("child_rank", [0, 1])
async def test_sigkill_either_side_fails_the_survivor_within_a_second(
    child_rank: int, tmp_path: Path
) -> None:
    """The child is the writer of one ring and the reader of the other: killed,
    both our parked reader and our parked writer fail at once; no name remains."""
    async with peer_process(child_rank, "idle", tmp_path) as (pipe, proc):
        pids = {os.getpid(), proc.pid}
        assert rings_created_by(pids) == []  # set up: the names are gone already
        await fill_the_ring(pipe)
        pending_recv = asyncio.ensure_future(pipe.recv())  # parked on the child's ring
        pending_flush = asyncio.ensure_future(pipe.flush())  # writer parked on a full ring
        await asyncio.sleep(0.2)
        assert not pending_recv.done() and not pending_flush.done()
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        for name, fut in (("recv", pending_recv), ("flush", pending_flush)):
            with pytest.raises(PeerClosedError):
                await asyncio.wait_for(fut, 5)
            assert time.monotonic() - killed < 1.0, f"{name} noticed the dead peer too late"
        with pytest.raises(PeerClosedError):
            await pipe.send(tagged(1))
    assert rings_created_by(pids) == []


@pytest.mark.timeout(60)
async def test_writer_killed_mid_message_delivers_what_came_then_says_mid_frame(
    tmp_path: Path,
) -> None:
    async with peer_process(0, "mid-frame", tmp_path) as (pipe, proc):
        # Our receive queue (1 MiB) is full, so the child stalled inside 64 MiB.
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert_same(await pipe.recv(), torch.ones(MiB, dtype=torch.uint8))
        with pytest.raises(PeerClosedError, match=r"mid-frame after \d+ of 67108864"):
            await asyncio.wait_for(pipe.recv(), 5)
        assert time.monotonic() - killed < 1.0


@pytest.mark.timeout(15)
async def test_writer_gone_is_declared_only_after_draining_the_ring() -> None:
    """The ring can see "writer gone" just after a poll that missed a chunk the
    writer published before leaving: the receiver drains before it gives up.

    White-box: the reader endpoint's poll is made to miss once and its
    liveness check to report the writer gone once, in that order.
    """
    async with opened(SHM) as (a, b):
        io: Any = b._receiver._io  # type: ignore[attr-defined]
        real_poll, real_check = io._poll_readable, io._check_peer
        armed = gone = False

        def poll() -> int | None:
            return None if armed else real_poll()

        def check(reason: str | None, parking: bool = False) -> None:
            nonlocal armed, gone
            if armed:
                armed, gone = False, True
            if gone:  # as a real close or exit, "gone" stays gone
                raise WriterGoneError("simulated: the writer left between poll and check")
            real_check(reason, parking)

        io._poll_readable, io._check_peer = poll, check
        await a.send(tagged(0))
        assert_same(await b.recv(), tagged(0))  # the reader waits again, patched
        await asyncio.sleep(0.1)  # parked
        armed = True
        await a.send(tagged(1))
        assert_same(await asyncio.wait_for(b.recv(), 5), tagged(1))
        with pytest.raises(PeerClosedError, match="without closing"):
            await asyncio.wait_for(b.recv(), 5)


# --------------------------------------------------------------------- idle cost


@pytest.mark.timeout(20)
async def test_idle_receivers_cost_almost_no_cpu() -> None:
    async with opened(SHM) as (a, b):
        await a.send(tagged(1))
        assert_same(await b.recv(), tagged(1))  # both ends set up and warm
        waiting = [asyncio.ensure_future(p.recv()) for p in (a, b)]
        await asyncio.sleep(0.1)  # past the spin: parked on the doorbells
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.sleep(2.0)
        used = (time.process_time() - cpu) / (time.monotonic() - wall)
        assert not any(w.done() for w in waiting)
        assert used < 0.05, f"two idle receivers used {used:.1%} of a core"
        await a.send(tagged(2))
        await b.send(tagged(3))
        assert_all_same(await asyncio.gather(*waiting), [tagged(3), tagged(2)])


# --------------------------------------------------------------------- parked receivers


@pytest.mark.timeout(30)
async def test_parked_receivers_get_every_kind_of_frame_from_the_doorbell_callback() -> None:
    """A receiver that always parks (anticipate=False), messages apart: every
    ring is served in the doorbell's callback, which takes the chunk itself (a
    header-only None, a small tensor, the first piece of a multi-chunk one, the
    CLOSE frame) and, between messages, stays parked (no task wake-up); all
    arrive intact and in order, and close is seen."""
    piece, _ = ring_geometry(1 << 20)
    messages = [tagged(0), None, torch.arange(3 * piece // 8 + 5, dtype=torch.int64), tagged(3)]
    async with opened(SHM, buffer_bytes=1 << 20, anticipate=False) as (a, b):
        receiver: Any = b._receiver  # type: ignore[attr-defined]
        io = receiver._io
        io._backoff = Backoff(spin_seconds=20e-6, initial_sleep=30.0, max_sleep=30.0)
        real = io._hand_over
        in_callback = 0
        kinds: set[int] = set()  # which of the messages came through the callback
        waits = 0
        real_wait = io.wait_readable

        def counted(idx: int, take: Any) -> None:
            nonlocal in_callback
            # A message's first chunk, taken while the reader task waits (holding
            # the endpoint): in the callback. (Later pieces may be either.)
            if io._busy and receiver._dest is None:
                in_callback += 1
                kinds.add(receiver._expected_seq % len(messages))
            real(idx, take)

        async def wait_readable(*args: Any) -> bool:
            nonlocal waits
            waits += 1
            return await real_wait(*args)

        io._hand_over, io.wait_readable = counted, wait_readable
        word = (READER_SLOTS_OFF + SLOT_PARKED) // 4
        for round_ in range(3):
            for m in messages:
                waiting = asyncio.ensure_future(b.recv())
                for _ in range(5000):  # until b's reader parks
                    if io.buffer.header_words[word] & 1:
                        break
                    await asyncio.sleep(0.001)
                await a.send(m)
                assert_same(await asyncio.wait_for(waiting, 5), m, f"round {round_}")
        # Every kind of frame came through the callback (a stale ring, queued
        # while the reader was awake, may wake it just before a message: then
        # the task takes that one), and the reader task woke mostly for the
        # multi-chunk message: fewer waits than messages.
        assert kinds == set(range(len(messages)))
        assert in_callback >= 2 * len(messages)
        assert waits < 3 * len(messages)
        waiting = asyncio.ensure_future(b.recv())
        await asyncio.sleep(0.01)
        await a.aclose()
        with pytest.raises(PeerClosedError, match="peer closed"):
            await asyncio.wait_for(waiting, 5)


@pytest.mark.timeout(60)
async def test_an_anticipating_receiver_rehearses_the_take_without_touching_the_stream() -> None:
    """With a rhythm learned, the receiver rehearses the take of the next
    message when its window opens (decode, allocate, the first steps of
    sending it on) for tensor messages up to 64 KiB; a rehearsal after any
    kind of last message (None, empty, 2-D, bf16, too large to rehearse)
    changes nothing the stream depends on, and every message arrives
    intact and in order."""
    kinds: list[torch.Tensor | None] = [
        tagged(0),
        None,
        torch.empty(0, dtype=torch.int32),
        torch.arange(12, dtype=torch.int64).reshape(3, 4),
        torch.ones(7, dtype=torch.bfloat16),
        torch.zeros(80 * 1024, dtype=torch.uint8),  # above the rehearsal's limit
    ]
    async with opened(SHM, anticipate=True) as (a, b):
        receiver: Any = b._receiver  # type: ignore[attr-defined]
        real = receiver._rehearse
        rehearsed = 0

        def counted() -> None:
            nonlocal rehearsed
            rehearsed += 1
            real()

        receiver._rehearse = counted
        for i in range(60):
            m = kinds[i % len(kinds)] if i >= 30 else tagged(i)
            await a.send(m)
            assert_same(await asyncio.wait_for(b.recv(), 5), m, f"message {i}")
            # A rehearsal right now, after this kind: no state the stream uses moves.
            state = (receiver._expected_seq, len(receiver._ready), receiver._queued_bytes)
            real()
            assert (receiver._expected_seq, len(receiver._ready), receiver._queued_bytes) == state
            await asyncio.sleep(0.003)
        assert rehearsed > 0, "a steady rhythm never opened a window"
