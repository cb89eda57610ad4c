"""``AiokvpipeConnector``: vLLM's v1 KV connector interface, pull mode.

vLLM builds the connector twice: once in the engine-core process with the
SCHEDULER role (decisions, :mod:`.scheduler`) and once per worker with the
WORKER role (bytes, :mod:`.agent`). The worker's endpoint address reaches
the scheduler through vLLM's handshake-metadata hook, so ``port: 0`` works.

Worker side, per engine step: :meth:`start_load_kv` hands this step's pulls
and leases to the agent's event loop; :meth:`get_transfer_results` reports
what ended (leases ended; async reads done or failed).

How a decode loads (``load_mode``):

* ``sync`` (default): the request is scheduled in the step that admits it.
  The step's reads start in :meth:`handle_preemptions` (the first hook of a
  step on the worker), one per ``layers_per_read`` layers (default: one for
  all); :meth:`start_load_kv` (which vLLM calls just before a forward pass
  that needs loads) waits for layer 0's; :meth:`wait_for_layer_load` of
  layer ``i`` waits for layer ``i + 1``'s. One layer ahead, because vLLM's
  CPU attention writes the step's new KV into the cache *before* it calls
  ``wait_for_layer_load`` for that layer: the last loaded block also holds
  the first token computed here, and its read must land before that write,
  never after it. A failed read makes its blocks
  invalid (:meth:`get_block_ids_with_load_errors`) in the same step; vLLM
  discards the step's output for the request and recomputes or fails it.
* ``async``: the request waits in vLLM's WAITING_FOR_REMOTE_KVS state while
  the whole pull runs beside other requests' steps; it is scheduled once
  :meth:`get_transfer_results` reported the read done (or failed).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from ...errors import ConfigError
from .agent import ReadOrder, TransferAgent
from .params import InvalidParams
from .scheduler import SchedulerSide, StepPlan
from .settings import ConnectorSettings
from .trace import event, scheduled_events

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = [
    "AiokvpipeConnector",
    "AiokvpipeConnectorMetadata",
    "AiokvpipeConnectorStats",
    "AiokvpipeHandshake",
    "AiokvpipeWorkerMetadata",
]

logger = logging.getLogger(__name__)


@dataclass
class AiokvpipeConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step: the pulls and leases to start."""

    plan: StepPlan = field(default_factory=StepPlan)
    # Worker side: set once the plan's transfers were started (the worker's
    # own copy; vLLM sends each step's metadata to the worker once).
    started: bool = False


@dataclass
class AiokvpipeWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, per step: the leases on pinned blocks that ended,
    as request id -> number of workers whose lease ended (summed over ranks)."""

    leases_ended: dict[str, int] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> AiokvpipeWorkerMetadata:
        if isinstance(other, AiokvpipeWorkerMetadata):
            for rid, count in other.leases_ended.items():
                self.leases_ended[rid] = self.leases_ended.get(rid, 0) + count
        return self


@dataclass
class AiokvpipeHandshake(KVConnectorHandshakeMetadata):
    """Worker -> scheduler, once at start-up: where the worker's endpoint listens."""

    address: str


@dataclass
class AiokvpipeConnectorStats(KVConnectorStats):
    """Transfer counters of one interval, summed over workers and steps.

    ``data`` holds plain ints and a list of read durations, so it crosses
    vLLM's process boundaries as it is.
    """

    def reset(self) -> None:
        self.data: dict[str, Any] = {}

    def aggregate(self, other: KVConnectorStats) -> AiokvpipeConnectorStats:
        for key, value in other.data.items():
            if isinstance(value, list):
                self.data.setdefault(key, []).extend(value)
            else:
                self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        seconds = sorted(self.data.get("read_seconds", []))
        out: dict[str, int | float] = {
            key: value for key, value in self.data.items() if not isinstance(value, list)
        }
        out["read_MiB"] = round(self.data.get("read_bytes", 0) / (1 << 20), 3)
        if seconds:
            out["read_ms_p50"] = round(1000 * seconds[len(seconds) // 2], 3)
            out["read_ms_max"] = round(1000 * seconds[-1], 3)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in ("reads", "failed_reads", "exposed"))


def _route_logs() -> None:
    """Send aiokvpipe's log records through vLLM's handlers (same format, same
    stream), unless the host application configured the aiokvpipe logger itself."""
    ours = logging.getLogger("aiokvpipe")
    if ours.handlers:
        return
    theirs = logging.getLogger("vllm")
    for handler in theirs.handlers:
        ours.addHandler(handler)
    if theirs.handlers:
        ours.setLevel(theirs.getEffectiveLevel())
        ours.propagate = False


def _block_dim(tensor: torch.Tensor, num_blocks: int, layer: str) -> int:
    """Which dimension of a layer's cache indexes blocks (0 on the CPU backend's
    [blocks, kv_heads, block_size, 2*head_dim]; 1 on [2, blocks, ...] layouts)."""
    for dim in (0, 1):
        if tensor.dim() > dim and tensor.shape[dim] == num_blocks:
            return dim
    raise ConfigError(
        "kv_caches",
        f"layer {layer}: no dimension of shape {tuple(tensor.shape)} has the "
        f"{num_blocks} blocks vLLM allocated",
    )


class AiokvpipeConnector(KVConnectorBase_V1):
    """A vLLM v1 KV connector that pulls a prefill's KV blocks over aiokvpipe."""

    _cache_hit_source = CacheHitSource.P2P

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _route_logs()
        transfer = self._kv_transfer_config
        self._settings = ConnectorSettings.from_extra(transfer.kv_connector_extra_config)
        if len(kv_cache_config.kv_cache_groups) > 1:
            raise ConfigError(
                "kv_cache_groups",
                f"AiokvpipeConnector moves one KV cache group; this model has "
                f"{len(kv_cache_config.kv_cache_groups)}",
            )
        self._engine_id = str(transfer.engine_id)
        self._block_size = int(vllm_config.cache_config.block_size)
        self._num_blocks = int(kv_cache_config.num_blocks)
        self._scheduler: SchedulerSide | None = None
        self._agent: TransferAgent | None = None
        self._rank = 0
        self._layer_index: dict[str, int] = {}
        self._leases_ended: set[str] = set()  # worker: for the next step's metadata
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(
                engine_id=self._engine_id,
                block_size=self._block_size,
                load_async=self._settings.load_async,
            )
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._rank = get_tensor_model_parallel_rank()
            self._agent = TransferAgent(
                self._settings, name=f"{self._engine_id}-{os.getpid()}", rank=self._rank
            )

    # =========================================================== scheduler side

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        params = request.kv_transfer_params
        first = bool(params and params.get("do_remote_prefill"))
        side = self._scheduler
        tokens, load_async = side.get_num_new_matched_tokens(request, num_computed_tokens)
        if first:
            event("matched", request.request_id, tokens=tokens, load_async=load_async)
        return tokens, load_async

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        # The pull restores the request's own blocks in every group it moves.
        groups: tuple[int, ...] = self._kv_cache_config.transfer_group_ids
        return groups

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self._scheduler is not None
        event("alloc", request.request_id, tokens=num_external_tokens)
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        scheduled_events(r.req_id for r in scheduler_output.scheduled_new_reqs)
        return AiokvpipeConnectorMetadata(plan=self._scheduler.take_plan())

    def bind_gpu_block_pool(self, gpu_block_pool: Any) -> None:
        # Finished prefills' blocks are pinned in the pool (see .scheduler).
        if self._scheduler is not None and self._settings.pin_blocks:
            self._scheduler.bind_block_pool(gpu_block_pool)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        event("step_out")
        for rid in connector_output.finished_recving or ():
            event("recv_done", rid)
        meta = connector_output.kv_connector_worker_meta
        if self._scheduler is not None and isinstance(meta, AiokvpipeWorkerMetadata):
            for rid, count in meta.leases_ended.items():
                self._scheduler.lease_ended(rid, count)
        super().update_connector_output(connector_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request, block_ids)

    def set_xfer_handshake_metadata(
        self, metadata: dict[int, KVConnectorHandshakeMetadata]
    ) -> None:
        assert self._scheduler is not None
        addresses = {
            rank: meta.address
            for rank, meta in metadata.items()
            if isinstance(meta, AiokvpipeHandshake)
        }
        logger.info("aiokvpipe workers of %s listen on %s", self._engine_id, addresses)
        self._scheduler.set_worker_addresses(addresses)

    # ============================================================== worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._agent is not None
        layers = list(kv_caches.items())
        dims = {_block_dim(t, self._num_blocks, name) for name, t in layers}
        if len(dims) != 1:
            raise ConfigError("kv_caches", f"layers index blocks on different dims {dims}")
        block_dim = dims.pop()
        self._layer_index = {name: i for i, (name, _) in enumerate(layers)}
        address = self._agent.start([t for _, t in layers], block_dim)
        first = layers[0][1]
        logger.info(
            "aiokvpipe worker rank %d listens on %s: %d layers of %s %s, blocks on dim %d",
            self._rank,
            address,
            len(layers),
            tuple(first.shape),
            first.dtype,
            block_dim,
        )

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        if self._agent is None or not self._agent.address:
            return None
        return AiokvpipeHandshake(address=self._agent.address)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """vLLM hands the worker the step's metadata here, before it updates its
        batch and prepares the step's inputs: the step's leases and reads start
        now, so they overlap that work (when vLLM zeroes newly allocated blocks
        during that update, reads wait for :meth:`start_load_kv`: after it)."""
        if self._kv_cache_config.needs_kv_cache_zeroing:
            return
        self._start_transfers(kv_connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._start_transfers(self._connector_metadata)
        assert self._agent is not None
        if self._agent.loading:
            self._agent.wait_layer(0)  # see the module docstring: one layer ahead
            event("load_end")

    def _start_transfers(self, meta: KVConnectorMetadata | None) -> None:
        """Start ``meta``'s leases and reads, once per step (either hook may come first)."""
        assert self._agent is not None
        if not isinstance(meta, AiokvpipeConnectorMetadata) or meta.started:
            return
        meta.started = True
        agent = self._agent
        for expose in meta.plan.exposes:
            agent.expose(expose.request_id, expose.block_ids, pinned=expose.pinned)
        in_step: list[ReadOrder] = []
        for spec in meta.plan.reads:
            if spec.error or spec.remote is None:
                failure = spec.error or "no remote prefill"
            else:
                try:
                    address = spec.remote.address_for(self._rank)
                except InvalidParams as exc:
                    failure = str(exc)
                else:
                    order = ReadOrder(
                        request_id=spec.request_id,
                        address=address,
                        remote_request_id=spec.remote.request_id,
                        remote_blocks=spec.remote_blocks,
                        local_blocks=spec.local_blocks,
                        num_tokens=spec.num_tokens,
                        corrupt=spec.remote.corrupt,
                    )
                    if self._settings.load_async:
                        event("issue", order.request_id)
                        agent.read(order)
                    else:
                        in_step.append(order)
                    continue
            if self._settings.load_async:
                agent.fail(spec.request_id, failure)
            else:
                agent.fail_blocks(spec.request_id, spec.local_blocks, failure)
        if in_step:
            event("load_start", n=len(in_step))
            agent.load(in_step)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Sync mode: the next layer's reads land before this layer writes its new KV."""
        if self._agent is None or self._settings.load_async:
            return
        index = self._layer_index.get(layer_name)
        if index is None:  # not a layer we registered: wait for everything
            for layer in range(self._agent.num_layers):
                self._agent.wait_layer(layer)
            return
        self._agent.wait_layer(index + 1)

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        """Pull mode saves nothing: the decode reads the prefill's blocks in place."""

    def wait_for_save(self) -> None:
        """Pull mode saves nothing."""

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self._agent is not None
        self._agent.end_load()  # after the forward pass: no read of this step still runs
        if finished_req_ids:
            # Reads of aborted requests end now (reported failed below or next step).
            self._agent.cancel(finished_req_ids)
        results = self._agent.poll()
        self._leases_ended |= results.leases_ended
        for rid in results.finished_recving:
            event("reported", rid)
        return KVConnectorTransferResults(
            finished_sending=results.finished_sending,
            finished_recving=results.finished_recving,
            failed_recving=set(results.failed_recving),
        )

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if not self._leases_ended:
            return None
        ended, self._leases_ended = self._leases_ended, set()
        return AiokvpipeWorkerMetadata(leases_ended=dict.fromkeys(ended, 1))

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Sync mode: this step's blocks whose read failed (vLLM then applies
        ``kv_load_failure_policy`` to the requests that hold them)."""
        return set() if self._agent is None else self._agent.take_load_errors()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending, results.finished_recving

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._agent is None:
            return None
        data = self._agent.take_stats()
        return None if data is None else AiokvpipeConnectorStats(data=data)

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> KVConnectorStats | None:
        return AiokvpipeConnectorStats(data=dict(data or {}))

    def shutdown(self) -> None:
        if self._agent is not None:
            self._agent.close()
