"""The receiving end of the TCP transport: frames parsed in place, bounded queue.

See :mod:`aiokvpipe.transport.tcp` for the design.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from typing import Any

import torch

from ..bufpool import RecvBufferPool
from ..errors import (
    AiokvpipeError,
    PeerClosedError,
    PipeClosedError,
    ProtocolError,
)
from ..tensors import empty_for, rehearse_receive
from ..wire import HEADER_SIZE, FrameHeader, FrameKind, decode_header, message_charge
from ._waiters import WaiterSet
from .base import Link, RecvChannel

# Loop latency: one callback stops after ~_SLICE_SECONDS of copying (time,
# not bytes: first-touch page faults can make a byte budget 20x slower).
_SLICE_SECONDS = 0.25e-3
_READ_SLICE = 1 << 20  # most bytes one recv_into may take
_MIN_READ_SLICE = 64 << 10
_LOWAT_MAX = 1 << 20  # SO_RCVLOWAT while a large payload streams in
_STAGING = 256 << 10  # reusable read buffer for headers and small payloads


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
        self._have = 0  # end of the valid bytes in the staging buffer
        self._start = 0  # start of the unparsed ones (non-zero only while paused)
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
        if self._have - self._start:
            return f"{self._have - self._start} header bytes"
        return None

    def resume(self) -> None:
        """Parse frames read before the channel paused; may raise ProtocolError."""
        if self._direct is None and self._have - self._start >= HEADER_SIZE:
            self._parse_staging()

    def _parse_staging(self) -> None:
        view = self._staging_view
        pos = self._start
        channel = self._channel
        while self._have - pos >= HEADER_SIZE and not channel._stopped:
            if not channel._reading:
                # Paused: the receive queue holds buffer_bytes of charges. One
                # read can bring thousands of tiny frames; leave the rest in
                # staging, untouched, until recv() makes room (resume()).
                self._start = pos
                return
            header = decode_header(
                view[pos : pos + HEADER_SIZE],
                expected_seq=self._expected_seq,
                max_frame_bytes=channel.max_frame_bytes,
            )
            self._expected_seq += 1
            channel.last_header = header
            pos += HEADER_SIZE
            if header.kind is FrameKind.CLOSE:
                channel._peer_closed()
                self._have = self._start = 0
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
            self._have = self._start = 0
            self._direct, self._direct_got, self._direct_tensor = dest, available, tensor
            # Wake only when a worthwhile piece (or the rest) has arrived: far
            # fewer loop iterations per large payload.
            channel._set_lowat(min(header.nbytes - available, _LOWAT_MAX))
            return
        # keep a partial header at the start of the staging buffer
        rest = self._have - pos
        if rest and pos:
            view[:rest] = view[pos : self._have]
        self._have, self._start = rest, 0

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
        self._ready: deque[tuple[Any, int]] = deque()  # (tensor | None | Future, charge)
        self._queued_bytes = 0
        self._waiters = WaiterSet(anticipate=link.config.anticipate)
        self._error: BaseException | None = None
        self._closed = False
        self._stopped = False  # no more frames will be delivered
        self._reading = False
        self._lowat = 1
        self.read_slice = _READ_SLICE
        # Warm receive blocks for large payloads, bounded by the window.
        self.pool = RecvBufferPool(link.config.buffer_bytes)
        self.last_header: FrameHeader | None = None  # what _rehearse rehearses
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
            # Frames already read when the queue filled up wait in staging;
            # the socket may never be readable again to flush them out.
            try:
                self._parser.resume()
            except Exception as exc:
                self._protocol_failed(exc)

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
            took = now - started
            if n >= _MIN_READ_SLICE:
                # Size the next read to take ~_SLICE_SECONDS at the rate just
                # seen: fresh pages can copy 20x slower than warm ones.
                rate = n / max(took, 1e-7)
                self.read_slice = int(min(max(rate * _SLICE_SECONDS, _MIN_READ_SLICE), _READ_SLICE))
            if n < len(buf) or now + took > until:
                # Drained (no EAGAIN round trip needed), or another read like
                # this one would overrun the slice: give the loop its turn.
                return

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
        # Charged like the sender's window: a None costs its bookkeeping too,
        # so a flood of them pauses reading instead of queueing forever.
        charge = message_charge(nbytes)
        self._ready.append((item, charge))
        self._waiters.arrived()
        self._queued_bytes += charge
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
        self._waiters.wake_all()

    # -- RecvChannel -----------------------------------------------------------
    async def recv(self) -> torch.Tensor | None:
        while True:
            if self._closed:
                raise PipeClosedError(f"{self._link.describe}: pipe closed")
            if self._ready:
                item, charge = self._ready[0]
                if isinstance(item, asyncio.Future):
                    if not item.done():
                        # Device copy in flight: wait without consuming (a
                        # cancelled recv leaves the message at the head), then
                        # look again: another recv may have taken it meanwhile.
                        await asyncio.wait([item])
                        continue
                    item = self._landed(item)
                self._ready.popleft()
                self._queued_bytes -= charge
                if self._queued_bytes < self._limit:
                    self._resume_reading()
                return item  # type: ignore[no-any-return]
            if self._error is not None:
                raise self._error
            await self._waiters.wait_for(self._has_news, self._rehearse)

    def _rehearse(self) -> None:
        """Run when the window for the next message opens (see WaiterSet.wait_for)."""
        rehearse_receive(self.last_header, self.max_frame_bytes)

    def _landed(self, staged: asyncio.Future[torch.Tensor]) -> torch.Tensor:
        """The tensor a finished device copy produced, or the channel fails with its error.

        A message that cannot be delivered leaves a hole in the stream, so
        nothing after it is delivered either.
        """
        if not staged.cancelled() and staged.exception() is None:
            return staged.result()
        error = staged.exception() if not staged.cancelled() else None
        if error is None:
            error = PipeClosedError(f"{self._link.describe}: copy to {self._device} cancelled")
        for item, _ in self._ready:
            if isinstance(item, asyncio.Future):
                item.cancel()
        self._ready.clear()
        self._queued_bytes = 0
        self._pause_reading()
        self._stopped = True
        self._error = error
        self._wake()
        raise error

    def _has_news(self) -> bool:
        return bool(self._ready) or self._error is not None or self._closed

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopped = True
        self._pause_reading()
        self._waiters.close()
        for item, _ in self._ready:
            if isinstance(item, asyncio.Future):
                item.cancel()
        self._ready.clear()
        self._wake()
        self.pool.close()
        self._sock.close()
