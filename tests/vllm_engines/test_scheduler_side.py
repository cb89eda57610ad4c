"""The scheduler side's decisions on vLLM's own Request and KVCacheBlocks objects
(no engine started), the factory's loading of the connector by module path,
and the stats class vLLM aggregates and logs."""

from __future__ import annotations

from typing import Any

import pytest
from vllm import SamplingParams
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
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


def side() -> SchedulerSide:
    s = SchedulerSide(engine_id="eng", block_size=BS)
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


def test_decode_loads_the_whole_prompt_async_then_plans_one_pull() -> None:
    s = side()
    req = request("d1", 300, _decode_params())
    assert s.get_num_new_matched_tokens(req, 0) == (300, True)
    s.update_state_after_alloc(req, blocks([5, 6, 7]), 300)
    (read,) = s.take_plan().reads
    assert read.local_blocks == (5, 6, 7) and read.remote_blocks == (11, 12, 13)
    assert read.remote is not None and read.remote.request_id == "p1" and not read.error
    # One pull per request: asked again (e.g. after preemption) it loads nothing.
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)


def test_decode_with_a_local_prefix_hit_pulls_only_the_rest() -> None:
    s = side()
    req = request("d2", 300, _decode_params())
    assert s.get_num_new_matched_tokens(req, BS) == (300 - BS, True)
    s.update_state_after_alloc(req, blocks([5, 6, 7], hashed={5}), 300 - BS)
    (read,) = s.take_plan().reads
    assert read.local_blocks == (6, 7) and read.remote_blocks == (12, 13)


def test_decode_with_unusable_params_computes_locally() -> None:
    s = side()
    req = request("d3", 300, _decode_params(remote_block_size=16))
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    s.update_state_after_alloc(req, blocks([]), 0)
    assert not s.take_plan().reads


def test_decode_more_local_blocks_than_remote_is_a_failed_read() -> None:
    s = side()
    req = request("d4", 200, _decode_params(n=200, ids=[11, 12]))
    assert s.get_num_new_matched_tokens(req, 0) == (200, True)
    s.update_state_after_alloc(req, blocks([5, 6, 7]), 200)
    (read,) = s.take_plan().reads
    assert "holds only 2" in read.error


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
