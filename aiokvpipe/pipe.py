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
from collections.abc import Collection
from types import TracebackType
from typing import Any

import torch

from ._timeouts import deadline
from .config import PipeConfig
from .cuda.runtime import require_usable_device
from .errors import PipeClosedError
from .links.channels import open_both
from .outbound import Outbound, Transfer
from .rendezvous import rendezvous
from .semaphore import ByteSemaphore
from .transport import RecvChannel, SendChannel

__all__ = ["Pipe", "Transfer"]


class _FromConfig:
    """Default for ``timeout=``: use the config's ``op_timeout``."""

    def __repr__(self) -> str:
        return "config.op_timeout"


_DEFAULT: Any = _FromConfig()


class Pipe:
    """One rank's end: sends to ``(rank + 1) % world_size``, receives from ``rank - 1``.

    Create with ``await Pipe.connect(cfg)``; use as an async context manager
    or call :meth:`aclose`. Sending is an :class:`~aiokvpipe.outbound.Outbound`
    (shared with Endpoint); the ring itself comes from
    :func:`~aiokvpipe.rendezvous.rendezvous` over the link layer.
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
        self._out = Outbound(
            sender,
            window_bytes=config.buffer_bytes,
            max_frame_bytes=config.max_frame_bytes,
            describe=self._describe,
            closed_error=lambda: PipeClosedError(f"rank {config.rank}: the pipe is closed"),
        )
        self._receiver = receiver
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        self.bytes_received = 0

    # -- construction ----------------------------------------------------------
    @classmethod
    async def connect(cls, config: PipeConfig) -> Pipe:
        """Rendezvous with every rank and open both directions.

        Bounded by ``config.connect_timeout`` (TransferTimeout). A local
        device that cannot work raises CudaUnavailableError before any
        waiting for peers; a GPU transport's failed set-up raises here too.
        """
        require_usable_device(config.device, config.transport)
        send_link, recv_link = await rendezvous(config)
        send_name, sender, recv_name, receiver = await open_both(send_link, recv_link)
        try:
            await asyncio.gather(sender.ready(), receiver.ready())
        except BaseException:
            await asyncio.shield(sender.aclose(graceful=False))
            await asyncio.shield(receiver.aclose())
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
        """The send window (for metrics: ``held``, ``available``, ``capacity``).

        Every message holds its payload plus
        :data:`~aiokvpipe.wire.MESSAGE_OVERHEAD` of it.
        """
        return self._out.window

    @property
    def pending_bytes(self) -> int:
        """Payload bytes accepted by ``send`` that have not left yet."""
        return self._out.pending_bytes

    @property
    def bytes_sent(self) -> int:
        """Payload bytes whose transfer completed."""
        return self._out.bytes_sent

    # Internals the white-box tests look at (the Outbound owns them).
    @property
    def _sender(self) -> SendChannel:
        return self._out.sender

    @property
    def _inflight(self) -> Collection[asyncio.Future[None]]:
        return self._out.inflight

    def _describe(self, op: str) -> str:
        cfg = self.config
        peer = cfg.next_rank if op in ("send", "flush") else cfg.prev_rank
        arrow = "->" if op in ("send", "flush") else "<-"
        return f"{op} on rank {cfg.rank} {arrow} rank {peer}"

    def _check_open(self) -> None:
        if self._closed:
            raise PipeClosedError(f"rank {self.config.rank}: the pipe is closed")

    # -- sending ---------------------------------------------------------------
    async def send(
        self,
        tensor: torch.Tensor | None,
        *,
        timeout: float | None = _DEFAULT,
        ready: Any = None,
    ) -> Transfer:
        """Accept ``tensor`` (or None) for sending, in order, to the next rank.

        Returns once accepted into the window; the caller must not mutate the
        tensor until the returned Transfer completes. Raises
        UnsupportedTensorError (nothing accepted) for bad input.

        For a GPU tensor the transfer waits, on the device, for the work
        queued on the current stream when ``send`` is called. ``ready`` names
        another producer: a CUDA event, or a stream whose queued work counts.
        """
        if self._closed:
            self._check_open()
        return await self._out.send(
            tensor, self.config.op_timeout if timeout is _DEFAULT else timeout, ready
        )

    async def flush(self, *, timeout: float | None = _DEFAULT) -> None:
        """Wait until every accepted send has left (or raise why it could not)."""
        self._check_open()
        await self._out.drain(self.config.op_timeout if timeout is _DEFAULT else timeout)

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
        unreported: BaseException | None = None
        try:
            unreported = await self._out.aclose(self.config.close_timeout)
        finally:
            self._closed = True
            closing = asyncio.ensure_future(self._receiver.aclose())
            try:
                await asyncio.shield(closing)
            finally:
                if not self._closing.done():
                    self._closing.set_result(None)
        if unreported is not None:
            raise unreported

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
