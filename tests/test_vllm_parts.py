"""The vLLM connector's vLLM-free parts: settings, params, loop thread, bit flips,
and the worker-side transfer agent over real endpoints (two agents, each on its
own loop thread, as two vLLM workers would run them). No vLLM needed."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from aiokvpipe.errors import ConfigError, PipeClosedError, TransferTimeout
from aiokvpipe.integrations.vllm.agent import ReadOrder, TransferAgent, TransferResults, flip_bits
from aiokvpipe.integrations.vllm.loop_thread import LoopThread
from aiokvpipe.integrations.vllm.params import (
    CORRUPT_KEY,
    InvalidParams,
    RemotePrefill,
    prefill_params,
)
from aiokvpipe.integrations.vllm.settings import ConnectorSettings


def _warm_uvloop() -> None:
    """uvloop opens one process-wide pipe the first time a loop runs in a
    thread; open it now, so the leak check does not blame the first test."""
    try:
        import uvloop
    except ImportError:
        return
    import threading

    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


_warm_uvloop()

TOKEN = "t" * 32
ENV = {"KVTOKEN": TOKEN}

# ----------------------------------------------------------------- settings


def test_settings_defaults_and_token_from_env() -> None:
    s = ConnectorSettings.from_extra({"token_env": "KVTOKEN", "port": 0}, ENV)
    assert s.token == TOKEN and s.lease_ttl == 30.0 and s.test_hooks is False
    assert s.load_mode == "sync" and not s.load_async and s.pin_blocks
    assert ConnectorSettings.from_extra({"load_mode": "async"}, {}).load_async
    assert TOKEN not in repr(s)
    cfg = s.endpoint_config(name="w", rank=0)
    assert cfg.token == TOKEN and cfg.port == 0


def test_settings_fixed_port_is_offset_by_rank() -> None:
    s = ConnectorSettings.from_extra({"port": 41000}, {})
    assert s.endpoint_config(name="w", rank=3).port == 41003


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"lease_tll": 3}, "kv_connector_extra_config"),
        ({"token_env": "NOPE"}, "token_env"),
        ({"token_env": ""}, "token_env"),
        ({"lease_ttl": 0}, "lease_ttl"),
        ({"read_timeout": "5"}, "read_timeout"),
        ({"lease_grace": float("inf")}, "lease_grace"),
        ({"test_hooks": "yes"}, "test_hooks"),
        ({"load_mode": "layerwise"}, "load_mode"),
        ({"pin_blocks": 1}, "pin_blocks"),
        ({"layers_per_read": -1}, "layers_per_read"),
        ({"layers_per_read": 1.5}, "layers_per_read"),
        ({"heartbeat_interval": 1.0, "peer_timeout": 1.0}, "peer_timeout"),
        ({"host": "0.0.0.0"}, "advertise_host"),
    ],
)
def test_settings_refuse_bad_values_naming_the_key(extra: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        ConnectorSettings.from_extra(extra, ENV)
    assert info.value.field == field


def test_missing_token_names_the_variable_not_a_value() -> None:
    with pytest.raises(ConfigError, match="AIOKV_SECRET is not set"):
        ConnectorSettings.from_extra({"token_env": "AIOKV_SECRET"}, {"OTHER": TOKEN})


# ------------------------------------------------------------------- params


def _params(**over: object) -> dict[str, object]:
    p = prefill_params(
        engine_id="p0",
        request_id="req-1",
        addresses=["127.0.0.1:5000"],
        block_ids=[7, 3, 9],
        num_tokens=300,
        block_size=128,
    )
    p.update(over)
    return p


def test_params_round_trip() -> None:
    r = RemotePrefill.parse(_params(), block_size=128)
    assert r.block_ids == (7, 3, 9) and r.num_tokens == 300 and r.request_id == "req-1"
    assert r.address_for(0) == "127.0.0.1:5000" and r.corrupt is False
    assert RemotePrefill.parse(_params(**{CORRUPT_KEY: True}), block_size=128).corrupt


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"aiokvpipe_version": 0}, "aiokvpipe_version"),
        ({"remote_block_size": 16}, "block_size"),
        ({"remote_block_ids": [7, 3]}, "need 3"),
        ({"remote_block_ids": [7, -1, 9]}, "remote_block_ids"),
        ({"remote_addresses": []}, "remote_addresses"),
        ({"remote_num_tokens": 0}, "remote_num_tokens"),
        ({"remote_request_id": ""}, "remote_request_id"),
    ],
)
def test_params_refused(over: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidParams, match=match):
        RemotePrefill.parse(_params(**over), block_size=128)


def test_params_rank_without_a_shard() -> None:
    with pytest.raises(InvalidParams, match="rank 1"):
        RemotePrefill.parse(_params(), block_size=128).address_for(1)


# -------------------------------------------------------------- loop thread


def test_loop_thread_runs_submits_times_out_and_stops() -> None:
    import asyncio

    thread = LoopThread("test-loop")
    try:

        async def answer() -> int:
            await asyncio.sleep(0)
            return 42

        assert thread.run(answer(), timeout=5) == 42
        assert thread.submit(answer()).result(5) == 42
        with pytest.raises(TransferTimeout):
            thread.run(asyncio.sleep(10), timeout=0.05)
    finally:
        thread.stop()
    thread.stop()  # idempotent
    with pytest.raises(PipeClosedError):
        thread.submit(answer())


# ---------------------------------------------------------------- bit flips


@pytest.mark.parametrize("block_dim", [0, 1])
def test_flip_bits_touches_only_the_named_blocks(block_dim: int) -> None:
    shape = (6, 2, 4, 8) if block_dim == 0 else (2, 6, 4, 8)
    t = torch.randn(shape)
    before = t.clone()
    flip_bits([t], block_dim, [1, 4])
    for b in range(6):
        same = torch.equal(t.select(block_dim, b), before.select(block_dim, b))
        assert same is (b not in (1, 4))
    flip_bits([t], block_dim, [1, 4])
    assert torch.equal(t, before)


# ----------------------------------------------------- the transfer agent

BLOCKS, BLOCK_SHAPE = 16, (2, 4, 8)  # vLLM CPU layout: [blocks, kv_heads, block_size, 2*head]


def _layers(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((BLOCKS, *BLOCK_SHAPE), generator=gen) for _ in range(2)]


def _agent(name: str, tensors: list[torch.Tensor], **extra: object) -> TransferAgent:
    settings = ConnectorSettings.from_extra(
        {"token_env": "KVTOKEN", "read_timeout": 5.0, "lease_grace": 0.5, **extra}, ENV
    )
    agent = TransferAgent(settings, name=name)
    agent.start(tensors, block_dim=0)
    return agent


@pytest.fixture
def pair() -> Iterator[tuple[TransferAgent, list[torch.Tensor], TransferAgent, list[torch.Tensor]]]:
    owner_t, reader_t = _layers(1), [torch.zeros(BLOCKS, *BLOCK_SHAPE) for _ in range(2)]
    owner = _agent("owner", owner_t, lease_ttl=5.0)
    reader = _agent("reader", reader_t, test_hooks=True)
    try:
        yield owner, owner_t, reader, reader_t
    finally:
        reader.close()
        owner.close()


def _until(
    agent: TransferAgent, done: Callable[[TransferResults], bool], timeout: float = 10.0
) -> TransferResults:
    """Poll like vLLM does (each step), merging what each poll returns."""
    merged = TransferResults()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = agent.poll()
        merged.finished_sending |= got.finished_sending
        merged.finished_recving |= got.finished_recving
        merged.failed_recving.update(got.failed_recving)
        merged.leases_ended |= got.leases_ended
        if done(merged):
            return merged
        time.sleep(0.005)
    raise AssertionError(f"not done after {timeout}s: {merged}")


def _order(
    owner: TransferAgent, rid: str, remote: tuple[int, ...], local: tuple[int, ...], **kw: object
) -> ReadOrder:
    return ReadOrder(rid, owner.address, f"p-{rid}", remote, local, num_tokens=10, **kw)  # type: ignore[arg-type]


def test_agent_pull_lands_blocks_and_frees_the_owner(pair) -> None:  # type: ignore[no-untyped-def]
    owner, owner_t, reader, reader_t = pair
    owner.expose("p-r1", (3, 9, 4))
    reader.read(_order(owner, "r1", (3, 9, 4), (0, 1, 2)))
    got = _until(reader, lambda r: "r1" in r.finished_recving)
    assert not got.failed_recving
    for o, r in zip(owner_t, reader_t, strict=True):
        assert torch.equal(r[[0, 1, 2]], o[[3, 9, 4]])
        assert not r[3:].any()  # nothing else written
    _until(owner, lambda r: "p-r1" in r.finished_sending)
    stats = reader.take_stats()
    assert stats is not None and stats["reads"] == 1 and stats["read_tokens"] == 10


def test_agent_pinned_lease_end_goes_to_the_scheduler_not_to_vllm(pair) -> None:  # type: ignore[no-untyped-def]
    """Blocks the scheduler side pinned: their lease's end is reported as
    such (vLLM no longer tracks the request), never as finished sending."""
    owner, _, reader, _ = pair
    owner.expose("p-r9", (3, 9), pinned=True)
    reader.read(_order(owner, "r9", (3, 9), (0, 1)))
    _until(reader, lambda r: "r9" in r.finished_recving)
    got = _until(owner, lambda r: "p-r9" in r.leases_ended)
    assert not got.finished_sending


def test_agent_read_before_the_lease_is_filed_retries_within_grace(pair) -> None:  # type: ignore[no-untyped-def]
    owner, owner_t, reader, reader_t = pair
    reader.read(_order(owner, "r2", (5,), (7,)))
    time.sleep(0.1)  # the prefill's worker files the lease a step later
    owner.expose("p-r2", (5,))
    got = _until(reader, lambda r: "r2" in r.finished_recving)
    assert not got.failed_recving
    assert torch.equal(reader_t[0][7], owner_t[0][5])


def test_agent_expired_lease_fails_the_read_and_frees_the_owner() -> None:
    owner_t, reader_t = _layers(2), [torch.zeros(BLOCKS, *BLOCK_SHAPE) for _ in range(2)]
    owner = _agent("owner", owner_t, lease_ttl=0.2)
    reader = _agent("reader", reader_t)
    try:
        owner.expose("p-r3", (1, 2))
        _until(owner, lambda r: "p-r3" in r.finished_sending)  # expired: blocks back to vLLM
        started = time.monotonic()
        reader.read(_order(owner, "r3", (1, 2), (1, 2)))
        got = _until(reader, lambda r: "r3" in r.finished_recving)
        assert "r3" in got.failed_recving and owner.address in got.failed_recving["r3"]
        assert time.monotonic() - started < 3
    finally:
        reader.close()
        owner.close()


def test_agent_dead_owner_fails_the_read_promptly(pair) -> None:  # type: ignore[no-untyped-def]
    owner, _, reader, _ = pair
    owner.expose("p-r4", (1,))
    address = owner.address
    owner.close()
    started = time.monotonic()
    reader.read(ReadOrder("r4", address, "p-r4", (1,), (1,)))
    got = _until(reader, lambda r: "r4" in r.finished_recving, timeout=20)
    assert "r4" in got.failed_recving
    # Never a hang: at the latest read_timeout (5 s here) after the read began.
    assert time.monotonic() - started < 5 + 3


def test_agent_flip_hook_inverts_the_landed_blocks(pair) -> None:  # type: ignore[no-untyped-def]
    owner, owner_t, reader, reader_t = pair
    owner.expose("p-r5", (6,))
    reader.read(_order(owner, "r5", (6,), (8,), corrupt=True))
    _until(reader, lambda r: "r5" in r.finished_recving)
    flipped = reader_t[0][8].clone()
    flip_bits([flipped.unsqueeze(0)], 0, [0])
    assert torch.equal(flipped, owner_t[0][6])


def test_agent_cancelled_read_is_reported_failed(pair) -> None:  # type: ignore[no-untyped-def]
    owner, _, reader, _ = pair
    reader.read(_order(owner, "r6", (2,), (2,)))  # never exposed: retries within grace
    reader.cancel({"r6"})
    got = _until(reader, lambda r: "r6" in r.finished_recving)
    assert "cancelled" in got.failed_recving["r6"]


# ------------------------------------------- the transfer agent, sync mode


def _layers_equal(reader_t: list[torch.Tensor], owner_t: list[torch.Tensor], layer: int) -> bool:
    return torch.equal(reader_t[layer][[0, 1, 2]], owner_t[layer][[3, 9, 4]])


def test_agent_sync_load_lands_layer_by_layer_and_frees_the_owner(pair) -> None:  # type: ignore[no-untyped-def]
    owner, owner_t, reader, reader_t = pair
    reader._settings = dataclasses.replace(reader._settings, layers_per_read=1)
    owner.expose("p-s1", (3, 9, 4))
    reader.load([_order(owner, "s1", (3, 9, 4), (0, 1, 2))])
    reader.wait_layer(0)
    assert _layers_equal(reader_t, owner_t, 0)
    reader.wait_layer(1)
    assert _layers_equal(reader_t, owner_t, 1)
    reader.end_load()
    assert reader.take_load_errors() == set()
    assert not reader_t[0][3:].any() and not reader_t[1][3:].any()  # nothing else written
    # The lease completes once every layer was read: the owner frees the blocks.
    _until(owner, lambda r: "p-s1" in r.finished_sending)
    stats = reader.take_stats()
    assert stats is not None and stats["reads"] == 1 and stats["failed_reads"] == 0
    assert not reader.poll().finished_recving  # sync loads are not reported as async ones


@pytest.mark.parametrize("per_read", [0, 1, 2])
def test_agent_sync_load_end_waits_for_layers_nobody_waited_for(pair, per_read: int) -> None:  # type: ignore[no-untyped-def]
    owner, owner_t, reader, reader_t = pair
    reader._settings = dataclasses.replace(reader._settings, layers_per_read=per_read)
    owner.expose("p-s2", (3, 9, 4))
    reader.load([_order(owner, "s2", (3, 9, 4), (0, 1, 2))])
    reader.end_load()  # e.g. a layer name the connector did not map
    assert _layers_equal(reader_t, owner_t, 0) and _layers_equal(reader_t, owner_t, 1)
    assert reader.take_load_errors() == set()


def test_agent_sync_load_from_a_dead_owner_marks_its_blocks_invalid(pair) -> None:  # type: ignore[no-untyped-def]
    owner, _, reader, _ = pair
    owner.expose("p-s3", (1, 2))
    address = owner.address
    owner.close()
    started = time.monotonic()
    reader.load([ReadOrder("s3", address, "p-s3", (1, 2), (5, 6))])
    reader.wait_layer(0)
    reader.wait_layer(1)
    reader.end_load()
    assert reader.take_load_errors() == {5, 6}
    assert reader.take_load_errors() == set()  # handed over once
    assert time.monotonic() - started < 5 + 3  # read_timeout is 5 s here
    stats = reader.take_stats()
    assert stats is not None and stats["failed_reads"] == 1 and stats["reads"] == 0


def test_agent_sync_load_gives_up_at_read_timeout() -> None:
    """A lease never granted, retried longer than read_timeout allows: the
    forward pass waits read_timeout at most, then the blocks are invalid."""
    owner_t, reader_t = _layers(3), [torch.zeros(BLOCKS, *BLOCK_SHAPE) for _ in range(2)]
    owner = _agent("owner", owner_t)
    reader = _agent("reader", reader_t, read_timeout=0.3, lease_grace=10.0)
    try:
        started = time.monotonic()
        reader.load([_order(owner, "s4", (1,), (7,))])
        reader.wait_layer(0)
        reader.end_load()
        elapsed = time.monotonic() - started
        assert reader.take_load_errors() == {7}
        assert 0.25 < elapsed < 2.0
    finally:
        reader.close()
        owner.close()


def test_agent_sync_load_good_and_bad_requests_in_one_step(pair) -> None:  # type: ignore[no-untyped-def]
    owner, owner_t, reader, reader_t = pair
    owner.expose("p-s5", (3, 9, 4))
    good = _order(owner, "s5", (3, 9, 4), (0, 1, 2))
    bad = ReadOrder("s6", owner.address, "p-never", (5,), (11,))  # not granted: fails at grace
    reader.load([good, bad])
    reader.wait_layer(0)
    reader.wait_layer(1)
    reader.end_load()
    assert reader.take_load_errors() == {11}
    assert _layers_equal(reader_t, owner_t, 0) and _layers_equal(reader_t, owner_t, 1)


@pytest.mark.parametrize("per_read", [0, 1])
def test_agent_sync_flip_hook_inverts_each_landed_layer(pair, per_read: int) -> None:  # type: ignore[no-untyped-def]
    owner, owner_t, reader, reader_t = pair
    reader._settings = dataclasses.replace(reader._settings, layers_per_read=per_read)
    owner.expose("p-s7", (6,))
    reader.load([_order(owner, "s7", (6,), (8,), corrupt=True)])
    reader.wait_layer(0)
    reader.wait_layer(1)
    reader.end_load()
    for layer in (0, 1):
        flipped = reader_t[layer][8].clone()
        flip_bits([flipped.unsqueeze(0)], 0, [0])
        assert torch.equal(flipped, owner_t[layer][6])
