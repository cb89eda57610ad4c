"""KVLookupBuffer: hand a prefill's KV tensors to a decode process, by tokens.

An asyncio re-design of the lookup buffer that disaggregated prefill/decode
servers put between a *producer* (prefill: ``insert``) and a *consumer*
(decode: ``drop_select``). It runs over two :class:`~aiokvpipe.pipe.Pipe`
pairs between the same two ranks:

* the **signal** pipe (CPU) carries requests and answers, each a single
  int64 tensor ``[magic, version, kind, request_id, status, *token_ids]``;
* the **data** pipe (CPU or GPU) carries the five tensors of a hit.

Both pipes are ordered streams of tensors and ``None`` only (no pickle).
Every request carries an id that its answer echoes: many ``drop_select``
calls can be in flight at once and each gets its own answer, whatever order
they were issued in. A request being one frame, ``drop_select`` sends it
itself; a cancelled caller can never leave half a message on the wire.

Each side runs two background tasks, started by the constructor:

* a **reader** that owns the receive side of both pipes. It serves requests
  from the local buffer (a dictionary lookup, no awaiting) and completes the
  future of each answered request. It never sends, so it can never be stuck
  behind a peer that is not reading — which is what keeps two sides that both
  insert and drop_select free of deadlock.
* a **writer** that sends answers from a queue, one whole answer at a time,
  so the n-th hit on the signal pipe always pairs with the n-th group of
  tensors on the data pipe.

Because every side serves, one class works on both sides and a side may do
both; there is no role to pick, and a request to a producer that never
inserted anything is still answered (with ``None`` s) at once.

**Matching rule.** ``roi`` is a boolean mask over ``tokens`` (``None``: all
of them). An entry matches a request when the *selected* token ids —
``tokens[roi]`` — are equal, same length and same values (compared as
int64, so int32 and int64 ids match). Among several matches the oldest is
taken. ``drop_select(None)`` takes the oldest entry, whatever its tokens.
Unlike a common-prefix rule, exact matching never hands one request's KV to
another request that only shares a prefix with it (a system prompt, say),
which would be a silent wrong answer; and it is a hash lookup, not a scan.

**Memory bound.** An entry's bytes (all five tensors) are held in a
:class:`ByteSemaphore` of ``buffer_bytes`` from ``insert`` until its answer
has been handed to the pipes, whose own windows bound it from then on.
``insert`` waits, without polling, while the buffer is full; an entry larger
than the whole buffer is accepted when the buffer is empty. The buffer keeps
references, not copies: do not modify inserted tensors.

This module holds the public calls; the shared state and the two tasks are in
:mod:`aiokvpipe.kv_buffer_core`, the wire messages in :mod:`aiokvpipe.kv_protocol`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import torch

from ._timeouts import deadline
from .config import DEFAULT_BUFFER_BYTES, DEFAULT_PORT, PipeConfig
from .errors import (
    ConfigError,
    FrameTooLargeError,
    KVBufferError,
    PipeClosedError,
)
from .kv_buffer_core import KVBufferCore, KVResult, _close_quietly, _Entry
from .kv_protocol import (
    _ANY,
    _BY_TOKENS,
    _REQUEST,
    _check_roi,
    _check_tensor,
    _check_tokens,
    _match_key,
    _message,
    _nbytes,
    _selected,
)
from .pipe import Pipe

__all__ = ["KVBufferStats", "KVLookupBuffer", "KVResult"]

Role = Literal["producer", "consumer"]

_ITEM_NAMES = ("tokens", "roi", "key", "value", "hidden")


@dataclass(frozen=True)
class KVBufferStats:
    """A snapshot for metrics; counters count since construction."""

    entries: int  #: entries waiting in this side's buffer
    buffered_bytes: int  #: bytes held against ``buffer_bytes`` (entries + answers leaving)
    capacity_bytes: int  #: ``buffer_bytes``
    inserted: int  #: successful ``insert`` calls
    served_hits: int  #: requests from the peer answered with an entry
    served_misses: int  #: requests from the peer answered with Nones
    pending_requests: int  #: this side's ``drop_select`` calls awaiting an answer
    abandoned_answers: int = 0  #: answers that came after their caller gave up


class KVLookupBuffer(KVBufferCore):
    """One side of a KV lookup buffer between two ranks (see the module doc).

    ``signal_pipe`` and ``data_pipe`` are two distinct, connected pipes of a
    world of two, with the same rank on this side; the buffer owns them from
    now on and closes them in :meth:`aclose`. Construct it inside the event
    loop that runs the pipes (its background tasks start at once), or use
    :meth:`connect`.
    """

    def __init__(
        self,
        signal_pipe: Pipe,
        data_pipe: Pipe,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        *,
        role: Role | None = None,
    ) -> None:
        if not isinstance(signal_pipe, Pipe):
            raise KVBufferError("signal_pipe", f"must be a Pipe, got {type(signal_pipe).__name__}")
        if not isinstance(data_pipe, Pipe):
            raise KVBufferError("data_pipe", f"must be a Pipe, got {type(data_pipe).__name__}")
        if signal_pipe is data_pipe:
            raise KVBufferError("data_pipe", "must be a different Pipe from signal_pipe")
        for name, pipe in (("signal_pipe", signal_pipe), ("data_pipe", data_pipe)):
            # Requests and answers travel back to the sender, which a ring of
            # more than two ranks would send elsewhere.
            if pipe.config.world_size != 2:
                raise KVBufferError(
                    name, f"needs a world of 2 ranks, got world_size={pipe.config.world_size}"
                )
            if pipe.closed:
                raise KVBufferError(name, "is closed")
        if signal_pipe.config.device != "cpu":
            raise KVBufferError(
                "signal_pipe",
                f"must receive onto the CPU (control messages are parsed on the host), "
                f"got device={signal_pipe.config.device!r}",
            )
        if signal_pipe.rank != data_pipe.rank:
            raise KVBufferError(
                "data_pipe", f"is rank {data_pipe.rank}, signal_pipe is rank {signal_pipe.rank}"
            )
        if isinstance(buffer_bytes, bool) or not isinstance(buffer_bytes, int) or buffer_bytes < 1:
            raise KVBufferError("buffer_bytes", f"must be a positive int, got {buffer_bytes!r}")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "KVLookupBuffer must be created inside the running event loop of its pipes"
            ) from None
        self.role = role
        super().__init__(signal_pipe, data_pipe, buffer_bytes, loop)

    # -- construction ----------------------------------------------------------
    @classmethod
    async def connect(
        cls,
        role: Role,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        device: str = "cpu",
        **pipe_options: Any,
    ) -> KVLookupBuffer:
        """Connect both pipes to the peer and return this side's buffer.

        The producer is rank 0 and serves the rendezvous; the signal pipe
        uses ``port`` and the data pipe ``port + 1``. ``device`` is where
        received KV tensors land (the signal pipe is always CPU);
        ``pipe_options`` (``token``, ``connect_timeout``, ``transport``, ...)
        go to both :class:`PipeConfig` s.
        """
        if role not in ("producer", "consumer"):
            raise ConfigError("role", f"must be 'producer' or 'consumer', got {role!r}")
        rank = 0 if role == "producer" else 1
        signal_cfg = PipeConfig(rank=rank, world_size=2, host=host, port=port, **pipe_options)
        data_cfg = signal_cfg.with_changes(port=port + 1, device=device)
        if signal_cfg.transport in ("nccl", "cuda_ipc"):
            # A few int64 values per message: never worth a GPU transport,
            # whatever was asked for the data.
            signal_cfg = signal_cfg.with_changes(transport="auto")
        signal = await Pipe.connect(signal_cfg)
        try:
            data = await Pipe.connect(data_cfg)
        except BaseException:
            await asyncio.shield(_close_quietly(signal))
            raise
        try:
            return cls(signal, data, buffer_bytes, role=role)
        except BaseException:
            await asyncio.shield(_close_quietly(signal, data))
            raise

    # -- metrics ---------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def buffer_bytes(self) -> int:
        return self._space.capacity

    @property
    def buffered_bytes(self) -> int:
        """Bytes held against ``buffer_bytes`` right now."""
        return self._space.held

    def __len__(self) -> int:
        """Entries waiting in this side's buffer."""
        return len(self._entries)

    @property
    def stats(self) -> KVBufferStats:
        c = self._counters
        return KVBufferStats(
            entries=len(self._entries),
            buffered_bytes=self._space.held,
            capacity_bytes=self._space.capacity,
            inserted=c.inserted,
            served_hits=c.served_hits,
            served_misses=c.served_misses,
            pending_requests=len(self._pending),
            abandoned_answers=c.abandoned_answers,
        )

    def _check_usable(self) -> None:
        if self._closed:
            raise PipeClosedError(f"KVLookupBuffer on rank {self.rank} is closed")
        if self._error is not None:
            raise self._error

    # -- producer --------------------------------------------------------------
    async def insert(
        self,
        tokens: torch.Tensor,
        roi: torch.Tensor | None,
        key: torch.Tensor,
        value: torch.Tensor,
        hidden: torch.Tensor | None,
        *,
        timeout: float | None = None,
    ) -> None:
        """Add an entry that the peer can ``drop_select`` by its tokens.

        Waits (no polling) while the buffer is full; raises TransferTimeout
        after ``timeout`` seconds, KVBufferError (naming the argument) for
        unusable tensors, FrameTooLargeError (naming it too) for one larger
        than the data pipe's ``max_frame_bytes``, PeerClosedError once the
        peer is gone. Keeps references: do not modify the tensors afterwards.
        """
        self._check_usable()
        tokens = _check_tokens("insert", tokens)
        roi = _check_roi("insert", roi, tokens)
        key = _check_tensor("insert", "key", key)
        value = _check_tensor("insert", "value", value)
        if value.shape != key.shape or value.dtype != key.dtype:
            raise KVBufferError(
                "value",
                f"insert(): {value.dtype} {tuple(value.shape)} does not match key "
                f"{key.dtype} {tuple(key.shape)}",
            )
        if value.device != key.device:
            raise KVBufferError("value", f"insert(): on {value.device}, key is on {key.device}")
        if hidden is not None:
            hidden = _check_tensor("insert", "hidden", hidden)
            if hidden.device != key.device:
                raise KVBufferError(
                    "hidden", f"insert(): on {hidden.device}, key is on {key.device}"
                )
        items = (tokens, roi, key, value, hidden)
        # Refuse now what the data pipe would refuse when the entry is served:
        # there, a hit fails after some of its five tensors went out.
        limit = self._data.config.max_frame_bytes
        for name, item in zip(_ITEM_NAMES, items, strict=True):
            if _nbytes(item) > limit:
                raise FrameTooLargeError(
                    _nbytes(item), limit, f"insert() on rank {self.rank}: {name}"
                )
        nbytes = sum(_nbytes(t) for t in items)
        match_key = _match_key(_selected(tokens, roi))
        if not self._space.try_acquire(nbytes):
            async with deadline(
                timeout,
                lambda: (
                    f"insert on rank {self.rank}: waiting for {nbytes} bytes of "
                    f"buffer ({self._space.held}/{self._space.capacity} held)"
                ),
            ):
                await self._space.acquire(nbytes)
        if self._closed or self._error is not None:
            self._space.release(nbytes)
            self._check_usable()
        entry_id = self._next_entry
        self._next_entry += 1
        self._entries[entry_id] = _Entry(items, match_key, nbytes)
        self._by_key.setdefault(match_key, deque()).append(entry_id)
        self._counters.inserted += 1

    async def wait_drained(self, *, timeout: float | None = None) -> None:
        """Wait until the peer has taken every inserted entry and its data left.

        For a producer's graceful shutdown: closing earlier would drop the
        entries nobody fetched yet. Raises PeerClosedError if the peer goes
        away first, TransferTimeout after ``timeout`` seconds.
        """
        self._check_usable()
        async with deadline(
            timeout,
            lambda: (
                f"wait_drained on rank {self.rank}: {len(self._entries)} entries, "
                f"{self._space.held} bytes still buffered"
            ),
        ):
            while self._space.held:
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._drain_waiters.append(waiter)
                try:
                    await waiter
                finally:
                    if waiter in self._drain_waiters:
                        self._drain_waiters.remove(waiter)

    # -- consumer --------------------------------------------------------------
    async def drop_select(
        self,
        tokens: torch.Tensor | None,
        roi: torch.Tensor | None = None,
        *,
        timeout: float | None = None,
    ) -> KVResult:
        """Take the peer's entry matching ``tokens[roi]`` (``None``: its oldest).

        Returns ``[tokens, roi, key, value, hidden]`` as inserted (tensors on
        the data pipe's device), removed from the peer's buffer, or five
        ``None`` s when nothing matches. Raises PeerClosedError if the peer
        closes or dies first, TransferTimeout after ``timeout`` seconds. A
        request that timed out or was cancelled may still have removed its
        entry on the peer; that entry is then dropped.
        """
        self._check_usable()
        query: torch.Tensor | None = None
        if tokens is not None:
            tokens = _check_tokens("drop_select", tokens)
            query = _selected(tokens, _check_roi("drop_select", roi, tokens))
        elif roi is not None:
            raise KVBufferError("roi", "drop_select(): a mask needs tokens to select from")
        request_id = self._next_request
        self._next_request += 1
        request = _message(_REQUEST, request_id, _ANY if query is None else _BY_TOKENS, query)
        answer: asyncio.Future[KVResult] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        try:
            async with deadline(
                timeout,
                lambda: (
                    f"drop_select on rank {self.rank} (request {request_id}, "
                    f"{'any entry' if query is None else f'{query.numel()} tokens'})"
                ),
            ):
                # Sent by the caller, not the writer task: one hop less, and a
                # one-frame message cannot be torn by cancellation.
                await self._signal.send(request, timeout=None)
                return await answer
        finally:
            self._pending.pop(request_id, None)

    # -- closing ---------------------------------------------------------------
    async def aclose(self) -> None:
        """Send what is queued (bounded by the pipes' ``close_timeout``), then
        stop the tasks and close both pipes, so the peer sees PeerClosedError.

        Idempotent; frees everything even when cancelled. Waiting
        ``insert``/``drop_select`` calls raise PipeClosedError.
        """
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._teardown())
        await asyncio.shield(self._closing)

    async def __aenter__(self) -> KVLookupBuffer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("broken" if self._error else "open")
        role = f" {self.role}" if self.role else ""
        return (
            f"<KVLookupBuffer rank={self.rank}{role} entries={len(self._entries)} "
            f"bytes={self._space.held}/{self._space.capacity} {state}>"
        )
