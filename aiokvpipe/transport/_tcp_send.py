"""The sending end of the TCP transport: ordered, zero-copy, callback-driven.

See :mod:`aiokvpipe.transport.tcp` for the design.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque

import torch

from .._timeouts import deadline
from ..errors import (
    PeerClosedError,
    PipeClosedError,
    TransferTimeout,
)
from ..tensors import byte_view
from ..wire import FrameHeader, FrameKind
from .base import Link, OutgoingMessage, SendChannel

_MAX_IOV = 64
# Loop latency: one callback stops after ~_SLICE_SECONDS of copying (time,
# not bytes: first-touch page faults can make a byte budget 20x slower).
_SLICE_SECONDS = 0.5e-3
_SEND_SLICE = 512 << 10  # most bytes handed to one send call


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
        if self._refused(message, self._closed, self._link.describe):
            return
        self._next_seq = message.header.seq + 1
        tensor = message.tensor
        if not _is_cpu(tensor):
            self._idle.clear()
            self._start_staging(message)
        elif not (self._pending or self._segments or self._writer_registered):
            self._send_now(message)  # the common case: nothing queued ahead
            return
        self._idle.clear()
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

    def _send_now(self, message: OutgoingMessage) -> None:
        """One ``sendmsg`` for a message with an empty queue ahead of it.

        Small messages leave here whole (no queue, no segments); whatever
        the kernel does not take is queued for the pump as usual.
        """
        header = memoryview(message.header.encode())
        nbytes = message.header.nbytes
        payload = byte_view(message.tensor) if nbytes and message.tensor is not None else None
        if payload is None:
            buffers = [header]
        else:
            buffers = [header, payload if nbytes <= _SEND_SLICE else payload[:_SEND_SLICE]]
        try:
            sent = self._sock.sendmsg(buffers)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._fail(PeerClosedError(f"{self._link.describe}: send failed: {exc}"), exc)
            message.done.set_exception(self._error or exc)
            return
        if sent == len(header) + nbytes:
            message.done.set_result(None)
            return
        self._idle.clear()
        if sent < len(header):
            self._segments.append((header[sent:], None if payload is not None else message))
            sent = 0
        else:
            sent -= len(header)
        if payload is not None:
            self._segments.append((payload[sent:], message))
        self._pump()

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
        news = self._receiver_spoke(self._sock, self._link.describe)
        if news is None:
            return
        error, cause, eof = news
        if eof and self._closed:
            self._loop.remove_reader(self._fd)
            return
        self._fail(error, cause)

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
