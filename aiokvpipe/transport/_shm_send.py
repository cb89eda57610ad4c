"""The shm transport's sending end: frames copied into the ring, in order.

One writer task copies queued messages chunk after chunk. A small message
(one chunk) submitted while that task is idle is copied inside ``submit``
itself, through the ring's ``write_chunk_nowait``, which never awaits and
lends no guarded view: waking the task would cost a loop iteration, and the
view accounting of ``acquire_write`` (two coroutines, a PickleBuffer) a few
cold microseconds, a good part of a 4 KiB message's latency. When no chunk
is free the message goes to the writer task, which waits for one.

When the writer task falls behind, the small messages queued behind the one
it writes share its chunk (whole frames only, see ``_shm_setup.record_end``):
a ring of a few 2 MiB chunks would otherwise hold a few 4 KiB messages in
flight, and every one would cost a chunk hand-off. A message written at once
still goes alone, so this adds no latency: only a backlog is packed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

import torch

from .._timeouts import deadline
from ..errors import AiokvpipeError, HandleError, PipeClosedError
from ..loop_turns import yield_turn
from ..shm.io import ShmRingBufferIO
from ..tensors import byte_view
from ..wire import HEADER_SIZE, FrameHeader, FrameKind, message_charge
from ._shm_setup import (
    END_MARK,
    HEADER_SLOT,
    SLICE_SECONDS,
    encode_handle,
    record_end,
    recv_control,
    send_control,
    translate_error,
)
from .base import Link, OutgoingMessage, SendChannel

_perf_counter = time.perf_counter


class ShmSendChannel(SendChannel):
    """Copies frames into the ring in order, from one background task."""

    def __init__(self, link: Link, io: ShmRingBufferIO, piece: int) -> None:
        self._link = link
        self._sock = link.sock
        self._fd = link.sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._io = io
        self._piece = piece
        self._pending: deque[OutgoingMessage] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._idle = asyncio.Event()  # set up, and every submitted message copied
        self._error: BaseException | None = None
        self._closed = False
        self._torn_down = False
        self._watching = False
        self._next_seq = 0
        self._slice_end = 0.0  # when the writer task should next yield to the loop
        self._task = asyncio.ensure_future(self._run())

    # -- SendChannel -------------------------------------------------------
    @property
    def error(self) -> BaseException | None:
        return self._error

    def submit(self, message: OutgoingMessage) -> None:
        if self._refused(message, self._closed, self._link.describe):
            return
        self._next_seq = message.header.seq + 1
        if self._idle.is_set() and self._write_now(message):
            return
        self._pending.append(message)
        self._idle.clear()
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def aclose(self, graceful: bool = True) -> None:
        if not self._closed:
            self._closed = True
            try:
                if graceful and self._error is None:
                    # Bounded: a receiver that stopped reading must not hang close().
                    with contextlib.suppress(AiokvpipeError, OSError):
                        async with deadline(
                            self._link.config.close_timeout, lambda: f"{self._link.describe}: close"
                        ):
                            await self._write_close_frame()
            finally:
                self._teardown(PipeClosedError(f"{self._link.describe}: pipe closed"))
        await asyncio.wait([self._task])

    async def _write_close_frame(self) -> None:
        """CLOSE in the ring, after every message (and after set-up finished)."""
        await self._idle.wait()  # from here the writer task is parked: the ring is ours
        if self._error is None:
            await self._write(FrameHeader(FrameKind.CLOSE, self._next_seq), None)

    # -- the writer task ---------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._handshake()
            while True:
                if not self._pending:
                    self._idle.set()
                    self._wakeup = self._loop.create_future()
                    await self._wakeup
                    self._slice_end = _perf_counter() + SLICE_SECONDS
                    continue
                message = self._pending[0]
                if message.header.nbytes <= self._piece and _on_cpu(message.tensor):
                    await self._write_packed()
                    continue
                await self._write(message.header, message.tensor)
                self._pending.popleft()
                if not message.done.done():
                    message.done.set_result(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(translate_error(exc, self._link.describe), exc)

    async def _handshake(self) -> None:
        """Send the ring's handle, wait until the receiver attached, drop the name."""
        what = self._link.describe
        async with deadline(
            self._link.config.connect_timeout, lambda: f"{what}: waiting for the shm receiver"
        ):
            await send_control(self._sock, {"ring": encode_handle(self._io.export_handle())}, what)
            answer = await recv_control(self._sock, what)
        if answer.get("attached") is not True:
            reason = answer.get("error", "no reason given")
            raise HandleError(f"{what}: the receiver could not attach the ring: {reason}")
        self._io.buffer.unlink()
        self._loop.add_reader(self._fd, self._on_readable)
        self._watching = True

    def _write_now(self, message: OutgoingMessage) -> bool:
        """Copy a one-chunk message inside ``submit`` if a chunk is free right now.

        Only while the writer task is idle (so order holds and the ring
        endpoint is not in use); saves the loop iteration that waking the
        task would cost, which is a good part of a small message's latency.
        """
        header, tensor = message.header, message.tensor
        if header.nbytes > self._piece or not _on_cpu(tensor):
            return False
        try:
            written = self._io.write_chunk_nowait(lambda buf: self._fill_first(buf, header, tensor))
        except Exception as exc:
            self._fail(translate_error(exc, self._link.describe), exc)
            message.done.set_exception(self._error or exc)
            return True
        if written:
            message.done.set_result(None)
        return written

    def _fill_first(self, buf: memoryview, header: FrameHeader, tensor: torch.Tensor | None) -> int:
        """Header slot and the payload's first piece; returns the payload bytes copied."""
        n = min(header.nbytes, self._piece)
        _end_records(buf, _put_frame(buf, 0, header, tensor, n))
        return n

    async def _write_packed(self) -> None:
        """The first pending message and the whole small ones queued behind it, in one chunk.

        Each is done once the chunk is published; the messages stay queued
        until then, so a failure meanwhile fails them all (none was sent).
        The receiver's window holds whatever a chunk packs (it takes a packed
        chunk frame by frame, as its queue has room); a chunk still packs at
        most a chunk's worth of queue charge (payload plus per-message
        bookkeeping), which bounds the messages one publish completes at once
        (about 1 800 ``None`` frames in a 2 MiB chunk, not 8 000).
        """
        pending, cap = self._pending, self._piece + HEADER_SLOT
        await self._pace()
        batch: list[OutgoingMessage] = []
        async with self._io.acquire_write() as buf:
            pos = charge = 0
            for message in pending:
                header, tensor = message.header, message.tensor
                charge += message_charge(header.nbytes)
                end = pos + HEADER_SLOT + header.nbytes
                if batch and (end > cap or charge > cap or not _on_cpu(tensor)):
                    break
                pos = _put_frame(buf, pos, header, tensor, header.nbytes)
                batch.append(message)
            _end_records(buf, pos)
        for message in batch:
            if pending and pending[0] is message:
                pending.popleft()
            if not message.done.done():
                message.done.set_result(None)

    async def _write(self, header: FrameHeader, tensor: torch.Tensor | None) -> None:
        """Copy one frame into consecutive chunks (header slot first)."""
        if not _on_cpu(tensor):
            from ..cuda.staging import to_host  # lazy: only GPU users pay for it

            assert tensor is not None
            tensor = await to_host(tensor)
        total, piece, io = header.nbytes, self._piece, self._io
        await self._pace()
        async with io.acquire_write() as buf:
            sent = self._fill_first(buf, header, tensor)
        if sent == total:
            return
        assert tensor is not None
        payload = byte_view(tensor)
        while sent < total:
            await self._pace()
            n = min(total - sent, piece)
            async with io.acquire_write() as buf:
                buf[:n] = payload[sent : sent + n]
                sent += n

    async def _pace(self) -> None:
        """Yield to the loop once this slice of copying is used up."""
        if _perf_counter() >= self._slice_end:
            await yield_turn()  # three turns: a task a timer woke runs before our next slice
            self._slice_end = _perf_counter() + SLICE_SECONDS

    # -- failure -----------------------------------------------------------
    def _on_readable(self) -> None:
        """The receiver never writes after set-up: readable means EOF (or a bug)."""
        news = self._receiver_spoke(self._sock, self._link.describe)
        if news is not None:
            self._fail(news[0], news[1])

    def _fail(self, error: BaseException, cause: BaseException | None = None) -> None:
        if self._error is not None or self._torn_down:
            return
        if cause is not None and cause is not error and error.__cause__ is None:
            error.__cause__ = cause
        self._error = error
        self._teardown(error)

    def _teardown(self, error: BaseException) -> None:
        """Stop the writer, fail what it did not copy, free ring and socket. Once."""
        if self._torn_down:
            return
        self._torn_down = True
        if self._task is not asyncio.current_task():
            # It is parked at an await, never inside a copy: the tensors it
            # would read are untouched from here on, so failing them is safe.
            self._task.cancel()
        failed, self._pending = list(self._pending), deque()
        for message in failed:
            if not message.done.done():
                message.done.set_exception(error)
        if self._watching:
            self._watching = False
            self._loop.remove_reader(self._fd)
        self._io.close()  # unmaps; unlinks the name if the receiver never attached
        self._sock.close()
        self._idle.set()


def _put_frame(
    buf: memoryview, pos: int, header: FrameHeader, tensor: torch.Tensor | None, n: int
) -> int:
    """A frame's header at ``pos`` and ``n`` payload bytes after its slot;
    returns where the next frame would start."""
    buf[pos : pos + HEADER_SIZE] = header.encode()
    start = pos + HEADER_SLOT
    if n and tensor is not None:
        buf[start : start + n] = byte_view(tensor)[:n]
    return record_end(start + n)


def _end_records(buf: memoryview, pos: int) -> None:
    """Mark the chunk's last record (stale bytes after it could look like one)."""
    if pos + HEADER_SLOT <= len(buf):
        buf[pos : pos + len(END_MARK)] = END_MARK


def _on_cpu(tensor: torch.Tensor | None) -> bool:
    return tensor is None or tensor.device.type == "cpu"
