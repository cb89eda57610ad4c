"""CPU tensors over a TCP socket, with no copies on either side.

Sending is callback-driven, the way asyncio's own transports write, but
without their copy: :meth:`TcpSendChannel.submit` tries ``sendmsg`` at once
with the header and a view of the tensor's memory as a gather list, and only
if the kernel buffer is full does it register a writer callback to go on.
Nothing awaits per message, so small messages cost one syscall.

Receiving works like a :class:`asyncio.BufferedProtocol`, driven by a
reader callback: headers (and small payloads that arrive with them) are read
into one reusable staging buffer, while large payloads are read straight into
the destination tensor's memory by ``recv_into``. Reading pauses when
``buffer_bytes`` of received tensors wait for ``recv``, so a slow consumer
pushes back on the sender through TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from typing import Any

import torch

from .._timeouts import deadline
from ..bufpool import RecvBufferPool
from ..errors import (
    AiokvpipeError,
    PeerClosedError,
    PipeClosedError,
    ProtocolError,
    TransferTimeout,
)
from ..tensors import byte_view, empty_for
from ..wire import HEADER_SIZE, FrameHeader, FrameKind, decode_header
from .base import Link, OutgoingMessage, RecvChannel, SendChannel, Transport

_MAX_IOV = 64
# Loop latency: one callback stops after ~_SLICE_SECONDS of copying (time,
# not bytes: first-touch page faults can make a byte budget 20x slower).
_SLICE_SECONDS = 0.5e-3
_SEND_SLICE = 512 << 10  # most bytes handed to one send call
_READ_SLICE = 1 << 20  # most bytes one recv_into may take
_MIN_READ_SLICE = 64 << 10
_LOWAT_MAX = 1 << 20  # SO_RCVLOWAT while a large payload streams in
_STAGING = 256 << 10  # reusable read buffer for headers and small payloads


def _is_cpu(tensor: torch.Tensor | None) -> bool:
    return tensor is None or tensor.device.type == "cpu"


class TcpSendChannel(SendChannel):
    """Writes frames in order; completion = handed to the kernel."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self._sock = link.sock
        self._loop = asyncio.get_running_loop()
        self._fd = self._sock.fileno()
        # Queue of messages not yet turned into segments (staging pending),
        # and segments (memoryview, message completed by it or None).
        self._pending: deque[OutgoingMessage] = deque()
        self._staging: dict[int, asyncio.Future[torch.Tensor]] = {}
        self._segments: deque[tuple[memoryview, OutgoingMessage | None]] = deque()
        self._writer_registered = False
        self._pump_scheduled = False
        self._error: BaseException | None = None
        self._closed = False
        self._next_seq = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop.add_reader(self._fd, self._on_readable)

    # -- SendChannel -------------------------------------------------------
    @property
    def error(self) -> BaseException | None:
        return self._error

    def submit(self, message: OutgoingMessage) -> None:
        if self._error is not None:
            message.done.set_exception(self._error)
            return
        if self._closed:
            message.done.set_exception(PipeClosedError(f"{self._link.describe}: channel closed"))
            return
        self._next_seq = message.header.seq + 1
        self._idle.clear()
        if not _is_cpu(message.tensor):
            self._start_staging(message)
        self._pending.append(message)
        if not self._writer_registered and not self._pump_scheduled:
            self._pump()

    async def aclose(self, graceful: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if graceful and self._error is None:
                # Bounded: a peer that stopped reading must not hang close().
                with contextlib.suppress(PeerClosedError, OSError, TransferTimeout):
                    async with deadline(self._link.config.close_timeout, lambda: "close frame"):
                        await self._write_close_frame()
        finally:
            self._teardown(PipeClosedError(f"{self._link.describe}: pipe closed"))

    # -- internals ---------------------------------------------------------
    async def _write_close_frame(self) -> None:
        await self._idle.wait()
        if self._error is not None:
            return
        frame = FrameHeader(FrameKind.CLOSE, self._next_seq).encode()
        await self._loop.sock_sendall(self._sock, frame)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    def _start_staging(self, message: OutgoingMessage) -> None:
        from ..cuda.staging import to_host  # lazy: only GPU users pay for it

        assert message.tensor is not None
        fut = asyncio.ensure_future(to_host(message.tensor))
        self._staging[id(message)] = fut
        fut.add_done_callback(lambda _f: self._schedule_pump())

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled and not self._writer_registered and not self._closed:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _expand_pending(self) -> bool:
        """Turn ready pending messages into segments; False if blocked on staging."""
        while self._pending:
            message = self._pending[0]
            tensor = message.tensor
            if not _is_cpu(tensor):
                fut = self._staging.get(id(message))
                if fut is None or not fut.done():
                    return False
                del self._staging[id(message)]
                if fut.cancelled() or fut.exception() is not None:
                    exc = (
                        fut.exception()
                        if not fut.cancelled()
                        else PipeClosedError("staging cancelled")
                    )
                    self._fail(exc if exc is not None else PipeClosedError("staging failed"))
                    return False
                tensor = fut.result()
            self._pending.popleft()
            header = memoryview(message.header.encode())
            if message.header.nbytes:
                assert tensor is not None
                self._segments.append((header, None))
                self._segments.append((byte_view(tensor), message))
            else:
                self._segments.append((header, message))
        return True

    def _pump(self) -> None:
        """Write as much as the kernel takes now; re-arm on EAGAIN."""
        self._pump_scheduled = False
        if self._error is not None or self._sock.fileno() < 0:
            return
        until = time.perf_counter() + _SLICE_SECONDS
        while True:
            self._expand_pending()
            if not self._segments:
                break
            buffers = self._gather()
            try:
                sent = (
                    self._sock.sendmsg(buffers) if len(buffers) > 1 else self._sock.send(buffers[0])
                )
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fail(PeerClosedError(f"{self._link.describe}: send failed: {exc}"), exc)
                return
            self._consume(sent)
            if self._segments and (sent == 0 or sum(len(b) for b in buffers) > sent):
                # Kernel buffer full: continue when writable.
                self._arm_writer()
                return
            if time.perf_counter() > until and (self._segments or self._pending):
                self._schedule_pump()  # let other callbacks run between big chunks
                return
        self._disarm_writer()
        if not self._pending and not self._segments:
            self._idle.set()

    def _gather(self) -> list[memoryview]:
        """The next buffers for one send call, at most ``_SEND_SLICE`` bytes.

        On loopback one non-blocking send can move the whole receive window
        (tens of MiB) before it returns; slicing bounds the time the loop
        spends inside one syscall.
        """
        first = self._segments[0][0]
        if len(first) >= _SEND_SLICE or len(self._segments) == 1:
            return [first[:_SEND_SLICE]]
        buffers: list[memoryview] = []
        total = 0
        for view, _ in self._segments:
            if len(buffers) == _MAX_IOV or total >= _SEND_SLICE:
                break
            if total + len(view) > _SEND_SLICE:
                view = view[: _SEND_SLICE - total]
            buffers.append(view)
            total += len(view)
        return buffers

    def _consume(self, sent: int) -> None:
        while sent:
            view, message = self._segments[0]
            if sent >= len(view):
                sent -= len(view)
                self._segments.popleft()
                if message is not None and not message.done.done():
                    message.done.set_result(None)
            else:
                self._segments[0] = (view[sent:], message)
                sent = 0
        # zero-length segments (empty payloads are never queued, but be safe)
        while self._segments and len(self._segments[0][0]) == 0:
            _, message = self._segments.popleft()
            if message is not None and not message.done.done():
                message.done.set_result(None)

    def _arm_writer(self) -> None:
        if not self._writer_registered:
            self._loop.add_writer(self._fd, self._pump)
            self._writer_registered = True

    def _disarm_writer(self) -> None:
        if self._writer_registered:
            self._loop.remove_writer(self._fd)
            self._writer_registered = False

    def _on_readable(self) -> None:
        """The receiver never writes: readable means EOF or a broken peer."""
        try:
            data = self._sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(PeerClosedError(f"{self._link.describe}: connection broken: {exc}"), exc)
            return
        if not data:
            if self._closed:
                self._loop.remove_reader(self._fd)
                return
            self._fail(PeerClosedError(f"{self._link.describe}: peer closed the connection"))
        else:
            self._fail(ProtocolError(f"{self._link.describe}: receiver sent unexpected bytes"))

    def _fail(self, error: BaseException, cause: BaseException | None = None) -> None:
        if self._error is not None:
            return
        if cause is not None and error.__cause__ is None:
            error.__cause__ = cause
        self._error = error
        self._teardown(error)

    def _teardown(self, error: BaseException) -> None:
        for fut in self._staging.values():
            fut.cancel()
        self._staging.clear()
        failed = [m for _, m in self._segments if m is not None] + list(self._pending)
        self._segments.clear()
        self._pending.clear()
        for message in failed:
            if not message.done.done():
                message.done.set_exception(error)
        if self._sock.fileno() >= 0:
            self._disarm_writer()
            self._loop.remove_reader(self._fd)
            self._sock.close()
        self._idle.set()


class _FrameParser:
    """Turns the byte stream into frames, reading payloads in place.

    Plays the role of a ``BufferedProtocol`` (:meth:`buffer` /
    :meth:`consumed`), but the channel drives the socket itself so the same
    code runs on asyncio and uvloop and can drain several reads per wakeup.
    """

    def __init__(self, channel: TcpRecvChannel) -> None:
        self._channel = channel
        self._staging = bytearray(_STAGING)
        self._staging_view = memoryview(self._staging)
        self._have = 0  # valid bytes at the start of the staging buffer
        self._direct: memoryview | None = None  # payload being read in place
        self._direct_got = 0
        self._direct_tensor: torch.Tensor | None = None
        self._expected_seq = 0

    def buffer(self) -> memoryview:
        """Where the next read should land."""
        if self._direct is not None:
            return self._direct[self._direct_got : self._direct_got + self._channel.read_slice]
        return self._staging_view[self._have :]

    def consumed(self, nbytes: int) -> None:
        """``nbytes`` were read into :meth:`buffer`; may raise ProtocolError."""
        if self._direct is not None:
            self._direct_got += nbytes
            left = len(self._direct) - self._direct_got
            if left == 0:
                self._finish_direct()
            elif left < _LOWAT_MAX:
                self._channel._set_lowat(left)
            return
        self._have += nbytes
        self._parse_staging()

    def mid_frame(self) -> str | None:
        if self._direct is not None:
            return f"{self._direct_got} of {len(self._direct)} payload bytes"
        if self._have:
            return f"{self._have} header bytes"
        return None

    def _parse_staging(self) -> None:
        view = self._staging_view
        pos = 0
        channel = self._channel
        while self._have - pos >= HEADER_SIZE and not channel._stopped:
            header = decode_header(
                view[pos : pos + HEADER_SIZE],
                expected_seq=self._expected_seq,
                max_frame_bytes=channel.max_frame_bytes,
            )
            self._expected_seq += 1
            pos += HEADER_SIZE
            if header.kind is FrameKind.CLOSE:
                channel._peer_closed()
                self._have = 0
                return
            if header.kind is FrameKind.NONE:
                channel._deliver(None, 0)
                continue
            tensor, dest = empty_for(header, channel.pool)
            available = self._have - pos
            if available >= header.nbytes:
                if header.nbytes:
                    dest[:] = view[pos : pos + header.nbytes]
                pos += header.nbytes
                channel._deliver(tensor, header.nbytes)
                continue
            # The payload continues past what we hold: copy that part, then
            # read the rest straight into the tensor.
            dest[:available] = view[pos : self._have]
            self._have = 0
            self._direct, self._direct_got, self._direct_tensor = dest, available, tensor
            # Wake only when a worthwhile piece (or the rest) has arrived: far
            # fewer loop iterations per large payload.
            channel._set_lowat(min(header.nbytes - available, _LOWAT_MAX))
            return
        # keep a partial header at the start of the staging buffer
        rest = self._have - pos
        if rest and pos:
            view[:rest] = view[pos : self._have]
        self._have = rest

    def _finish_direct(self) -> None:
        self._channel._set_lowat(1)
        tensor, nbytes = self._direct_tensor, len(self._direct or b"")
        self._direct, self._direct_got, self._direct_tensor = None, 0, None
        self._channel._deliver(tensor, nbytes)


class TcpRecvChannel(RecvChannel):
    """Receives frames in order into a bounded queue of ready tensors.

    Reading is a reader callback on the socket that drains up to
    ``_READ_BUDGET`` bytes per wakeup; it is removed (paused) while
    ``buffer_bytes`` of received tensors wait for ``recv``, so a slow
    consumer pushes back on the sender through TCP flow control.
    """

    def __init__(self, link: Link) -> None:
        self._link = link
        self._sock = link.sock
        self._fd = link.sock.fileno()
        self._loop = asyncio.get_running_loop()
        self.max_frame_bytes = link.config.max_frame_bytes
        self._limit = link.config.buffer_bytes
        self._device = link.config.device
        self._ready: deque[tuple[Any, int]] = deque()  # (tensor | None | Future, nbytes)
        self._queued_bytes = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._error: BaseException | None = None
        self._closed = False
        self._stopped = False  # no more frames will be delivered
        self._reading = False
        self._lowat = 1
        self.read_slice = _READ_SLICE
        # Warm receive blocks for large payloads, bounded by the window.
        self.pool = RecvBufferPool(link.config.buffer_bytes)
        self._parser = _FrameParser(self)
        self._resume_reading()

    @property
    def error(self) -> BaseException | None:
        return self._error

    # -- socket ----------------------------------------------------------------
    def _set_lowat(self, nbytes: int) -> None:
        """Ask the kernel to report readable only once ``nbytes`` are queued.

        Never above the bytes still owed by the current frame, so it cannot
        wait for data the sender has no reason to send.
        """
        if nbytes != self._lowat and self._sock.fileno() >= 0:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
            except OSError:
                return  # not supported here: plain wakeups still work
            self._lowat = nbytes

    def _resume_reading(self) -> None:
        if not self._reading and not self._stopped:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        sock, parser = self._sock, self._parser
        clock = time.perf_counter
        until = clock() + _SLICE_SECONDS
        while self._reading:
            buf = parser.buffer()
            started = clock()
            try:
                n = sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._connection_lost(exc)
                return
            if n == 0:
                self._connection_lost(None)
                return
            try:
                parser.consumed(n)
            except Exception as exc:  # a callback must not raise into the loop
                self._protocol_failed(exc)
                return
            now = clock()
            if n >= _MIN_READ_SLICE:
                # Size the next read to take ~_SLICE_SECONDS at the rate just
                # seen: fresh pages can copy 20x slower than warm ones.
                rate = n / max(now - started, 1e-7)
                self.read_slice = int(min(max(rate * _SLICE_SECONDS, _MIN_READ_SLICE), _READ_SLICE))
            if n < len(buf) or now > until:
                return  # drained (no EAGAIN round trip needed), or our slice is up

    def _protocol_failed(self, exc: Exception) -> None:
        if isinstance(exc, AiokvpipeError):
            error: BaseException = exc
        else:
            error = ProtocolError(f"{self._link.describe}: cannot receive frame: {exc!r}")
            error.__cause__ = exc
        self._stop(error)
        self._pause_reading()

    # -- called by the parser ----------------------------------------------------
    def _deliver(self, tensor: torch.Tensor | None, nbytes: int) -> None:
        item: Any = tensor
        if tensor is not None and self._device != "cpu":
            from ..cuda.staging import to_device  # lazy: only GPU users pay for it

            item = asyncio.ensure_future(to_device(tensor, self._device))
        self._ready.append((item, nbytes))
        self._queued_bytes += nbytes
        if self._queued_bytes >= self._limit:
            self._pause_reading()
        self._wake()

    def _peer_closed(self) -> None:
        self._stop(PeerClosedError(f"{self._link.describe}: peer closed the pipe"))
        self._pause_reading()

    def _connection_lost(self, exc: Exception | None) -> None:
        self._pause_reading()
        if self._stopped:
            return
        mid_frame = self._parser.mid_frame()
        if mid_frame is not None:
            error = PeerClosedError(
                f"{self._link.describe}: connection lost mid-frame after {mid_frame}"
            )
        else:
            error = PeerClosedError(
                f"{self._link.describe}: peer disconnected without closing the pipe"
            )
        if exc is not None:
            error.__cause__ = exc
        self._stop(error)

    def _stop(self, error: BaseException) -> None:
        if not self._stopped:
            self._stopped = True
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    # -- RecvChannel -----------------------------------------------------------
    async def recv(self) -> torch.Tensor | None:
        while True:
            if self._closed:
                raise PipeClosedError(f"{self._link.describe}: pipe closed")
            if self._ready:
                item, nbytes = self._ready[0]
                if isinstance(item, asyncio.Future):
                    # Device copy in flight: wait without consuming, so a
                    # cancelled recv leaves the message at the head.
                    await asyncio.shield(item)
                    continue
                self._ready.popleft()
                self._queued_bytes -= nbytes
                if self._queued_bytes < self._limit:
                    self._resume_reading()
                return item  # type: ignore[no-any-return]
            if self._error is not None:
                raise self._error
            fut = self._loop.create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopped = True
        self._pause_reading()
        for item, _ in self._ready:
            if isinstance(item, asyncio.Future):
                item.cancel()
        self._ready.clear()
        self._wake()
        self.pool.close()
        self._sock.close()


class TcpTransport(Transport):
    name = "tcp"

    @classmethod
    async def open_sender(cls, link: Link) -> SendChannel:
        return TcpSendChannel(link)

    @classmethod
    async def open_receiver(cls, link: Link) -> RecvChannel:
        return TcpRecvChannel(link)
