"""The shm transport's receiving end: frames copied out of the ring, in order.

A reader task takes chunk after chunk and copies each payload once, out of
the ring into a tensor of its own (warm blocks from a RecvBufferPool), so a
chunk is free for the sender again as soon as it is copied, however long
the consumer keeps the tensor. A chunk holds one frame's header and payload
(or the next piece of a large payload), or several whole small frames that
the sender packed while it had a backlog.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import torch

from ..bufpool import RecvBufferPool
from ..errors import (
    MalformedFrameError,
    PeerClosedError,
    PipeClosedError,
    ProtocolError,
    TransferTimeout,
)
from ..loop_turns import yield_turn
from ..shm.io import ShmRingBufferIO
from ..tensors import empty_for, rehearse_receive
from ..wire import HEADER_SIZE, MAGIC, FrameHeader, FrameKind, decode_header, message_charge
from ._shm_setup import HEADER_SLOT, SLICE_SECONDS, record_end, translate_error
from ._waiters import WaiterSet
from .base import Link, RecvChannel

_POOL_MAX = 256 << 20  # idle receive blocks kept for reuse
_SUSPENDED = 20e-6  # an acquire that took longer than this let the loop run
_perf_counter = time.perf_counter


class _QueueFull(Exception):
    """A packed chunk's take stopped between frames: the queue is full."""


class ShmRecvChannel(RecvChannel):
    """Copies frames out of the ring into a bounded queue of ready tensors.

    A reader task takes chunk after chunk; it stops taking while
    ``buffer_bytes`` of received tensors wait for ``recv``, so a slow
    consumer fills the ring and the sender waits (parked, not spinning).
    """

    def __init__(self, link: Link, io: ShmRingBufferIO, piece: int) -> None:
        self._link = link
        self._sock = link.sock
        self._fd = link.sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._io = io
        self._piece = piece
        self._limit = link.config.buffer_bytes
        self._max_frame_bytes = link.config.max_frame_bytes
        self._ready: deque[tuple[torch.Tensor | None, int]] = deque()  # (tensor, charge)
        self._queued_bytes = 0
        self._waiters = WaiterSet()
        self._space: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._stopped = False  # no more frames will be delivered
        self._eof = False  # the link socket hit EOF: drain what is published, then stop
        self._in_acquire = False  # the reader task is waiting for a chunk
        self._parked = 0  # recv() callers waiting for a message
        self._expected_seq = 0
        # The payload being gathered across chunks (state survives a restarted task).
        self._dest: memoryview | None = None
        self._dest_tensor: torch.Tensor | None = None
        self._got = 0
        self._resume_at = 0  # where the next take of a packed chunk starts (see _take_frames)
        self.pool = RecvBufferPool(min(link.config.buffer_bytes, _POOL_MAX))
        self._last_header: FrameHeader | None = None  # what _rehearse rehearses
        self._loop.add_reader(self._fd, self._on_readable)
        self._watching = True
        self._task = asyncio.ensure_future(self._run())

    @property
    def error(self) -> BaseException | None:
        return self._error

    # -- RecvChannel -------------------------------------------------------
    async def recv(self) -> torch.Tensor | None:
        while True:
            if self._closed:
                raise PipeClosedError(f"{self._link.describe}: pipe closed")
            if self._ready:
                tensor, charge = self._ready.popleft()
                self._queued_bytes -= charge
                space = self._space
                if space is not None and not space.done() and self._queued_bytes < self._limit:
                    space.set_result(None)
                return tensor
            if self._error is not None:
                raise self._error
            self._parked += 1
            try:
                await self._waiters.wait()
            finally:
                self._parked -= 1

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = self._stopped = True
            self._task.cancel()
            self._unwatch()
            self._ready.clear()
            self._wake()
            self._io.close()  # also wakes (and fails) a parked read
            self.pool.close()
            self._sock.close()
        await asyncio.wait([self._task])

    # -- the reader task ---------------------------------------------------
    async def _run(self, after: asyncio.Task[None] | None = None) -> None:
        if after is not None:
            await asyncio.wait([after])  # the ring endpoint serves one task at a time
        self._in_acquire = False
        io, slice_end = self._io, 0.0
        gone: BaseException | None = None  # why the writer is known to be gone
        try:
            while not self._stopped:
                if self._queued_bytes >= self._limit:
                    self._space = self._loop.create_future()
                    await self._space
                    slice_end = _perf_counter() + SLICE_SECONDS
                    continue
                start = _perf_counter()
                if start >= slice_end:  # a long copy must not freeze the loop
                    await yield_turn()
                    start = _perf_counter()
                    slice_end = start + SLICE_SECONDS
                try:
                    if not io.read_chunk_nowait(self._take):
                        # Once the peer is gone, a zero timeout: take what is
                        # published, never wait. A parked wait ended by the
                        # writer's ring takes the chunk in the doorbell's fd
                        # callback: a recv() it completes runs in the loop's
                        # next turn, before this task's.
                        self._in_acquire = True
                        took = await io.wait_readable(
                            0 if self._eof else None, self._take, self._keep_parked, self._rehearse
                        )
                        self._in_acquire = False
                        now = _perf_counter()
                        if now - start > _SUSPENDED:  # waited: the loop ran meanwhile
                            slice_end = now + SLICE_SECONDS
                        if took:
                            continue
                        if not io.read_chunk_nowait(self._take):
                            continue
                    if self._parked and self._dest is None:
                        # A recv() is parked on what was just delivered: let it
                        # run before this task goes back to waiting on the ring,
                        # whose spin yields the CPU (sched_yield) first. Measured
                        # 7-15 us off a 4 KiB round trip, same run, interleaved.
                        await asyncio.sleep(0)
                        slice_end = _perf_counter() + SLICE_SECONDS
                except _QueueFull:  # the chunk stays unread until recv() makes room
                    self._in_acquire = False
                except PeerClosedError as exc:
                    # The ring's writer closed or died. It may have published a
                    # last chunk between the ring's poll and its liveness
                    # check, so drain before calling the stream cut.
                    if self._eof:
                        raise
                    self._eof, gone = True, exc
        except asyncio.CancelledError:
            raise
        except (TransferTimeout, PeerClosedError) as exc:  # drained: nothing more was published
            self._lost(gone or exc)
        except Exception as exc:
            self._stop(translate_error(exc, self._link.describe))
        finally:
            self._in_acquire = False

    def _keep_parked(self) -> bool:
        """After a chunk taken in the doorbell callback: may the next one be
        taken there too? Not mid-message (the task streams the rest without
        a ring per chunk), nor once the queue is full or the stream ended."""
        return self._dest is None and self._queued_bytes < self._limit and not self._stopped

    def _take(self, buf: memoryview) -> None:
        """Consume one chunk: frames (a header and payload each) or a payload piece."""
        dest = self._dest
        if dest is None:
            self._take_frames(buf)
            return
        got = self._got
        n = min(len(dest) - got, self._piece)
        dest[got : got + n] = buf[:n]
        got += n
        if got < len(dest):
            self._got = got
        else:
            done, self._dest, self._dest_tensor, self._got = self._dest_tensor, None, None, 0
            self._deliver(done, got)

    def _take_frames(self, buf: memoryview) -> None:
        """The frames of a chunk, from where the last take of it stopped.

        A packed chunk may hold more than the queue has room for: the take
        then stops between two frames and raises _QueueFull, which leaves the
        chunk unread in the ring; once ``recv`` made room, the next take of
        it goes on from the frame after the last one delivered.
        """
        pos, self._resume_at = self._resume_at, 0
        while True:
            header = decode_header(
                buf[pos : pos + HEADER_SIZE],
                expected_seq=self._expected_seq,
                max_frame_bytes=self._max_frame_bytes,
            )
            self._expected_seq += 1
            self._last_header = header
            if header.kind is FrameKind.CLOSE:
                self._stop(PeerClosedError(f"{self._link.describe}: peer closed the pipe"))
                return
            start = pos + HEADER_SLOT
            if header.kind is FrameKind.NONE:
                self._deliver(None, 0)
                n = 0
            else:
                room = len(buf) - start
                if pos and header.nbytes > room:
                    raise MalformedFrameError(
                        f"{self._link.describe}: frame #{header.seq} of {header.nbytes} "
                        f"bytes at offset {pos} overruns its chunk ({room} bytes left): "
                        "only a chunk's first frame may continue in the next"
                    )
                tensor, dest = empty_for(header, self.pool)
                n = min(header.nbytes, room)
                if n:
                    dest[:n] = buf[start : start + n]
                if n < header.nbytes:
                    self._dest, self._dest_tensor, self._got = dest, tensor, n
                    return
                self._deliver(tensor, n)
            pos = record_end(start + n)
            if pos + HEADER_SLOT > len(buf) or buf[pos : pos + len(MAGIC)] != MAGIC:
                return  # the chunk's last frame
            if self._queued_bytes >= self._limit:
                self._resume_at = pos
                raise _QueueFull

    def _rehearse(self) -> None:
        """Run by the ring's wait when the window for the next message opens."""
        rehearse_receive(self._last_header, self._max_frame_bytes)

    def _deliver(self, tensor: torch.Tensor | None, nbytes: int) -> None:
        # Charged like the sender's window: a None costs its bookkeeping too,
        # so a flood of them stops the reader task instead of queueing forever.
        charge = message_charge(nbytes)
        self._ready.append((tensor, charge))
        self._queued_bytes += charge
        self._wake()

    # -- the link socket and failure -------------------------------------
    def _on_readable(self) -> None:
        """The sender never writes after set-up: readable means EOF (or a bug)."""
        try:
            data = self._sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""  # a broken connection: the peer is gone either way
        self._unwatch()
        if data:
            self._stop(ProtocolError(f"{self._link.describe}: sender sent unexpected bytes"))
            self._interrupt()
            return
        self._eof = True
        if self._in_acquire and not self._stopped:
            # Parked on the ring: restart the task in drain mode (zero timeout).
            old = self._task
            old.cancel()
            self._task = asyncio.ensure_future(self._run(after=old))

    def _interrupt(self) -> None:
        if self._in_acquire:
            self._task.cancel()

    def _lost(self, cause: BaseException) -> None:
        if self._dest is not None:
            what = f"connection lost mid-frame after {self._got} of {len(self._dest)} payload bytes"
        else:
            what = "peer disconnected without closing the pipe"
        error = PeerClosedError(f"{self._link.describe}: {what}")
        error.__cause__ = cause
        self._stop(error)

    def _stop(self, error: BaseException) -> None:
        if not self._stopped:
            self._stopped = True
            self._error = error
        self._wake()

    def _wake(self) -> None:
        self._waiters.wake_all()

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self._loop.remove_reader(self._fd)
