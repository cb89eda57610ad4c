"""Pipe: an ordered tensor pipe to the next rank and from the previous one.

The asyncio re-design of vLLM's ``PyNcclPipe``. Differences a caller sees:

* ``send`` returns once the tensor is *accepted* into a byte window
  (:class:`ByteSemaphore`); it waits, without polling, while the window is
  full. The returned :class:`Transfer` resolves when the bytes have left.
* Failures of the background sender are raised from the next ``send``,
  ``flush`` or ``aclose`` and from the Transfer, never only logged.
* Cancelling a ``send`` or ``recv`` never corrupts the stream: channels own
  their sockets, callers only wait on futures.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator
from types import TracebackType
from typing import Any

import torch

from ._timeouts import deadline
from .config import PipeConfig
from .errors import FrameTooLargeError, PipeClosedError
from .rendezvous import rendezvous
from .semaphore import ByteSemaphore
from .tensors import check_sendable, dense, header_for
from .transport import OutgoingMessage, RecvChannel, SendChannel, choose_transport, load_transport


class _FromConfig:
    """Default for ``timeout=``: use the config's ``op_timeout``."""

    def __repr__(self) -> str:
        return "config.op_timeout"


_DEFAULT: Any = _FromConfig()


class Transfer:
    """Completion of one accepted ``send``: await it to know the bytes left.

    Awaiting raises the error that stopped the transfer. Not awaiting it is
    fine: the error also surfaces from the pipe's next call.
    """

    __slots__ = ("_future", "nbytes", "seq")

    def __init__(self, future: asyncio.Future[None], seq: int, nbytes: int) -> None:
        self._future = future
        self.seq = seq
        self.nbytes = nbytes

    def done(self) -> bool:
        """True once the bytes left (or the transfer failed)."""
        return self._future.done()

    def __await__(self) -> Generator[Any, None, None]:
        return asyncio.shield(self._future).__await__()

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<Transfer seq={self.seq} nbytes={self.nbytes} {state}>"


class Pipe:
    """One rank's end: sends to ``(rank + 1) % world_size``, receives from ``rank - 1``.

    Create with ``await Pipe.connect(cfg)``; use as an async context manager
    or call :meth:`aclose`.
    """

    def __init__(
        self,
        config: PipeConfig,
        sender: SendChannel,
        receiver: RecvChannel,
        send_transport: str,
        recv_transport: str,
    ) -> None:
        self.config = config
        self.send_transport = send_transport
        self.recv_transport = recv_transport
        self._sender = sender
        self._receiver = receiver
        self._window = ByteSemaphore(config.buffer_bytes)
        self._next_seq = 0
        self._inflight: set[asyncio.Future[None]] = set()
        self._send_error: BaseException | None = None
        self._error_reported = False
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- construction ----------------------------------------------------------
    @classmethod
    async def connect(cls, config: PipeConfig) -> Pipe:
        """Rendezvous with every rank and open both directions.

        Bounded by ``config.connect_timeout`` (TransferTimeout).
        """
        send_link, recv_link = await rendezvous(config)
        sender: SendChannel | None = None
        try:
            send_name = choose_transport(send_link.local, send_link.peer)
            recv_name = choose_transport(recv_link.peer, recv_link.local)
            async with deadline(
                config.connect_timeout, lambda: f"rank {config.rank}: opening transports"
            ):
                sender = await load_transport(send_name).open_sender(send_link)
                receiver = await load_transport(recv_name).open_receiver(recv_link)
        except BaseException:
            if sender is not None:
                await asyncio.shield(sender.aclose(graceful=False))
            send_link.sock.close()
            recv_link.sock.close()
            raise
        return cls(config, sender, receiver, send_name, recv_name)

    # -- properties ------------------------------------------------------------
    @property
    def rank(self) -> int:
        """This end's rank (``config.rank``)."""
        return self.config.rank

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` started; every later call raises PipeClosedError."""
        return self._closed

    @property
    def window(self) -> ByteSemaphore:
        """The send window (for metrics: ``held``, ``available``, ``capacity``)."""
        return self._window

    @property
    def pending_bytes(self) -> int:
        """Bytes accepted by ``send`` that have not left yet."""
        return self._window.held

    def _describe(self, op: str) -> str:
        cfg = self.config
        peer = cfg.next_rank if op in ("send", "flush") else cfg.prev_rank
        arrow = "->" if op in ("send", "flush") else "<-"
        return f"{op} on rank {cfg.rank} {arrow} rank {peer}"

    def _check_open(self) -> None:
        if self._closed:
            raise PipeClosedError(f"rank {self.config.rank}: the pipe is closed")

    def _raise_send_error(self) -> None:
        error = self._send_error or self._sender.error
        if error is not None:
            self._send_error = error
            self._error_reported = True
            raise error

    # -- sending ---------------------------------------------------------------
    async def send(
        self, tensor: torch.Tensor | None, *, timeout: float | None = _DEFAULT
    ) -> Transfer:
        """Accept ``tensor`` (or None) for sending, in order, to the next rank.

        Returns once accepted into the window; the caller must not mutate the
        tensor until the returned Transfer completes. Raises
        UnsupportedTensorError (nothing accepted) for bad input.
        """
        if self._closed:
            self._check_open()
        if self._send_error is not None or self._sender.error is not None:
            self._raise_send_error()
        checked = check_sendable(tensor)
        data = dense(checked) if checked is not None else None
        nbytes = 0 if data is None else data.numel() * data.element_size()
        if nbytes > self.config.max_frame_bytes:
            raise FrameTooLargeError(nbytes, self.config.max_frame_bytes, f"rank {self.rank} send")
        wait = self.config.op_timeout if timeout is _DEFAULT else timeout
        if not self._window.try_acquire(nbytes):
            async with deadline(
                wait, lambda: self._describe("send") + f": waiting for {nbytes} bytes of window"
            ):
                await self._window.acquire(nbytes)
        if self._closed or self._sender.error is not None:
            self._window.release(nbytes)
            self._check_open()
            self._raise_send_error()
        # Nothing below awaits: once the window is granted the message is
        # queued, so cancellation can only happen before acceptance.
        try:
            header = header_for(self._next_seq, data)
        except BaseException:
            self._window.release(nbytes)
            raise
        self._next_seq += 1
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight.add(done)
        self._sender.submit(OutgoingMessage(header, data, done))
        if done.done():
            # Written synchronously (the common case for small tensors):
            # settle now instead of paying a loop iteration for the callback.
            self._on_done(done, nbytes)
        else:
            done.add_done_callback(lambda f: self._on_done(f, nbytes))
        return Transfer(done, header.seq, nbytes)

    def _on_done(self, fut: asyncio.Future[None], nbytes: int) -> None:
        self._inflight.discard(fut)
        self._window.release(nbytes)
        if fut.cancelled():
            return
        error = fut.exception()  # also marks it retrieved
        if error is None:
            self.bytes_sent += nbytes
        elif self._send_error is None:
            self._send_error = error
            self._window.close(error)

    async def flush(self, *, timeout: float | None = _DEFAULT) -> None:
        """Wait until every accepted send has left (or raise why it could not)."""
        self._check_open()
        await self._drain(self.config.op_timeout if timeout is _DEFAULT else timeout)

    async def _drain(self, timeout: float | None) -> None:
        if self._inflight:
            async with deadline(
                timeout, lambda: self._describe("flush") + f": {self.pending_bytes} bytes pending"
            ):
                await asyncio.wait(set(self._inflight))
        # Only a transfer that failed is a flush error: a peer that closed
        # after receiving everything is not.
        if self._send_error is not None:
            self._error_reported = True
            raise self._send_error

    # -- receiving ------------------------------------------------------------
    async def recv(self, *, timeout: float | None = _DEFAULT) -> torch.Tensor | None:
        """The next tensor (or None) from the previous rank, in order.

        Raises PeerClosedError once the previous rank closed or died and
        everything it sent before has been returned.
        """
        self._check_open()
        wait = self.config.op_timeout if timeout is _DEFAULT else timeout
        if wait is None:
            result = await self._receiver.recv()
        else:
            async with deadline(wait, lambda: self._describe("recv")):
                result = await self._receiver.recv()
        if result is not None:
            self.bytes_received += result.numel() * result.element_size()
        return result

    # -- closing ----------------------------------------------------------------
    async def aclose(self) -> None:
        """Flush (bounded by ``close_timeout``), tell the peer, free everything.

        Idempotent. Always frees sockets and tasks, even when cancelled. Raises
        a send error that no earlier call reported (data that never left).
        """
        if self._closing is not None:
            await asyncio.shield(self._closing)
            return
        self._closing = asyncio.get_running_loop().create_future()
        # Cancelled while draining: close at once, don't spend close_timeout
        # again on a goodbye the caller no longer waits for.
        graceful = False
        reported = self._error_reported
        try:
            with contextlib.suppress(Exception):
                await self._drain(self.config.close_timeout)
            # _drain's error was swallowed here, so no caller has seen it yet.
            self._error_reported = reported
            graceful = not self._inflight and self._send_error is None
        finally:
            self._closed = True
            self._window.close(PipeClosedError(f"rank {self.rank}: the pipe is closed"))
            closing = asyncio.ensure_future(self._close_channels(graceful))
            try:
                await asyncio.shield(closing)
            finally:
                if not self._closing.done():
                    self._closing.set_result(None)
        if self._send_error is not None and not self._error_reported:
            self._error_reported = True
            raise self._send_error

    async def _close_channels(self, graceful: bool) -> None:
        try:
            await self._sender.aclose(graceful=graceful)
        finally:
            await self._receiver.aclose()

    async def __aenter__(self) -> Pipe:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        cfg = self.config
        state = "closed" if self._closed else "open"
        return (
            f"<Pipe rank={cfg.rank}/{cfg.world_size} send={self.send_transport}->"
            f"{cfg.next_rank} recv={self.recv_transport}<-{cfg.prev_rank} {state}>"
        )
