"""In-order send/receive machinery shared by the GPU transports.

A GPU transfer has two halves that must not be serialised: *starting* it
(write the header, queue device work) and *finishing* it (the device work
completed, or the peer acknowledged). Each channel runs two background tasks
joined by a FIFO: one starts transfers in submission order, the other
finishes them in the same order, so the GPU always has the next transfer
queued while the loop awaits the current one. Callers never touch the socket
or the device; they wait on futures and queues, so cancelling a caller
cannot leave half a frame behind.

Setting a transport up needs the peer (hellos, a communicator both ranks
join), but every rank opens its send end before its receive end, so an
``open`` that waited for the peer would deadlock the ring. Opening therefore
returns at once and the set-up runs first thing in the background; messages
submitted meanwhile queue behind it, and a failed set-up fails them.
``ready()`` waits for the set-up, so that ``connect``, once every channel is
open, reports a failed one itself.

The byte windows bound memory, not work: thousands of tiny messages fit in
any window, and each queues a kernel (and, for NCCL, a proxy operation) until
launching the next one blocks the thread that queues it. So each channel
also caps the messages it has in flight on the device at ``max_inflight``
and waits on that cap the way it waits on the window.

Subclasses supply the transport-specific steps; this module owns the
sending half (ordering, the first-error-wins failure path, the graceful close
and its CLOSE frame), :mod:`aiokvpipe.cuda.receiver` the receiving half, and
:mod:`aiokvpipe.cuda.channel_shared` what both use. The receiving half's names
stay importable from here.
"""

from __future__ import annotations

import abc
import asyncio
from collections import deque
from collections.abc import Coroutine
from typing import Any, Generic, Protocol, TypeVar

import torch

from .._timeouts import deadline
from ..errors import PipeClosedError
from ..semaphore import ByteSemaphore
from ..tensors import dense
from ..wire import FrameHeader, FrameKind
from .channel_shared import MAX_INFLIGHT, ChannelLifecycle, _cancel_all, _fail_future, _settle
from .control import ControlSocket
from .receiver import OrderedReceiver, Received, empty_frame
from .staging import to_device
from .streams import DeviceOps, as_fence, fence

__all__ = [
    "MAX_INFLIGHT",
    "Message",
    "OrderedReceiver",
    "OrderedSender",
    "Received",
    "empty_frame",
]

S = TypeVar("S")


class Message(Protocol):
    """What a send channel is handed (``transport.base.OutgoingMessage``)."""

    header: FrameHeader
    tensor: torch.Tensor | None
    done: asyncio.Future[None]


class OrderedSender(ChannelLifecycle, Generic[S]):
    """Set up, then start each message in order and finish each in order."""

    def __init__(
        self,
        control: ControlSocket,
        ops: DeviceOps,
        *,
        op_timeout: float | None,
        close_timeout: float,
        max_inflight: int = MAX_INFLIGHT,
    ) -> None:
        self._control = control
        self._ops = ops
        self._op_timeout = op_timeout
        self._close_timeout = close_timeout
        self._to_start: asyncio.Queue[tuple[Message, Any]] = asyncio.Queue()
        self._to_finish: asyncio.Queue[tuple[Message, S, bool]] = asyncio.Queue()
        # One unit per message with a payload between _start and _finish.
        self._inflight = ByteSemaphore(max_inflight)
        self._unresolved: deque[Message] = deque()
        self._set_up = False
        # Set when set-up is over and every submitted message is finished.
        self._idle = asyncio.Event()
        self._closed = False
        self._next_seq = 0
        self._init_lifecycle()

    # -- transport-specific steps -------------------------------------------
    @abc.abstractmethod
    async def _setup(self) -> None:
        """Meet the peer and get the device side ready (runs before any message)."""

    @abc.abstractmethod
    async def _start(self, message: Message, token: Any) -> S:
        """Put the message on its way (header written, device work queued).

        ``token`` is None for frames without payload, else what
        :meth:`on_device` turns into the tensor to send and its producer fence.
        """

    @abc.abstractmethod
    async def _finish(self, message: Message, state: S) -> None:
        """Return once the message's tensor memory is no longer needed."""

    @abc.abstractmethod
    async def _after_close_frame(self) -> None:
        """The CLOSE frame is written; wait for whatever the transport still needs."""

    @abc.abstractmethod
    async def _release(self) -> None:
        """Free device resources, stopping any device work still running."""

    # -- SendChannel ----------------------------------------------------------
    def _workers(self) -> tuple[Coroutine[Any, Any, None], ...]:
        return self._run_starter(), self._run_finisher()

    def submit(self, message: Any) -> None:
        if self._closed:
            _fail_future(message.done, PipeClosedError(f"{self._control.describe}: closed"))
            return
        if self._error is not None:
            _fail_future(message.done, self._error)
            return
        try:
            token = self._on_submit(message)
        except Exception as exc:
            _fail_future(message.done, exc)
            return
        self._next_seq = message.header.seq + 1
        self._unresolved.append(message)
        self._idle.clear()
        self._to_start.put_nowait((message, token))

    async def aclose(self, graceful: bool = True) -> None:
        closed = PipeClosedError(f"{self._control.describe}: channel closed")
        if self._closed:
            await self._torn_down(closed)
            return
        self._closed = True
        try:
            if graceful and self._error is None:
                what = f"{self._control.describe}: draining on close"
                async with deadline(self._close_timeout, lambda: what):
                    await self._idle.wait()
                    if self._error is None:
                        await self._control.send(self.close_frame().encode())
                        await self._after_close_frame()
        except Exception:  # a failed goodbye must not stop the teardown
            pass
        finally:
            await self._torn_down(closed)

    def close_frame(self) -> FrameHeader:
        """The CLOSE frame that follows every submitted message."""
        return FrameHeader(FrameKind.CLOSE, self._next_seq)

    def _on_submit(self, message: Message) -> Any:
        """Runs in the submitter's context: capture the producer fence *now*.

        The fence is recorded after :func:`dense`, so a copy that made the
        tensor contiguous is covered too. A tensor on another device is
        staged later, and staging orders itself after that device's producer.
        """
        tensor = message.tensor
        if tensor is None or message.header.nbytes == 0:
            return None
        tensor = dense(tensor)
        # The caller may name the fence (an event, or a stream whose queued
        # work is marked now); by default it is the current stream.
        given = getattr(message, "ready", None)
        ready = as_fence(given) if given is not None else None
        if tensor.device != self._ops.device:
            return tensor, ready
        return tensor, ready if ready is not None else fence(self._ops)

    async def on_device(self, token: Any) -> tuple[torch.Tensor, Any]:
        """``(tensor on this channel's device, producer fence or None)`` for a token."""
        tensor, ready = token
        if tensor.device != self._ops.device:
            staged = await to_device(
                tensor, self._ops.device, timeout=self._op_timeout, ready=ready
            )
            return staged, None
        return tensor, ready

    # -- machinery -------------------------------------------------------------
    async def _run_starter(self) -> None:
        try:
            await self._setup()
            self._set_up = True
            _settle(self._set_up_done, None)
            if not self._unresolved:
                self._idle.set()
            while True:
                message, token = await self._to_start.get()
                slot = token is not None
                if slot:
                    await self._inflight.acquire(1)
                state = await self._start(message, token)
                self._to_finish.put_nowait((message, state, slot))
        except Exception as exc:
            await self._fail(exc)

    async def _run_finisher(self) -> None:
        try:
            while True:
                message, state, slot = await self._to_finish.get()
                await self._finish(message, state)
                if slot:
                    self._inflight.release(1)
                finished = self._unresolved.popleft()
                assert finished is message, "transfers finished out of order"
                if not message.done.done():
                    message.done.set_result(None)
                if not self._unresolved and self._set_up:
                    self._idle.set()
        except Exception as exc:
            await self._fail(exc)

    async def _run_teardown(self, error: BaseException) -> None:
        _settle(self._set_up_done, error)
        await _cancel_all(self._tasks)
        self._inflight.close(error)
        try:
            # Device work stops *before* any message fails: failing a message
            # hands its tensor back to the caller, so nothing may still read it.
            await self._release()
        except Exception:  # best effort; the channel's outcome is already decided
            pass
        finally:
            self._control.close()
            while self._unresolved:
                _fail_future(self._unresolved.popleft().done, error)
            self._idle.set()
