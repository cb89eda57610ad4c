"""The scheduler side: which requests pull, which expose, and what to tell the worker.

Runs in vLLM's engine-core process, beside the scheduler, and never touches
the network: it decides, per request, from the request's
``kv_transfer_params``; the worker side (another process) moves the bytes.

Prefill instance (request params ``do_remote_decode``): when the request
finishes normally, :meth:`SchedulerSide.request_finished` keeps its blocks
(returns True), asks the worker to expose them, and returns the params the
decode needs (:func:`~.params.prefill_params`). vLLM frees the blocks when
the worker reports the lease ended.

Decode instance (params ``do_remote_prefill``): the prompt's tokens are
reported as externally available and loaded asynchronously; once vLLM has
allocated blocks for them, the worker is told which remote blocks go into
which local ones. Params this instance cannot use (another block size, a
malformed list) are logged and the prompt is computed locally: never a read
of blocks nobody vouches for.

Duck-typed on vLLM's ``Request`` and ``KVCacheBlocks`` (only the attributes
named below), so it imports nothing from vLLM.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .params import InvalidParams, RemotePrefill, prefill_params

__all__ = ["ExposeSpec", "ReadSpec", "SchedulerSide", "StepPlan"]

logger = logging.getLogger(__name__)

# vLLM's RequestStatus names of a request that ran to its end (not aborted).
_FINISHED_NORMALLY = frozenset({"FINISHED_LENGTH_CAPPED", "FINISHED_STOPPED"})


@dataclass(frozen=True)
class ReadSpec:
    """Pull ``remote.block_ids[-len(local_blocks):]`` into ``local_blocks``.

    ``error`` set: the pull cannot be done; the worker reports it failed at
    once and vLLM applies its failure policy.
    """

    request_id: str
    remote: RemotePrefill | None
    local_blocks: tuple[int, ...]
    num_tokens: int
    error: str = ""

    @property
    def remote_blocks(self) -> tuple[int, ...]:
        if self.remote is None or not self.local_blocks:
            return ()
        return self.remote.block_ids[-len(self.local_blocks) :]


@dataclass(frozen=True)
class ExposeSpec:
    """Grant the decode a read lease on ``block_ids`` of ``request_id``."""

    request_id: str
    block_ids: tuple[int, ...]


@dataclass
class StepPlan:
    """What the worker must start in this engine step."""

    reads: list[ReadSpec] = field(default_factory=list)
    exposes: list[ExposeSpec] = field(default_factory=list)


class SchedulerSide:
    """Per-request decisions of one vLLM instance's scheduler."""

    def __init__(self, *, engine_id: str, block_size: int) -> None:
        self.engine_id = engine_id
        self.block_size = block_size
        self._addresses: dict[int, str] = {}  # tensor-parallel rank -> worker endpoint
        self._plan = StepPlan()

    # ------------------------------------------------------------ handshake

    def set_worker_addresses(self, addresses: Mapping[int, str]) -> None:
        """The worker endpoints' addresses, by tensor-parallel rank (from the
        workers' handshake metadata, once they registered the KV cache)."""
        self._addresses = dict(addresses)

    @property
    def addresses(self) -> list[str]:
        """Worker addresses in rank order (empty until the handshake)."""
        ranks = sorted(self._addresses)
        if ranks != list(range(len(ranks))):
            return []
        return [self._addresses[r] for r in ranks]

    # --------------------------------------------------------------- decode

    def _remote(self, request: Any) -> RemotePrefill | None:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill"):
            return None
        try:
            return RemotePrefill.parse(params, block_size=self.block_size)
        except InvalidParams as exc:
            logger.warning(
                "request %s: kv_transfer_params unusable (%s); computing the prompt locally",
                request.request_id,
                exc,
            )
            params["do_remote_prefill"] = False
            return None

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int, bool]:
        """Prompt tokens the prefill computed beyond what is cached here (loaded async)."""
        remote = self._remote(request)
        if remote is None:
            return 0, False
        count = min(remote.num_tokens, request.num_prompt_tokens) - num_computed_tokens
        if count <= 0:
            return 0, False
        return count, True

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """Blocks are allocated: plan the pull of the remote blocks into them (once)."""
        remote = self._remote(request)
        if remote is None:
            return
        request.kv_transfer_params["do_remote_prefill"] = False  # one pull per request
        if num_external_tokens <= 0:
            # Everything is cached here already; the prefill's lease runs out
            # at its ttl and its blocks are freed then.
            return
        local = tuple(blocks.get_unhashed_block_ids())
        error = ""
        if not local:
            error = "vLLM allocated no blocks for the external tokens"
        elif len(local) > len(remote.block_ids):
            error = (
                f"{len(local)} local blocks to fill but the prefill holds only "
                f"{len(remote.block_ids)} for {remote.num_tokens} tokens"
            )
        self._plan.reads.append(
            ReadSpec(
                request_id=request.request_id,
                remote=remote,
                local_blocks=local,
                num_tokens=num_external_tokens,
                error=error,
            )
        )

    # -------------------------------------------------------------- prefill

    def request_finished(
        self, request: Any, block_ids: Sequence[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Keep a finished prefill's blocks for the decode and say where they are."""
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_decode"):
            return False, None
        if request.status.name not in _FINISHED_NORMALLY or not block_ids:
            return False, None  # aborted or empty: nothing to hand over
        addresses = self.addresses
        if not addresses:
            logger.error(
                "request %s: the workers' endpoint addresses are unknown (no handshake); "
                "its KV cannot be handed to a decode instance",
                request.request_id,
            )
            return False, None
        ids = tuple(block_ids)
        self._plan.exposes.append(ExposeSpec(request.request_id, ids))
        return True, prefill_params(
            engine_id=self.engine_id,
            request_id=request.request_id,
            addresses=addresses,
            block_ids=ids,
            num_tokens=request.num_computed_tokens,
            block_size=self.block_size,
        )

    # ----------------------------------------------------------------- step

    def take_plan(self) -> StepPlan:
        """This step's work for the workers; the next step starts empty."""
        plan, self._plan = self._plan, StepPlan()
        return plan
