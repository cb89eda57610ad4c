"""The receiving half of a GPU channel: headers in order, payloads finished in order.

Apart from the sending half (:mod:`aiokvpipe.cuda.channel`, whose docstring
explains the two-task design both follow) because the halves share no state:
a receiver reads headers and bounds what the consumer has not taken yet, a
sender captures producer fences and bounds what it has queued. A transport
subclasses one of each.
"""

from __future__ import annotations

import abc
import asyncio
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import PeerClosedError, PipeClosedError
from ..semaphore import ByteSemaphore
from ..wire import FrameHeader, FrameKind
from .channel_shared import MAX_INFLIGHT, ChannelLifecycle, _cancel_all, _settle
from .control import ControlSocket


def empty_frame(header: FrameHeader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tensor, raw)``: the destination of a tensor frame and its flat uint8 bytes.

    Allocated on ``device``'s current stream, i.e. the consumer's, so the
    caching allocator recycles it there once the consumer drops it.
    """
    assert header.dtype is not None
    raw = torch.empty(header.nbytes, dtype=torch.uint8, device=device)
    if header.nbytes == 0:
        return torch.empty(header.shape, dtype=header.dtype, device=device), raw
    return raw.view(header.dtype).view(header.shape), raw


@dataclass
class Received:
    """A message on its way to the consumer; ``state`` is transport-specific."""

    tensor: torch.Tensor | None
    nbytes: int = 0
    state: Any = None
    seq: int = 0


@dataclass(frozen=True)
class _Eof:
    header: FrameHeader


class OrderedReceiver(ChannelLifecycle):
    """Set up, read headers, begin each transfer, finish in order, hand over on ``recv``.

    Bytes received but not yet taken by ``recv`` are bounded by a
    :class:`ByteSemaphore` of ``window_bytes`` (one message larger than the
    window still passes alone), so a slow consumer holds the sender back
    instead of filling the GPU.
    """

    def __init__(
        self,
        control: ControlSocket,
        *,
        device: torch.device,
        window_bytes: int,
        max_frame_bytes: int,
        max_inflight: int = MAX_INFLIGHT,
    ) -> None:
        self._control = control
        self._device = device
        self._window = ByteSemaphore(window_bytes)
        self._inflight = ByteSemaphore(max_inflight)  # one unit per begun, unfinished transfer
        self._max_frame_bytes = max_frame_bytes
        self._expected_seq = 0
        self._to_finish: asyncio.Queue[Received | _Eof] = asyncio.Queue()
        self._pending: deque[Received] = deque()
        self._ready: asyncio.Queue[Received | _Eof | BaseException] = asyncio.Queue()
        self._closed = False
        self._init_lifecycle()

    @abc.abstractmethod
    async def _setup(self) -> None:
        """Meet the peer and get the device side ready (runs before any header)."""

    @abc.abstractmethod
    async def _begin(self, header: FrameHeader) -> Received:
        """Queue the device work that brings this tensor frame's payload in."""

    @abc.abstractmethod
    async def _finish_item(self, item: Received) -> None:
        """Return once ``item``'s payload has fully arrived (and tell the peer if needed)."""

    @abc.abstractmethod
    async def _on_close_frame(self, close: FrameHeader) -> None:
        """The peer's CLOSE arrived and every earlier message has finished."""

    @abc.abstractmethod
    async def _release(self, pending: list[Received]) -> None:
        """Free device resources; ``pending`` transfers were begun but not finished."""

    def _workers(self) -> tuple[Coroutine[Any, Any, None], ...]:
        return self._run_reader(), self._run_finisher()

    async def recv(self) -> torch.Tensor | None:
        if self._closed:
            raise PipeClosedError(f"{self._control.describe}: channel is closed")
        item = await self._ready.get()  # Queue.get is cancellation-safe
        if isinstance(item, (_Eof, BaseException)):
            self._ready.put_nowait(item)  # every later recv sees it too
            if isinstance(item, _Eof):
                raise PeerClosedError(f"{self._control.describe}: the peer closed the pipe")
            raise item
        self._window.release(item.nbytes)
        return item.tensor

    async def aclose(self) -> None:
        self._closed = True
        await self._torn_down(PipeClosedError(f"{self._control.describe}: channel closed"))

    async def _run_reader(self) -> None:
        try:
            await self._setup()
            _settle(self._set_up_done, None)
            while True:
                header = await self._control.recv_header(
                    expected_seq=self._expected_seq, max_frame_bytes=self._max_frame_bytes
                )
                self._expected_seq += 1
                if header.kind is FrameKind.CLOSE:
                    self._to_finish.put_nowait(_Eof(header))
                    return
                if header.kind is FrameKind.NONE:
                    item = Received(None, seq=header.seq)
                elif header.nbytes == 0:
                    item = Received(empty_frame(header, self._device)[0], seq=header.seq)
                else:
                    await self._window.acquire(header.nbytes)
                    try:
                        await self._inflight.acquire(1)
                    except BaseException:
                        self._window.release(header.nbytes)
                        raise
                    try:
                        item = await self._begin(header)
                    except BaseException:
                        self._window.release(header.nbytes)
                        self._inflight.release(1)
                        raise
                    self._pending.append(item)
                self._to_finish.put_nowait(item)
        except Exception as exc:
            await self._fail(exc)

    async def _run_finisher(self) -> None:
        try:
            while True:
                item = await self._to_finish.get()
                if isinstance(item, _Eof):
                    await self._on_close_frame(item.header)
                    self._ready.put_nowait(item)
                    return
                if item.nbytes:
                    await self._finish_item(item)
                    self._pending.popleft()
                    self._inflight.release(1)
                self._ready.put_nowait(item)
        except Exception as exc:
            await self._fail(exc)

    async def _run_teardown(self, error: BaseException) -> None:
        _settle(self._set_up_done, error)
        await _cancel_all(self._tasks)
        self._window.close(error)
        self._inflight.close(error)
        pending = list(self._pending)
        self._pending.clear()
        # Messages that completed stay deliverable; after them, the error.
        self._ready.put_nowait(error)
        try:
            await self._release(pending)
        except Exception:  # best effort; the channel's outcome is already decided
            pass
        finally:
            self._control.close()
