"""CPU tensors over a TCP socket, with no copies on either side.

Sending is callback-driven, the way asyncio's own transports write, but
without their copy: :meth:`TcpSendChannel.submit` tries ``sendmsg`` at once
with the header and a view of the tensor's memory as a gather list, and only
if the kernel buffer is full does it register a writer callback to go on.
Nothing awaits per message, so small messages cost one syscall.

Receiving is a :class:`asyncio.BufferedProtocol`: headers (and small
payloads that arrive with them) are read into one reusable staging buffer,
while large payloads are read straight into the destination tensor's memory
by ``recv_into``. Reading pauses when ``buffer_bytes`` of received tensors
wait for ``recv``, so a slow consumer pushes back on the sender through TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from typing import Any, cast

import torch

from .._timeouts import deadline
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
_PUMP_BYTES = 4 << 20  # bytes written per callback before yielding to the loop
_READ_SLICE = 4 << 20  # most bytes one read callback may take, for loop latency
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
        written = 0
        while True:
            self._expand_pending()
            if not self._segments:
                break
            buffers = (
                [seg for seg, _ in list(self._segments)[:_MAX_IOV]]
                if len(self._segments) > 1
                else [self._segments[0][0]]
            )
            try:
                sent = (
                    self._sock.sendmsg(buffers) if len(buffers) > 1 else self._sock.send(buffers[0])
                )
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fail(PeerClosedError(f"{self._link.describe}: send failed: {exc}"), exc)
                return
            written += sent
            self._consume(sent)
            if self._segments and (sent == 0 or sum(len(b) for b in buffers) > sent):
                # Kernel buffer full: continue when writable.
                self._arm_writer()
                return
            if written >= _PUMP_BYTES and (self._segments or self._pending):
                self._schedule_pump()  # let other callbacks run between big chunks
                return
        self._disarm_writer()
        if not self._pending and not self._segments:
            self._idle.set()

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


class _FrameReader(asyncio.BufferedProtocol):
    """Parses frames from the byte stream into tensors, in place."""

    def __init__(self, channel: TcpRecvChannel) -> None:
        self._channel = channel
        self._staging = bytearray(_STAGING)
        self._staging_view = memoryview(self._staging)
        self._have = 0  # valid bytes at the start of the staging buffer
        self._direct: memoryview | None = None  # payload being read in place
        self._direct_got = 0
        self._direct_tensor: torch.Tensor | None = None
        self._expected_seq = 0
        self.transport: asyncio.Transport | None = None

    # -- protocol callbacks --------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._direct is not None:
            return self._direct[self._direct_got : self._direct_got + _READ_SLICE]
        return self._staging_view[self._have :]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._direct is not None:
                self._direct_got += nbytes
                if self._direct_got == len(self._direct):
                    self._finish_direct()
                return
            self._have += nbytes
            self._parse_staging()
        except Exception as exc:  # a callback must not raise into the loop
            error = (
                exc
                if isinstance(exc, AiokvpipeError)
                else ProtocolError(f"{self._channel._link.describe}: cannot receive frame: {exc!r}")
            )
            if error is not exc:
                error.__cause__ = exc
            self._channel._break(error)
            if self.transport is not None:
                self.transport.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._channel._connection_lost(self._mid_frame(), exc)

    # -- parsing ---------------------------------------------------------
    def _mid_frame(self) -> str | None:
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
            tensor, dest = empty_for(header)
            available = self._have - pos
            if available >= header.nbytes:
                if header.nbytes:
                    dest[:] = view[pos : pos + header.nbytes]
                pos += header.nbytes
                channel._deliver(tensor, header.nbytes)
                continue
            # Payload continues past what we have: copy the part we hold, read
            # the rest in place (large) or keep staging (small).
            # Payload continues past what we hold: copy that part, then read
            # the rest straight into the tensor.
            dest[:available] = view[pos : self._have]
            self._have = 0
            self._direct, self._direct_got, self._direct_tensor = dest, available, tensor
            return
        # keep the partial header at the start of the staging buffer
        rest = self._have - pos
        if rest and pos:
            view[:rest] = view[pos : self._have]
        self._have = rest

    def _finish_direct(self) -> None:
        tensor, nbytes = self._direct_tensor, len(self._direct or b"")
        self._direct, self._direct_got, self._direct_tensor = None, 0, None
        self._channel._deliver(tensor, nbytes)


class TcpRecvChannel(RecvChannel):
    """Receives frames in order into a bounded queue of ready tensors."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self.max_frame_bytes = link.config.max_frame_bytes
        self._limit = link.config.buffer_bytes
        self._device = link.config.device
        self._ready: deque[tuple[Any, int]] = deque()  # (tensor | None | Future, nbytes)
        self._queued_bytes = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._error: BaseException | None = None
        self._closed = False
        self._stopped = False  # no more frames will be delivered
        self._paused = False
        self._protocol = _FrameReader(self)
        self._transport: asyncio.Transport | None = None
        self._lost = asyncio.get_running_loop().create_future()

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(
            lambda: self._protocol, sock=self._link.sock
        )
        self._transport = transport

    @property
    def error(self) -> BaseException | None:
        return self._error

    # -- called by the protocol ----------------------------------------------
    def _deliver(self, tensor: torch.Tensor | None, nbytes: int) -> None:
        item: Any = tensor
        if tensor is not None and self._device != "cpu":
            from ..cuda.staging import to_device  # lazy: only GPU users pay for it

            item = asyncio.ensure_future(to_device(tensor, self._device))
        self._ready.append((item, nbytes))
        self._queued_bytes += nbytes
        if self._queued_bytes >= self._limit and not self._paused and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True
        self._wake()

    def _peer_closed(self) -> None:
        self._stop(PeerClosedError(f"{self._link.describe}: peer closed the pipe"))

    def _break(self, error: BaseException) -> None:
        self._stop(error)

    def _connection_lost(self, mid_frame: str | None, exc: Exception | None) -> None:
        if not self._lost.done():
            self._lost.set_result(None)
        if self._stopped:
            return
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
                self._consumed(nbytes)
                return item  # type: ignore[no-any-return]
            if self._error is not None:
                raise self._error
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)

    def _consumed(self, nbytes: int) -> None:
        self._queued_bytes -= nbytes
        if self._paused and self._queued_bytes < self._limit and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopped = True
        for item, _ in self._ready:
            if isinstance(item, asyncio.Future):
                item.cancel()
        self._ready.clear()
        self._wake()
        if self._transport is not None:
            self._transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.shield(self._lost)
        else:
            self._link.sock.close()


class TcpTransport(Transport):
    name = "tcp"

    @classmethod
    async def open_sender(cls, link: Link) -> SendChannel:
        return TcpSendChannel(link)

    @classmethod
    async def open_receiver(cls, link: Link) -> RecvChannel:
        channel = TcpRecvChannel(link)
        await channel._start()
        return channel
