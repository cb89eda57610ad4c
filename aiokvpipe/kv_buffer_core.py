"""The machinery behind a :class:`~aiokvpipe.kv_buffer.KVLookupBuffer`.

Kept apart from :mod:`aiokvpipe.kv_buffer` (the public calls) because it is a
different job: :class:`KVBufferCore` owns the state both sides of the buffer
share and the two background tasks that move it, the *reader* (serves the
peer's requests from the local entries, completes this side's pending
``drop_select`` futures) and the *writer* (sends each answer whole), plus how
a broken link fails every waiter and how the tasks stop. The wire format and
argument checks are in :mod:`aiokvpipe.kv_protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._timeouts import deadline
from .errors import AiokvpipeError, PeerClosedError, PipeClosedError
from .kv_protocol import _ANSWER, _ANY, _HIT, _ITEMS, _MISS, _REQUEST, _message, _parse_message
from .pipe import Pipe
from .semaphore import ByteSemaphore

#: ``[tokens, roi, key, value, hidden]`` of a hit, or five ``None`` s.
KVResult = list[torch.Tensor | None]

_NO_ANSWER: KVResult = [None] * _ITEMS


# ----------------------------------------------------------------- state


@dataclass
class _Entry:
    items: tuple[torch.Tensor | None, ...]  # tokens, roi, key, value, hidden
    key: bytes
    nbytes: int


@dataclass
class _Outgoing:
    """An answer, sent whole by the writer: the data, then the signal message.

    Only the writer sends answers, so the n-th hit on the signal pipe always
    pairs with the n-th group of five tensors on the data pipe.
    """

    signal: torch.Tensor
    data: Sequence[torch.Tensor | None] = ()
    release: int = 0  # buffer bytes to free once the data pipe accepted the data


@dataclass
class _Counters:
    inserted: int = 0
    served_hits: int = 0
    served_misses: int = 0
    abandoned_answers: int = 0


class KVBufferCore:
    """State, background tasks and teardown of one side; see the module doc.

    The constructor takes pipes that :class:`~aiokvpipe.kv_buffer.KVLookupBuffer`
    has already checked, inside the running ``loop``, and starts both tasks.
    """

    def __init__(
        self, signal_pipe: Pipe, data_pipe: Pipe, buffer_bytes: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._signal = signal_pipe
        self._data = data_pipe
        self._space = ByteSemaphore(buffer_bytes)
        self._entries: dict[int, _Entry] = {}  # insertion order = age
        self._by_key: dict[bytes, deque[int]] = {}
        self._next_entry = 0
        self._next_request = 0
        self._pending: dict[int, asyncio.Future[KVResult]] = {}
        self._outbox: asyncio.Queue[_Outgoing | None] = asyncio.Queue()
        self._counters = _Counters()
        self._error: BaseException | None = None
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        self._abort: asyncio.Task[None] | None = None  # closes the pipes after a break
        self._drain_waiters: list[asyncio.Future[None]] = []
        tag = f"kv-buffer rank {self.rank}"
        self._reader = loop.create_task(self._read_loop(), name=f"{tag} reader")
        self._writer = loop.create_task(self._write_loop(), name=f"{tag} writer")

    @property
    def rank(self) -> int:
        return self._signal.rank

    def _take(self, match_key: bytes | None) -> _Entry | None:
        """Remove and return the oldest entry matching ``match_key`` (None: any)."""
        if match_key is None:
            entry_id = next(iter(self._entries), None)
            if entry_id is None:
                return None
            match_key = self._entries[entry_id].key
        ids = self._by_key.get(match_key)
        if not ids:
            return None
        entry_id = ids.popleft()
        if not ids:
            del self._by_key[match_key]
        return self._entries.pop(entry_id)

    # -- background tasks --------------------------------------------------------
    async def _read_loop(self) -> None:
        try:
            while True:
                message = await self._signal.recv(timeout=None)
                kind, request_id, status, query_key = _parse_message(message)
                if kind == _REQUEST:
                    self._serve(request_id, None if status == _ANY else query_key)
                    continue
                result = _NO_ANSWER
                if status == _HIT:
                    result = [await self._data.recv(timeout=None) for _ in range(_ITEMS)]
                waiter = self._pending.pop(request_id, None)
                if waiter is None or waiter.done():
                    self._counters.abandoned_answers += 1
                else:
                    waiter.set_result(list(result))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._break(exc)

    def _serve(self, request_id: int, match_key: bytes | None) -> None:
        entry = self._take(match_key)
        if entry is None:
            self._counters.served_misses += 1
            self._outbox.put_nowait(_Outgoing(_message(_ANSWER, request_id, _MISS)))
            return
        self._counters.served_hits += 1
        self._outbox.put_nowait(
            _Outgoing(_message(_ANSWER, request_id, _HIT), entry.items, entry.nbytes)
        )

    async def _write_loop(self) -> None:
        try:
            while True:
                message = await self._outbox.get()
                if message is None:
                    return
                # Data first: by the time the peer wakes up for the answer, its
                # tensors are already arriving, which saves it a sleep/wake.
                for tensor in message.data:
                    await self._data.send(tensor, timeout=None)
                await self._signal.send(message.signal, timeout=None)
                if message.release:
                    self._space.release(message.release)
                    if self._space.held == 0:
                        self._wake_drain_waiters(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._break(exc)

    def _break(self, error: BaseException) -> None:
        """The link is broken: fail every waiter now and every call from now on."""
        if self._error is not None or self._closed:
            return
        if type(error) is PeerClosedError:
            # Say which object broke; the pipe's own message stays as the cause.
            wrapped = PeerClosedError(
                f"KVLookupBuffer on rank {self.rank}: the peer closed or went away ({error})"
            )
            wrapped.__cause__ = error
            error = wrapped
        self._error = error
        self._space.close(error)
        self._fail_pending(error)
        self._wake_drain_waiters(error)
        # Tell the peer now: its drop_select waits (by default without a
        # timeout) for an answer this side will never send, and its reader
        # for the rest of a hit. Closed pipes turn both into PeerClosedError.
        self._abort = asyncio.ensure_future(_close_quietly(self._signal, self._data))

    def _wake_drain_waiters(self, error: BaseException | None) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def _fail_pending(self, error: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            if not waiter.done():
                waiter.set_exception(error)

    async def _teardown(self) -> None:
        closed = PipeClosedError(f"KVLookupBuffer on rank {self.rank} is closed")
        self._closed = True
        self._space.close(closed)
        self._fail_pending(closed)
        self._wake_drain_waiters(closed)
        self._outbox.put_nowait(None)
        try:
            if self._error is None:
                with contextlib.suppress(Exception):
                    async with deadline(self._signal.config.close_timeout, lambda: "close"):
                        await asyncio.shield(self._writer)
        finally:
            for task in (self._writer, self._reader):
                task.cancel()
            await asyncio.gather(self._writer, self._reader, return_exceptions=True)
            await _close_quietly(self._signal, self._data)
            if self._abort is not None:
                await asyncio.wait([self._abort])
            self._entries.clear()
            self._by_key.clear()


async def _close_quietly(*pipes: Pipe) -> None:
    """Close pipes whose peer may be gone: a broken link is not a close error."""
    for pipe in pipes:
        with contextlib.suppress(AiokvpipeError, OSError):
            await pipe.aclose()
