"""The scheduler side's decisions on vLLM's own Request and KVCacheBlocks objects
(no engine started), the factory's loading of the connector by module path,
and the stats class vLLM aggregates and logs."""

from __future__ import annotations

from typing import Any

import pytest
from vllm import SamplingParams
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.request import Request, RequestStatus

from aiokvpipe.integrations.vllm import AiokvpipeConnector, AiokvpipeConnectorStats
from aiokvpipe.integrations.vllm.params import prefill_params
from aiokvpipe.integrations.vllm.scheduler import SchedulerSide

BS = 128


def request(rid: str, n: int, params: dict[str, Any] | None) -> Request:
    sp = SamplingParams(
        max_tokens=16, extra_args={"kv_transfer_params": params} if params else None
    )
    return Request(rid, list(range(1, n + 1)), sp, None)


def blocks(ids: list[int], hashed: set[int] = frozenset()) -> KVCacheBlocks:  # type: ignore[assignment]
    group = []
    for i in ids:
        b = KVCacheBlock(i)
        if i in hashed:
            b._block_hash = b"h%d" % i  # a prefix-cache hit already holds this block
        group.append(b)
    return KVCacheBlocks((group,))


def side(load_async: bool = False) -> SchedulerSide:
    s = SchedulerSide(engine_id="eng", block_size=BS, load_async=load_async)
    s.set_worker_addresses({0: "127.0.0.1:4000"})
    return s


def test_prefill_keeps_blocks_and_returns_where_they_are() -> None:
    s = side()
    req = request("p1", 300, {"do_remote_decode": True})
    req.num_computed_tokens = 300
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    keep, params = s.request_finished(req, [4, 9, 2])
    assert keep is True and params is not None
    assert params["remote_addresses"] == ["127.0.0.1:4000"]
    assert params["remote_block_ids"] == [4, 9, 2] and params["remote_num_tokens"] == 300
    assert params["do_remote_prefill"] is True and params["remote_request_id"] == "p1"
    plan = s.take_plan()
    assert [(e.request_id, e.block_ids) for e in plan.exposes] == [("p1", (4, 9, 2))]
    assert not s.take_plan().exposes  # a plan is handed over once


def test_prefill_pins_its_blocks_in_vllms_pool_until_every_lease_ended() -> None:
    """With vLLM's block pool bound, the request ends for vLLM at once (the
    engine need not keep stepping) and the blocks stay out of the free list
    until each tensor-parallel worker's lease ended."""
    pool = BlockPool(num_gpu_blocks=16, enable_caching=True, hash_block_size=BS)
    held = pool.get_new_blocks(3)  # the request's blocks, as vLLM allocated them
    s = side()
    s.set_worker_addresses({0: "127.0.0.1:4000", 1: "127.0.0.1:4001"})
    s.bind_block_pool(pool)
    req = request("p9", 300, {"do_remote_decode": True})
    req.num_computed_tokens = 300
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    keep, params = s.request_finished(req, [b.block_id for b in held])
    assert keep is False and params is not None and params["remote_num_tokens"] == 300
    (expose,) = s.take_plan().exposes
    assert expose.pinned and expose.block_ids == tuple(b.block_id for b in held)
    free = pool.get_num_free_blocks()
    pool.free_blocks(held)  # vLLM frees the finished request's blocks
    assert pool.get_num_free_blocks() == free  # still pinned: no one can reuse them
    s.lease_ended("p9")  # rank 0's lease
    assert pool.get_num_free_blocks() == free and s.pinned == {"p9": 3}
    s.lease_ended("p9")  # rank 1's
    assert pool.get_num_free_blocks() == free + 3 and s.pinned == {}
    s.lease_ended("p9")  # a late duplicate changes nothing
    assert pool.get_num_free_blocks() == free + 3


@pytest.mark.parametrize("status", [RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR])
def test_prefill_aborted_frees_at_once(status: RequestStatus) -> None:
    s = side()
    req = request("p2", 50, {"do_remote_decode": True})
    req.status = status
    assert s.request_finished(req, [1]) == (False, None)
    assert not s.take_plan().exposes


def test_prefill_without_worker_address_does_not_hold_blocks() -> None:
    s = SchedulerSide(engine_id="eng", block_size=BS)
    req = request("p3", 50, {"do_remote_decode": True})
    req.status = RequestStatus.FINISHED_STOPPED
    assert s.request_finished(req, [1]) == (False, None)


def test_plain_request_is_untouched() -> None:
    s = side()
    req = request("x", 50, None)
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    req.status = RequestStatus.FINISHED_STOPPED
    assert s.request_finished(req, [1]) == (False, None)


def _decode_params(n: int = 300, ids: list[int] | None = None, **over: Any) -> dict[str, Any]:
    p = prefill_params(
        engine_id="pe",
        request_id="p1",
        addresses=["127.0.0.1:4000"],
        block_ids=ids or [11, 12, 13],
        num_tokens=n,
        block_size=BS,
    )
    p.update(over)
    return p


def test_decode_async_loads_the_whole_prompt_then_plans_one_pull() -> None:
    s = side(load_async=True)
    req = request("d1", 300, _decode_params())
    assert s.get_num_new_matched_tokens(req, 0) == (300, True)
    s.update_state_after_alloc(req, blocks([5, 6, 7]), 300)
    (read,) = s.take_plan().reads
    assert read.local_blocks == (5, 6, 7) and read.remote_blocks == (11, 12, 13)
    assert read.remote is not None and read.remote.request_id == "p1" and not read.error
    # One pull per request: asked again (e.g. after preemption) it loads nothing.
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)


def test_decode_sync_leaves_the_last_token_to_compute() -> None:
    """In-step loading: vLLM schedules the request at once, so it must have a
    token to compute; the blocks that hold the other tokens are pulled."""
    s = side()
    req = request("d1", 300, _decode_params())
    assert s.get_num_new_matched_tokens(req, 0) == (299, False)
    s.update_state_after_alloc(req, blocks([5, 6, 7]), 299)
    (read,) = s.take_plan().reads
    assert read.local_blocks == (5, 6, 7) and read.remote_blocks == (11, 12, 13)
    assert read.num_tokens == 299 and not read.error


def test_decode_sync_prompt_one_past_a_block_boundary_pulls_only_full_blocks() -> None:
    # 257 tokens: 256 load (two full blocks), the last one is computed into block 3.
    s = side()
    req = request("d5", 2 * BS + 1, _decode_params(n=2 * BS + 1))
    assert s.get_num_new_matched_tokens(req, 0) == (2 * BS, False)
    s.update_state_after_alloc(req, blocks([5, 6, 7]), 2 * BS)
    (read,) = s.take_plan().reads
    assert read.local_blocks == (5, 6) and read.remote_blocks == (11, 12)


@pytest.mark.parametrize("load_async", [False, True])
def test_decode_with_a_local_prefix_hit_pulls_only_the_rest(load_async: bool) -> None:
    s = side(load_async)
    req = request("d2", 300, _decode_params())
    ext = 300 - BS - (0 if load_async else 1)
    assert s.get_num_new_matched_tokens(req, BS) == (ext, load_async)
    s.update_state_after_alloc(req, blocks([5, 6, 7], hashed={5}), ext)
    (read,) = s.take_plan().reads
    assert read.local_blocks == (6, 7) and read.remote_blocks == (12, 13)


@pytest.mark.parametrize("load_async", [False, True])
def test_decode_with_unusable_params_computes_locally(load_async: bool) -> None:
    s = side(load_async)
    req = request("d3", 300, _decode_params(remote_block_size=16))
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    s.update_state_after_alloc(req, blocks([]), 0)
    assert not s.take_plan().reads


def test_decode_fewer_blocks_than_the_external_tokens_need_is_a_failed_read() -> None:
    s = side(load_async=True)
    req = request("d4", 300, _decode_params())
    assert s.get_num_new_matched_tokens(req, 0) == (300, True)
    s.update_state_after_alloc(req, blocks([5, 6]), 300)
    (read,) = s.take_plan().reads
    assert "need blocks 0..2" in read.error and read.local_blocks == (5, 6)


def test_decode_prompt_shorter_than_two_tokens_loads_nothing_in_sync_mode() -> None:
    s = side()
    req = request("d6", 1, _decode_params(n=1, ids=[11]))
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)


def test_factory_loads_the_connector_by_module_path() -> None:
    config = KVTransferConfig(
        kv_connector="AiokvpipeConnector",
        kv_connector_module_path="aiokvpipe.integrations.vllm",
        kv_role="kv_both",
    )
    assert KVConnectorFactory.get_connector_class(config) is AiokvpipeConnector


def test_stats_aggregate_and_reduce() -> None:
    a = AiokvpipeConnector.build_kv_connector_stats(
        {"reads": 2, "read_bytes": 1 << 20, "read_seconds": [0.004, 0.002], "exposed": 0}
    )
    b = AiokvpipeConnectorStats(data={"reads": 1, "read_bytes": 1 << 20, "read_seconds": [0.01]})
    assert a is not None and not a.is_empty()
    total = a.aggregate(b).reduce()
    assert total["reads"] == 3 and total["read_MiB"] == 2.0
    assert total["read_ms_p50"] == 4.0 and total["read_ms_max"] == 10.0
    assert AiokvpipeConnectorStats(data={}).is_empty()
