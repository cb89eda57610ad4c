"""The scheduler side: which requests pull, which expose, and what to tell the worker.

Runs in vLLM's engine-core process, beside the scheduler, and never touches
the network: it decides, per request, from the request's
``kv_transfer_params``; the worker side (another process) moves the bytes.

Prefill instance (request params ``do_remote_decode``): when the request
finishes normally, :meth:`SchedulerSide.request_finished` keeps its blocks,
asks the worker to expose them, and returns the params the decode needs
(:func:`~.params.prefill_params`). Two ways to keep them:

* pinned (when vLLM bound its block pool, :meth:`bind_block_pool`): one
  extra reference on each block, and the request ends for vLLM at once
  (returns False). vLLM never hands a referenced block to another request,
  and the engine goes idle instead of stepping every millisecond until the
  decode has read (vLLM keeps stepping while a finished request still holds
  blocks: on a host with few cores that loop takes CPU from the decode).
  The worker reports each ended lease (read, expired, reader died) in its
  step metadata; :meth:`lease_ended` drops the references, at the first
  engine step after the lease ended (a step runs whenever any request is
  waiting for blocks, so pinned blocks never starve one).
* held by the request (no block pool): returns True; vLLM frees the blocks
  when the worker reports the request's sending finished.

Decode instance (params ``do_remote_prefill``): the prompt's tokens are
reported as externally available; once vLLM has allocated blocks for them,
the worker is told which remote blocks go into which local ones. With
``load_async`` the request waits (WAITING_FOR_REMOTE_KVS) until the whole
pull ended; without, it is scheduled in the same step and the worker loads
its blocks during that step's forward pass, so vLLM must compute at least
one token itself: the last prompt token (as it does after an async load).
Params this instance cannot use (another block size, a malformed list) are
logged and the prompt is computed locally: never a read of blocks nobody
vouches for.

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
    """Pull the remote blocks ``first_block, first_block + 1, ...`` of the
    request (by position in the prompt) into ``local_blocks``.

    ``error`` set: the pull cannot be done; the worker reports it failed at
    once and vLLM applies its failure policy.
    """

    request_id: str
    remote: RemotePrefill | None
    local_blocks: tuple[int, ...]
    num_tokens: int
    error: str = ""
    first_block: int = 0

    @property
    def remote_blocks(self) -> tuple[int, ...]:
        if self.remote is None or not self.local_blocks:
            return ()
        return self.remote.block_ids[self.first_block : self.first_block + len(self.local_blocks)]


@dataclass(frozen=True)
class ExposeSpec:
    """Grant the decode a read lease on ``block_ids`` of ``request_id``.

    ``pinned``: the blocks are held by :class:`SchedulerSide` (the lease's end
    goes back in the worker's step metadata), not by the request (its end is
    reported as the request's sending finished)."""

    request_id: str
    block_ids: tuple[int, ...]
    pinned: bool = False


@dataclass
class StepPlan:
    """What the worker must start in this engine step."""

    reads: list[ReadSpec] = field(default_factory=list)
    exposes: list[ExposeSpec] = field(default_factory=list)


class SchedulerSide:
    """Per-request decisions of one vLLM instance's scheduler."""

    def __init__(self, *, engine_id: str, block_size: int, load_async: bool = False) -> None:
        self.engine_id = engine_id
        self.block_size = block_size
        self.load_async = load_async
        self._addresses: dict[int, str] = {}  # tensor-parallel rank -> worker endpoint
        self._plan = StepPlan()
        # request id -> tokens cached here when its external tokens were
        # counted (block-aligned): where the blocks to fill start.
        self._local_hit: dict[str, int] = {}
        self._pool: Any = None  # vLLM's BlockPool, once bound
        # prefill request id -> (its pinned blocks, worker leases still open)
        self._pinned: dict[str, tuple[list[Any], int]] = {}

    def bind_block_pool(self, pool: Any) -> None:
        """vLLM's block pool: finished prefills' blocks are pinned in it
        (``touch``/``free_blocks``, the pool's own reference counting)."""
        self._pool = pool

    @property
    def pinned(self) -> dict[str, int]:
        """Prefill request id -> number of its blocks still pinned."""
        return {rid: len(blocks) for rid, (blocks, _) in self._pinned.items()}

    def lease_ended(self, request_id: str, count: int = 1) -> None:
        """``count`` workers' leases on ``request_id``'s blocks ended; once every
        worker's did, the blocks go back to vLLM."""
        entry = self._pinned.get(request_id)
        if entry is None:
            return
        blocks, open_leases = entry
        open_leases -= count
        if open_leases > 0:
            self._pinned[request_id] = (blocks, open_leases)
            return
        del self._pinned[request_id]
        # Tail first: vLLM evicts the first blocks of a free list first.
        self._pool.free_blocks(reversed(blocks))

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
        """Prompt tokens the prefill computed beyond what is cached here, and
        whether they load asynchronously (before the request is scheduled)."""
        remote = self._remote(request)
        if remote is None:
            return 0, False
        # A request scheduled in this step must leave vLLM a token to compute.
        usable = request.num_prompt_tokens - (0 if self.load_async else 1)
        count = min(remote.num_tokens, usable) - num_computed_tokens
        if count <= 0:
            return 0, False
        self._local_hit[request.request_id] = num_computed_tokens
        return count, self.load_async

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """Blocks are allocated: plan the pull of the remote blocks into them (once)."""
        remote = self._remote(request)
        if remote is None:
            return
        request.kv_transfer_params["do_remote_prefill"] = False  # one pull per request
        local_hit = self._local_hit.pop(request.request_id, 0)
        if num_external_tokens <= 0:
            # Everything is cached here already; the prefill's lease runs out
            # at its ttl and its blocks are freed then.
            return
        # The external tokens are [local_hit, local_hit + n) of the prompt
        # (local_hit is block-aligned): blocks first..end-1 of the request,
        # here and on the prefill alike.
        first = local_hit // self.block_size
        end = -(-(local_hit + num_external_tokens) // self.block_size)
        (ids, *_) = blocks.get_block_ids()
        local = tuple(ids[first:end])
        error = ""
        if len(local) < end - first:
            error = (
                f"vLLM allocated {len(ids)} blocks; the external tokens "
                f"[{local_hit}, {local_hit + num_external_tokens}) need blocks {first}..{end - 1}"
            )
        elif end > len(remote.block_ids):
            error = (
                f"{end - first} blocks to fill from block {first} but the prefill holds only "
                f"{len(remote.block_ids)} for {remote.num_tokens} tokens"
            )
        self._plan.reads.append(
            ReadSpec(
                request_id=request.request_id,
                remote=remote,
                local_blocks=local,
                num_tokens=num_external_tokens,
                error=error,
                first_block=first,
            )
        )

    # -------------------------------------------------------------- prefill

    def request_finished(
        self, request: Any, block_ids: Sequence[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Keep a finished prefill's blocks for the decode and say where they are."""
        self._local_hit.pop(request.request_id, None)  # aborted before its blocks came
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
        pinned = self._pool is not None
        if pinned:
            blocks = [self._pool.blocks[i] for i in ids]
            self._pool.touch(blocks)
            self._pinned[request.request_id] = (blocks, len(addresses))
        self._plan.exposes.append(ExposeSpec(request.request_id, ids, pinned))
        return not pinned, prefill_params(
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
