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
from bisect import bisect_left, bisect_right
from itertools import accumulate

from ..errors import PeerClosedError
from ..loop_turns import yield_turn

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
if IOV_MAX <= 0:  # pragma: no cover - "no limit" reported as -1
    IOV_MAX = 1024
# Most bytes one syscall moves, and the time one callback may keep the loop:
# on loopback a single call can copy tens of MiB (milliseconds) otherwise.
_CALL_BYTES = 2 << 20
_SLICE_SECONDS = 0.5e-3
_LOWAT_MAX = 1 << 20  # SO_RCVLOWAT while a large payload streams in
# Below this a wait keeps the default low-water mark (1 byte): a control
# message arrives in one segment anyway, and setting the mark and putting
# it back would be two more syscalls on every wake-up of an idle peer.
_LOWAT_MIN = 64 << 10
_SCRATCH = 1 << 20
_ZEROS = memoryview(bytes(_SCRATCH))


class ViewPlan:
    """Byte ranges of a few base views, turned into ``memoryview`` s only when used.

    Why: a 256-block request over 8 layers is 4096 block-run views, and
    slicing them all up front cost ~2.5 ms per side before the first byte
    moved (the owner's REPLY waited on it, the requester's REQUEST too).
    :class:`Segments` asks for one syscall's or one ring chunk's worth at a
    time, so the slicing is spread along the transfer and overlaps the
    peer's copying.
    """

    __slots__ = ("_bases", "_starts", "_which", "lengths")

    def __init__(
        self, bases: list[memoryview], which: list[int], starts: list[int], lengths: list[int]
    ) -> None:
        self._bases = bases
        self._which = which  # index into ``bases`` of each range
        self._starts = starts
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: slice) -> list[memoryview]:
        bases, which, starts, lengths = self._bases, self._which, self._starts, self.lengths
        return [
            bases[which[k]][starts[k] : starts[k] + lengths[k]]
            for k in range(*index.indices(len(lengths)))
        ]

    def views(self) -> list[memoryview]:
        """Every range as a view (what a list-taking caller needs)."""
        return self[:]


class Segments:
    """Byte segments consumed in order by :func:`send_segments` / :func:`recv_segments`.

    A request's payload is thousands of block-run views (4096 for 256
    scattered blocks x 8 layers x K/V), taken a syscall's worth at a time, so
    the bookkeeping is positional: cumulative view ends, searched with
    ``bisect``, and the next batch is a C-level slice of the view list with
    only its first and last view trimmed (no Python loop over the views).
    """

    def __init__(self, views: list[memoryview] | ViewPlan, *, receive: bool) -> None:
        self._receive = receive
        self.total = 0
        self.moved = 0
        self.redirected = False
        self._use(views, 0)
        self.total = self._base + (self._ends[-1] if self._ends else 0)

    def _use(self, views: list[memoryview] | ViewPlan, base: int) -> None:
        """Move ``views`` from stream offset ``base`` on (cumulative ends cached)."""
        self._views = views
        lengths = views.lengths if isinstance(views, ViewPlan) else (len(v) for v in views)
        self._ends = list(accumulate(lengths))
        self._base = base  # stream offset of views[0]
        self._index = 0  # the view holding the next byte

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

    def batch(self, limit: int = _CALL_BYTES, views: int = IOV_MAX) -> list[memoryview]:
        """The next views for one syscall: at most ``views`` of them, ``limit`` bytes in all."""
        i, ends = self._index, self._ends
        if i >= len(ends) or limit <= 0:
            return []
        at = self.moved - self._base  # position within the views
        stop = at + limit
        # The view holding the batch's last byte, capped at ``views`` views.
        j = min(bisect_left(ends, stop, i), len(ends) - 1, i + views - 1)
        out = self._views[i : j + 1]
        start_i = ends[i - 1] if i else 0
        if at > start_i:  # the first view was partly moved already
            out[0] = out[0][at - start_i :]
        if ends[j] > stop:  # the last view is more than the limit allows
            keep = len(out[-1]) - (ends[j] - stop)
            out[-1] = out[-1][:keep]
        return out

    def advance(self, nbytes: int) -> None:
        self.moved += nbytes
        # The first view whose end lies beyond what has moved.
        self._index = bisect_right(self._ends, self.moved - self._base, self._index)

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
        self._use(views, self.moved)


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


async def send_segments(
    sock: socket.socket, segs: Segments, what: str, prefix: bytes = b""
) -> None:
    """Send ``prefix`` then every remaining byte of ``segs``; PeerClosedError naming
    ``what`` on failure.

    ``prefix`` (the control message announcing the payload) leaves in the
    same ``sendmsg`` as the payload's first bytes. On this machine's loopback
    TCP a small message sent alone just before a bulk payload slowed the
    receiver's copies 3-7x per byte, with retransmissions; back-to-back
    16-block reads (8 MiB) took 4.8-5.0 ms with the REPLY in the payload's
    first call against 6.1-6.4 ms with it sent alone (3 interleaved pairs of
    200 reads; see docs/blocks.md).
    """
    loop = asyncio.get_running_loop()
    until = time.perf_counter() + _SLICE_SECONDS
    head = memoryview(prefix)
    while segs.remaining or head:
        # The prefix takes one of the IOV_MAX iovecs a call may carry (one
        # more is EMSGSIZE: small blocks fill a 2 MiB batch with 1024 runs).
        iov = [head, *segs.batch(views=IOV_MAX - 1)] if head else segs.batch()
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
        if head:
            used = min(sent, len(head))
            head, sent = head[used:], sent - used
        segs.advance(sent)
        if segs.remaining and time.perf_counter() > until:
            await yield_turn()  # let other callbacks run between big chunks
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
                if want < _LOWAT_MIN:
                    want = 1
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
                await yield_turn()
                until = time.perf_counter() + _SLICE_SECONDS
    finally:
        if lowat != 1 and sock.fileno() >= 0:
            _set_lowat(sock, 1)
