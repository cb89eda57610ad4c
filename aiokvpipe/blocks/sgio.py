"""Awaitable scatter/gather socket I/O: ``sendmsg`` from, ``recvmsg_into`` into, a list of views.

The one place the block path touches its socket. Payload views point into
registered tensors, so nothing is gathered or staged: the kernel copies
straight between the socket and the blocks.

A :class:`Segments` can be *redirected*: the views it has not reached yet
are swapped for scratch memory (zeros to send, a throw-away buffer to receive
into). A transfer whose lease ended, or whose caller was cancelled, finishes
its framing this way without touching the blocks again, so the connection
stays usable and nobody's memory is written after they were told the
transfer stopped. The swap is synchronous and every syscall runs on the loop
thread, so no write can land in a block after :meth:`Segments.redirect`
returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time

from ..errors import PeerClosedError

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
if IOV_MAX <= 0:  # pragma: no cover - "no limit" reported as -1
    IOV_MAX = 1024
# Most bytes one syscall moves, and the time one callback may keep the loop:
# on loopback a single call can copy tens of MiB (milliseconds) otherwise.
_CALL_BYTES = 2 << 20
_SLICE_SECONDS = 0.5e-3
_LOWAT_MAX = 1 << 20  # SO_RCVLOWAT while a large payload streams in
_SCRATCH = 1 << 20
_ZEROS = memoryview(bytes(_SCRATCH))


class Segments:
    """Byte segments consumed in order by :func:`send_segments` / :func:`recv_segments`."""

    def __init__(self, views: list[memoryview], *, receive: bool) -> None:
        self._views = views
        self._index = 0
        self._offset = 0  # bytes of views[index] already moved
        self._receive = receive
        self.total = sum(len(v) for v in views)
        self.moved = 0
        self.redirected = False

    @classmethod
    def scratch(cls, nbytes: int, *, receive: bool) -> Segments:
        """``nbytes`` that touch no caller's memory: a stopped transfer's framing."""
        segs = cls([], receive=receive)
        segs.total = nbytes
        segs.redirect()
        return segs

    @property
    def remaining(self) -> int:
        return self.total - self.moved

    def batch(self, limit: int = _CALL_BYTES) -> list[memoryview]:
        """The next views for one syscall: at most IOV_MAX of them, ``limit`` bytes in all."""
        out: list[memoryview] = []
        size = 0
        views, i, offset = self._views, self._index, self._offset
        while i < len(views) and len(out) < IOV_MAX and size < limit:
            view = views[i][offset:] if offset else views[i]
            offset = 0
            if size + len(view) > limit:
                view = view[: limit - size]
            out.append(view)
            size += len(view)
            i += 1
        return out

    def advance(self, nbytes: int) -> None:
        self.moved += nbytes
        views = self._views
        while nbytes:
            left = len(views[self._index]) - self._offset
            if nbytes >= left:
                nbytes -= left
                self._index += 1
                self._offset = 0
            else:
                self._offset += nbytes
                nbytes = 0

    def redirect(self) -> None:
        """From now on move the remaining bytes through scratch memory, not the views."""
        if self.redirected:
            return
        self.redirected = True
        rest = self.remaining
        chunk = memoryview(bytearray(min(rest, _SCRATCH))) if self._receive else _ZEROS
        views = [chunk] * (rest // _SCRATCH)
        if rest % _SCRATCH:
            views.append(chunk[: rest % _SCRATCH])
        self._views, self._index, self._offset = views, 0, 0


async def _until_ready(loop: asyncio.AbstractEventLoop, fd: int, writable: bool) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _set_lowat(sock: socket.socket, nbytes: int) -> None:
    """Wake the reader only once ``nbytes`` are queued (never more than are owed)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)


async def send_segments(sock: socket.socket, segs: Segments, what: str) -> None:
    """Send every remaining byte of ``segs``; PeerClosedError naming ``what`` on failure."""
    loop = asyncio.get_running_loop()
    until = time.perf_counter() + _SLICE_SECONDS
    while segs.remaining:
        iov = segs.batch()
        try:
            sent = sock.sendmsg(iov)
        except (BlockingIOError, InterruptedError):
            await _until_ready(loop, sock.fileno(), writable=True)
            until = time.perf_counter() + _SLICE_SECONDS
            continue
        except OSError as exc:
            raise PeerClosedError(
                f"{what}: send failed after {segs.moved} of {segs.total} bytes: {exc}"
            ) from exc
        segs.advance(sent)
        if segs.remaining and time.perf_counter() > until:
            await asyncio.sleep(0)  # let other callbacks run between big chunks
            until = time.perf_counter() + _SLICE_SECONDS


async def recv_segments(sock: socket.socket, segs: Segments, what: str) -> None:
    """Fill every remaining byte of ``segs``; PeerClosedError naming ``what`` on EOF or failure."""
    loop = asyncio.get_running_loop()
    until = time.perf_counter() + _SLICE_SECONDS
    lowat = 1
    try:
        while segs.remaining:
            iov = segs.batch()
            try:
                got = sock.recvmsg_into(iov)[0]
            except (BlockingIOError, InterruptedError):
                want = min(segs.remaining, _LOWAT_MAX)
                if want != lowat:
                    _set_lowat(sock, want)
                    lowat = want
                await _until_ready(loop, sock.fileno(), writable=False)
                until = time.perf_counter() + _SLICE_SECONDS
                continue
            except OSError as exc:
                raise PeerClosedError(
                    f"{what}: receive failed after {segs.moved} of {segs.total} bytes: {exc}"
                ) from exc
            if got == 0:
                raise PeerClosedError(
                    f"{what}: peer closed the connection after {segs.moved} of {segs.total} bytes"
                )
            segs.advance(got)
            if segs.remaining and time.perf_counter() > until:
                await asyncio.sleep(0)
                until = time.perf_counter() + _SLICE_SECONDS
    finally:
        if lowat != 1 and sock.fileno() >= 0:
            _set_lowat(sock, 1)
