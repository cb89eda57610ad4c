"""The outgoing side of one link direction, shared by Pipe and Endpoint.

One :class:`Outbound` wraps a transport's :class:`SendChannel` with what a
caller sees of sending:

* ``send`` returns once the tensor is *accepted* into a byte window
  (:class:`ByteSemaphore`, every message charged
  :func:`~aiokvpipe.wire.message_charge`); it waits, without polling, while
  the window is full. The returned :class:`Transfer` resolves when the
  bytes have left.
* Failures of the background sender are raised from the next ``send`` or
  ``flush`` and from the Transfer, never only logged; after a fatal error
  every call raises the same typed error.
* Cancelling a ``send`` never corrupts the stream: the channel owns the
  socket, callers only wait on the window and on futures.

A Pipe has one Outbound (to the next rank); an Endpoint one per peer it
sends to. :meth:`fence` is how liveness and restart fencing end one: every
waiting ``send``, ``flush`` and Transfer fails with the given error (e.g. a
PeerClosedError naming the peer and how long it was silent).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Generator
from typing import Any

import torch

from ._timeouts import deadline
from .errors import AiokvpipeError, FrameTooLargeError
from .semaphore import ByteSemaphore
from .tensors import check_sendable, dense, header_for
from .transport import OutgoingMessage, SendChannel
from .wire import MESSAGE_OVERHEAD, message_charge


class Transfer:
    """Completion of one accepted ``send``: await it to know the bytes left.

    Awaiting raises the error that stopped the transfer. Not awaiting it is
    fine: the error also surfaces from the pipe's next call.
    """

    __slots__ = ("_future", "_owner", "nbytes", "seq")

    def __init__(
        self, future: asyncio.Future[None], seq: int, nbytes: int, owner: Outbound | None = None
    ) -> None:
        self._future = future
        self._owner = owner
        self.seq = seq
        self.nbytes = nbytes

    def done(self) -> bool:
        """True once the bytes left (or the transfer failed)."""
        return self._future.done()

    def __await__(self) -> Generator[Any, None, None]:
        try:
            yield from asyncio.shield(self._future).__await__()
        except AiokvpipeError as exc:
            # A fenced link fails its channel's messages with "closed"; the
            # caller is owed the reason it was fenced (peer silent, replaced).
            fence = self._owner.fenced if self._owner is not None else None
            if fence is None or fence is exc:
                raise
            raise fence from exc

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<Transfer seq={self.seq} nbytes={self.nbytes} {state}>"


class Outbound:
    """Window, sequence numbers and error reporting over one SendChannel.

    ``describe(op)`` names the direction in messages (``"send on rank 0 ->
    rank 1"``); ``closed_error()`` builds the error for use after close.
    """

    def __init__(
        self,
        sender: SendChannel,
        *,
        window_bytes: int,
        max_frame_bytes: int,
        describe: Callable[[str], str],
        closed_error: Callable[[], BaseException],
    ) -> None:
        self.sender = sender
        self.window = ByteSemaphore(window_bytes)
        self.max_frame_bytes = max_frame_bytes
        self._describe = describe
        self._closed_error = closed_error
        self._next_seq = 0
        # Accepted messages not yet sent: completion future -> (payload bytes,
        # accept time). No closure per message: a deep backlog of small
        # messages (a ring whose reader lags) keeps tens of thousands alive,
        # and every tracked object is work for each garbage collection.
        self._inflight: dict[asyncio.Future[None], tuple[int, float]] = {}
        self._settled = self._on_done  # bound once, shared by every future
        self.error: BaseException | None = None
        self.error_reported = False
        self.fenced: BaseException | None = None
        self.closed = False
        self.bytes_sent = 0
        self.messages_sent = 0
        # Metrics hook: called with (payload bytes, seconds from accept to left).
        self.on_sent: Callable[[int, float], None] | None = None

    @property
    def pending_bytes(self) -> int:
        """Payload bytes accepted by ``send`` that have not left yet.

        The window itself holds more: every message is also charged
        :data:`~aiokvpipe.wire.MESSAGE_OVERHEAD`.
        """
        return self.window.held - MESSAGE_OVERHEAD * len(self._inflight)

    @property
    def pending_messages(self) -> int:
        return len(self._inflight)

    @property
    def inflight(self) -> Collection[asyncio.Future[None]]:
        """Completion futures of the accepted messages that have not left (read only)."""
        return self._inflight.keys()

    def check_open(self) -> None:
        if self.closed:
            raise self._closed_error()

    def raise_error(self) -> None:
        """Raise the fatal error, if any (and remember a caller saw it)."""
        error = self.error or self.fenced or self.sender.error
        if error is not None:
            self.error = error
            self.error_reported = True
            raise error

    # -- sending ---------------------------------------------------------------
    async def send(
        self, tensor: torch.Tensor | None, timeout: float | None, ready: Any = None
    ) -> Transfer:
        """Accept ``tensor`` (or None), in order; see :meth:`Pipe.send`."""
        if self.closed:
            self.check_open()
        if self.error is not None or self.fenced is not None or self.sender.error is not None:
            self.raise_error()
        checked = check_sendable(tensor)
        data = dense(checked) if checked is not None else None
        nbytes = 0 if data is None else data.numel() * data.element_size()
        if nbytes > self.max_frame_bytes:
            raise FrameTooLargeError(nbytes, self.max_frame_bytes, self._describe("send"))
        # Every message holds its header and bookkeeping too: a flood of
        # None or tiny tensors fills the window like any other traffic.
        charge = message_charge(nbytes)
        if not self.window.try_acquire(charge):
            async with deadline(
                timeout, lambda: self._describe("send") + f": waiting for {charge} bytes of window"
            ):
                try:
                    await self.window.acquire(charge)
                except AiokvpipeError as exc:
                    if exc is self.error or exc is self.fenced:
                        self.error_reported = True  # the window was closed with it
                    raise
        if self.closed or self.fenced is not None or self.sender.error is not None:
            self.window.release(charge)
            self.check_open()
            self.raise_error()
        # Nothing below awaits: once the window is granted the message is
        # queued, so cancellation can only happen before acceptance.
        try:
            header = header_for(self._next_seq, data)
        except BaseException:
            self.window.release(charge)
            raise
        self._next_seq += 1
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._inflight[done] = (nbytes, loop.time() if self.on_sent is not None else 0.0)
        self.sender.submit(OutgoingMessage(header, data, done, ready))
        if done.done():
            # Written synchronously (the common case for small tensors):
            # settle now instead of paying a loop iteration for the callback.
            self._on_done(done)
        else:
            done.add_done_callback(self._settled)
        return Transfer(done, header.seq, nbytes, self)

    def _on_done(self, fut: asyncio.Future[None]) -> None:
        meta = self._inflight.pop(fut, None)
        if meta is None:
            return  # settled already
        nbytes, started = meta
        self.window.release(message_charge(nbytes))
        if fut.cancelled():
            return
        error = fut.exception()  # also marks it retrieved
        if error is None:
            self.bytes_sent += nbytes
            self.messages_sent += 1
            if self.on_sent is not None:
                self.on_sent(nbytes, asyncio.get_running_loop().time() - started)
        elif self.error is None:
            self.error = self.fenced or error
            self.window.close(self.error)

    # -- waiting -----------------------------------------------------------------
    async def drain(self, timeout: float | None) -> None:
        """Wait until every accepted send has left (or raise why it could not)."""
        if self._inflight:
            async with deadline(
                timeout, lambda: self._describe("flush") + f": {self.pending_bytes} bytes pending"
            ):
                await asyncio.wait(set(self._inflight))
        # Only a transfer that failed is a flush error: a peer that closed
        # after receiving everything is not.
        if self.error is not None:
            self.error_reported = True
            raise self.error

    # -- ending ------------------------------------------------------------------
    def fence(self, error: BaseException) -> None:
        """The link is dead: fail every waiting send, flush and Transfer with ``error``.

        The caller closes the channel (``sender.aclose(graceful=False)``),
        which fails what it still holds; those failures surface as ``error``.
        """
        if self.fenced is not None:
            return
        self.fenced = error
        if self._inflight and self.error is None:
            self.error = error
        self.window.close(self.error or error)

    async def aclose(self, close_timeout: float) -> BaseException | None:
        """Drain (bounded by ``close_timeout``), say goodbye if all left, free the channel.

        Returns a send error no caller has seen yet (data that never left).
        Always frees the channel, even when cancelled.
        """
        graceful = False
        reported = self.error_reported
        try:
            with contextlib.suppress(Exception):
                await self.drain(close_timeout)
            # drain's error was swallowed here, so no caller has seen it yet.
            self.error_reported = reported
            graceful = not self._inflight and self.error is None and self.fenced is None
        finally:
            self.closed = True
            self.window.close(self._closed_error())
            await asyncio.shield(self.sender.aclose(graceful=graceful))
        if self.error is not None and not self.error_reported:
            self.error_reported = True
            return self.error
        return None
