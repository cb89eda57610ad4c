"""The worker side's transfers, without vLLM: expose, pull, report.

:class:`TransferAgent` owns one :class:`~aiokvpipe.endpoint.Endpoint` on a
:class:`~.loop_thread.LoopThread` and the worker's KV cache registered as one
block region. vLLM's worker calls it between forward passes:

* on the prefill: :meth:`expose` grants the decode a read lease on a finished
  request's blocks; when the lease completes (read done), expires or its
  reader dies, the request is reported *sent* so vLLM frees the blocks;
* on the decode, ``load_mode: async``: :meth:`read` pulls the remote blocks
  into the blocks vLLM allocated; the request is reported *received*, or
  *failed* with the cause, after at most ``read_timeout``; :meth:`poll`
  hands over what ended since the last call;
* on the decode, ``load_mode: sync``: :meth:`load` starts one read per
  layer of this step's requests, :meth:`wait_layer` waits for one layer's
  reads (the forward pass calls it layer by layer), :meth:`end_load` ends
  the step's loading; blocks whose read failed are handed over by
  :meth:`take_load_errors` (vLLM then recomputes or fails the request).

Every call vLLM makes between forward passes returns at once (it only
schedules work on the loop); the sync mode's waits block the forward pass,
each bounded by ``read_timeout`` from the step's start; :meth:`start` and
:meth:`close` wait at engine start and shutdown.
Its records (orders, results, per-step loads, counters) are in
:mod:`.agent_records`. This module imports nothing from vLLM, so its
behaviour (dead owners, expired leases, the bit-flip hook) is tested without
an engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from ...errors import AiokvpipeError, LeaseNotGrantedError, PipeClosedError, TransferTimeout
from .agent_records import ReadOrder, TransferResults, _Load, _Stats
from .loop_thread import LoopThread
from .settings import ConnectorSettings
from .trace import event

if TYPE_CHECKING:
    from ...endpoint import Endpoint

__all__ = ["REGION", "ReadOrder", "TransferAgent", "TransferResults", "flip_bits"]

logger = logging.getLogger(__name__)

#: The block region the KV cache is registered under, on every instance.
REGION = "kv"
_START_TIMEOUT = 60.0
_CLOSE_TIMEOUT = 10.0


def flip_bits(tensors: Sequence[torch.Tensor], block_dim: int, blocks: Sequence[int]) -> None:
    """Invert every bit of ``blocks`` in each tensor (the test-only negative control)."""
    index = torch.tensor(list(blocks), dtype=torch.long)
    for tensor in tensors:
        view = tensor.index_select(block_dim, index)  # a contiguous copy
        view.view(torch.uint8).bitwise_not_()
        tensor.index_copy_(block_dim, index, view)


class TransferAgent:
    """A worker's endpoint, its registered KV cache, and the transfers in flight."""

    def __init__(self, settings: ConnectorSettings, *, name: str, rank: int = 0) -> None:
        self._settings = settings
        self._name = name
        self._rank = rank
        self._thread: LoopThread | None = None
        self._ep: Endpoint | None = None
        self._tensors: tuple[torch.Tensor, ...] = ()
        self._block_dim = 0
        self._block_bytes = 0
        self._lock = threading.Lock()
        self._results = TransferResults()
        self._reads: dict[str, asyncio.Future[None]] = {}  # loop-thread futures
        self._leases: dict[str, Any] = {}
        self._stats = _Stats()
        self._address = ""
        # sync mode: this step's loads, the layers already waited for, the
        # step's deadline, and the blocks whose load failed (for vLLM).
        self._loads: list[_Load] = []
        self._waited: set[int] = set()
        self._load_deadline = 0.0
        self._load_errors: set[int] = set()

    # ------------------------------------------------------------ life cycle

    @property
    def address(self) -> str:
        """Where peers dial this worker's endpoint (set by :meth:`start`)."""
        return self._address

    def start(self, tensors: Sequence[torch.Tensor], block_dim: int) -> str:
        """Start the endpoint and register ``tensors`` (blocking; engine start-up)."""
        if self._thread is not None:
            raise PipeClosedError(f"{self._name}: the transfer agent is already started")
        self._tensors = tuple(tensors)
        self._block_dim = block_dim
        self._block_bytes = sum(
            t.element_size() * t.numel() // t.shape[block_dim] for t in self._tensors
        )
        self._thread = LoopThread(f"aiokvpipe-{self._name}-r{self._rank}")
        try:
            self._address = self._thread.run(self._start(), _START_TIMEOUT)
        except BaseException:
            self._thread.stop()
            self._thread = None
            raise
        return self._address

    async def _start(self) -> str:
        from ...endpoint import Endpoint

        cfg = self._settings.endpoint_config(name=self._name, rank=self._rank)
        ep = await Endpoint.start(cfg)
        try:
            registered = ep.register(REGION, list(self._tensors), block_dim=self._block_dim)
            if asyncio.iscoroutine(registered):
                await registered
        except BaseException:
            await ep.aclose()
            raise
        self._ep = ep
        return str(ep.address)

    def close(self) -> None:
        """Cancel what is in flight, close the endpoint, stop the thread. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            thread.run(self._close(), _CLOSE_TIMEOUT)
        except (AiokvpipeError, RuntimeError) as exc:
            logger.warning("%s: closing the endpoint failed: %s", self._name, exc)
        finally:
            thread.stop()

    async def _close(self) -> None:
        for future in list(self._reads.values()):
            future.cancel()
        for lease in list(self._leases.values()):
            lease.cancel()
        ep, self._ep = self._ep, None
        if ep is not None:
            await ep.aclose()

    # ------------------------------------------------------------- prefill

    def expose(self, request_id: str, blocks: Sequence[int], *, pinned: bool = False) -> None:
        """Grant a read lease on ``blocks`` for ``request_id`` (returns at once).

        The request is reported when the lease ends, however it ends, so its
        blocks are always given back to vLLM: in ``finished_sending``, or in
        ``leases_ended`` when the scheduler side ``pinned`` them.
        """
        self._require_thread().submit(self._serve(request_id, tuple(blocks), pinned))

    async def _serve(self, request_id: str, blocks: tuple[int, ...], pinned: bool) -> None:
        try:
            ep = self._require_ep()
            lease = ep.expose(request_id, REGION, list(blocks), ttl=self._settings.lease_ttl)
            self._leases[request_id] = lease
            self._stats.add(exposed=1)
            await lease.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._stats.add(leases_failed=1)
            logger.warning(
                "%s: the lease on request %s's %d block(s) ended without a completed read "
                "(%s: %s); the blocks are freed",
                self._name,
                request_id,
                len(blocks),
                type(exc).__name__,
                exc,
            )
        else:
            self._stats.add(leases_done=1)
        finally:
            self._leases.pop(request_id, None)
            with self._lock:
                if pinned:
                    self._results.leases_ended.add(request_id)
                else:
                    self._results.finished_sending.add(request_id)

    # -------------------------------------------------------------- decode

    def read(self, order: ReadOrder) -> None:
        """Start pulling ``order`` (returns at once); its outcome comes from :meth:`poll`."""
        thread = self._require_thread()
        thread.loop.call_soon_threadsafe(self._start_read, order)

    def fail(self, request_id: str, reason: str) -> None:
        """Report a read that cannot even start (bad params, rank mismatch) as failed."""
        logger.warning("%s: KV load of request %s failed: %s", self._name, request_id, reason)
        self._stats.add(failed_reads=1)
        with self._lock:
            self._results.finished_recving.add(request_id)
            self._results.failed_recving[request_id] = reason

    def _start_read(self, order: ReadOrder) -> None:
        task = asyncio.ensure_future(self._pull(order))
        self._reads[order.request_id] = task
        task.add_done_callback(partial(self._read_ended, order.request_id))

    def _read_ended(self, request_id: str, task: asyncio.Future[None]) -> None:
        self._reads.pop(request_id, None)
        if task.cancelled():
            # Also a task cancelled before it ever ran: it must still be
            # reported, or vLLM would hold the request's blocks forever.
            self.fail(request_id, "cancelled (the request was aborted or the worker is closing)")

    async def _pull(self, order: ReadOrder) -> None:
        started = time.perf_counter()
        event("pull_start", order.request_id, blocks=len(order.local_blocks))
        failure: str | None = None
        try:
            await asyncio.wait_for(self._pull_retrying(order, started), self._settings.read_timeout)
        except (asyncio.TimeoutError, TransferTimeout):
            failure = (
                f"no complete read from {order.address} within "
                f"read_timeout={self._settings.read_timeout:g}s"
            )
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}"
        event("pull_end", order.request_id, ok=failure is None)
        if failure is None:
            seconds = time.perf_counter() - started
            if order.corrupt and self._settings.test_hooks:
                flip_bits(self._tensors, self._block_dim, order.local_blocks)
            self._stats.add_read(
                len(order.local_blocks) * self._block_bytes, order.num_tokens, seconds
            )
            with self._lock:
                self._results.finished_recving.add(order.request_id)
            return
        self.fail(
            order.request_id,
            f"pulling {len(order.remote_blocks)} block(s) of request "
            f"{order.remote_request_id} from {order.address}: {failure}",
        )

    async def _pull_retrying(
        self, order: ReadOrder, started: float, layers: Sequence[int] | None = None
    ) -> None:
        ep = self._require_ep()
        delay = 0.002
        while True:
            try:
                await ep.read(
                    order.address,
                    order.remote_request_id,
                    REGION,
                    remote_blocks=list(order.remote_blocks),
                    local_blocks=list(order.local_blocks),
                    layers=None if layers is None else list(layers),
                )
                return
            except LeaseNotGrantedError:
                # The owner's scheduler published the params a step before its
                # worker filed the lease: retry briefly, then give up.
                if time.perf_counter() - started + delay > self._settings.lease_grace:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)

    # --------------------------------------------------- decode, sync mode

    @property
    def num_layers(self) -> int:
        return len(self._tensors)

    @property
    def loading(self) -> bool:
        """Whether this step started sync-mode reads (:meth:`load`)."""
        return bool(self._loads)

    def load(self, orders: Sequence[ReadOrder]) -> None:
        """Start this step's reads (returns at once): per request, one read per
        ``layers_per_read`` layers (0: one for all), the first layers first.

        The step's forward pass then calls :meth:`wait_layer` before each
        layer's attention; every wait ends by ``read_timeout`` after now.
        """
        if not orders:
            return
        thread = self._require_thread()
        now = time.perf_counter()
        self._load_deadline = time.monotonic() + self._settings.read_timeout
        loads = [_Load(order, now) for order in orders]
        self._loads.extend(loads)
        step = self._settings.layers_per_read or self.num_layers
        for first in range(0, self.num_layers, step):
            layers = tuple(range(first, min(first + step, self.num_layers)))
            for item in loads:
                future = thread.submit(self._pull_layers(item, layers))
                for layer in layers:
                    item.futures[layer] = future

    async def _pull_layers(self, item: _Load, layers: tuple[int, ...]) -> None:
        order = item.order
        if layers[0] == 0:
            event("pull_start", order.request_id, blocks=len(order.local_blocks))
        whole = len(layers) == self.num_layers
        await self._pull_retrying(order, item.started, layers=None if whole else layers)
        if order.corrupt and self._settings.test_hooks:
            flip_bits([self._tensors[i] for i in layers], self._block_dim, order.local_blocks)
        if layers[-1] == self.num_layers - 1:
            event("pull_end", order.request_id, ok=True)

    def wait_layer(self, layer: int) -> None:
        """Block until every read of ``layer`` in this step ended (landed or failed)."""
        if layer in self._waited or not self._loads:
            return
        self._waited.add(layer)
        for item in self._loads:
            future = item.futures.get(layer)
            if future is None:
                continue
            if not future.done():
                remaining = self._load_deadline - time.monotonic()
                try:
                    future.result(max(remaining, 0.0))
                except Exception:
                    pass  # reported below
            if not future.done():
                future.cancel()  # past the deadline: the read stops where it is
                self._load_failed(
                    item,
                    f"no complete read from {item.order.address} within "
                    f"read_timeout={self._settings.read_timeout:g}s",
                )
            elif future.cancelled():
                self._load_failed(item, "cancelled (the worker is closing)")
            elif (exc := future.exception()) is not None:
                failure = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, TransferTimeout):
                    failure = f"no complete read from {item.order.address}: {exc}"
                self._load_failed(item, failure)

    def _load_failed(self, item: _Load, failure: str) -> None:
        if item.failure:
            return  # one report per request, whichever layer failed first
        item.failure = failure
        order = item.order
        self._load_errors.update(order.local_blocks)
        self._stats.add(failed_reads=1)
        logger.warning(
            "%s: KV load of request %s failed: pulling %d block(s) of request %s from %s: %s",
            self._name,
            order.request_id,
            len(order.remote_blocks),
            order.remote_request_id,
            order.address,
            failure,
        )

    def end_load(self) -> None:
        """End this step's loading: wait for what no layer waited for, count the reads."""
        if not self._loads:
            return
        for layer in range(self.num_layers):
            self.wait_layer(layer)
        for item in self._loads:
            if not item.failure:
                order = item.order
                self._stats.add_read(
                    len(order.local_blocks) * self._block_bytes,
                    order.num_tokens,
                    time.perf_counter() - item.started,
                )
        self._loads = []
        self._waited = set()

    def fail_blocks(self, request_id: str, blocks: Sequence[int], reason: str) -> None:
        """A sync-mode load that cannot even start: its blocks are invalid."""
        logger.warning("%s: KV load of request %s failed: %s", self._name, request_id, reason)
        self._stats.add(failed_reads=1)
        self._load_errors.update(blocks)

    def take_load_errors(self) -> set[int]:
        """Local blocks whose sync-mode load failed since the last call."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def cancel(self, request_ids: Iterable[str]) -> None:
        """Abandon the reads of ``request_ids`` (aborted requests); non-blocking."""
        ids = set(request_ids)
        if ids and self._thread is not None:
            self._thread.loop.call_soon_threadsafe(self._cancel, ids)

    def _cancel(self, ids: set[str]) -> None:
        for rid in ids:
            task = self._reads.get(rid)
            if task is not None:
                task.cancel()

    # -------------------------------------------------------------- report

    def poll(self) -> TransferResults:
        """Take what ended since the last call (thread-safe, non-blocking)."""
        with self._lock:
            results, self._results = self._results, TransferResults()
        return results

    def take_stats(self) -> dict[str, Any] | None:
        """This interval's counters (and reset them), or None when nothing happened."""
        return self._stats.take()

    def _require_thread(self) -> LoopThread:
        if self._thread is None:
            raise PipeClosedError(f"{self._name}: the transfer agent is not started or closed")
        return self._thread

    def _require_ep(self) -> Endpoint:
        if self._ep is None:
            raise PipeClosedError(f"{self._name}: the endpoint is not started or closed")
        return self._ep
