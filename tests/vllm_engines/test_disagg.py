"""Disaggregated prefill/decode on real vLLM CPU engines through AiokvpipeConnector.

Five servers for the module: prefill ``p1`` (also the colocated reference:
plain requests to it never touch the connector; finished requests' blocks
pinned in vLLM's pool, the default), prefill ``p2`` (``pin_blocks: false``:
the request holds them), decode ``d`` (kv_load_failure_policy=recompute)
and decode ``dfail`` (fail), both loading in the step (``load_mode: sync``,
the default), and decode ``dasync`` (recompute, ``load_mode: async``). All
requests are greedy with ``ignore_eos``; prompts are token ids of a
random-weight tiny Llama, so "identical tokens" checks the transferred KV
and nothing else.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from aiokvpipe.integrations.vllm.params import CORRUPT_KEY
from aiokvpipe.integrations.vllm.serving import VllmServer, kv_transfer_config

pytestmark = pytest.mark.timeout(900)

NEW_TOKENS = 16
EXTERNAL = "vllm:prompt_tokens_by_source_total"


def prompts(count: int, seed: int, low: int = 8, high: int = 400) -> list[list[int]]:
    """``count`` distinct random prompts, lengths spread evenly over [low, high]."""
    rng = random.Random(seed)
    lengths = [low + (high - low) * i // max(count - 1, 1) for i in range(count)]
    rng.shuffle(lengths)
    return [[rng.randrange(1, 1024) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def servers(fleet: Any) -> dict[str, VllmServer]:
    # Test hooks on: the negative control flips bits through kv_transfer_params.
    return fleet.start(  # type: ignore[no-any-return]
        p1=kv_transfer_config(test_hooks=True),
        p2=kv_transfer_config(test_hooks=True, pin_blocks=False),
        d=kv_transfer_config(failure_policy="recompute", test_hooks=True, read_timeout=20.0),
        dfail=kv_transfer_config(failure_policy="fail", test_hooks=True, read_timeout=20.0),
        dasync=kv_transfer_config(
            failure_policy="recompute", test_hooks=True, read_timeout=20.0, load_mode="async"
        ),
    )


async def colocated(
    server: VllmServer, client: httpx.AsyncClient, ps: Sequence[list[int]]
) -> list[list[int]]:
    outs = await asyncio.gather(*(server.complete_plain(client, p, NEW_TOKENS) for p in ps))
    return [o.token_ids for o in outs]


async def prefill(
    server: VllmServer, client: httpx.AsyncClient, prompt: list[int], **extra: Any
) -> dict[str, Any]:
    out = await server.complete_plain(client, prompt, 1, {"do_remote_decode": True})
    params = out.kv_transfer_params
    assert params is not None and params["do_remote_prefill"] is True, out.raw
    params.update(extra)
    return params


async def disagg(
    prefillers: Sequence[VllmServer],
    decode: VllmServer,
    client: httpx.AsyncClient,
    ps: Sequence[list[int]],
    **extra: Any,
) -> list[list[int]]:
    """The proxy's job: prefill (round robin), then decode with the returned params."""

    async def one(i: int, prompt: list[int]) -> list[int]:
        params = await prefill(prefillers[i % len(prefillers)], client, prompt, **extra)
        out = await decode.complete(client, prompt, NEW_TOKENS, params)
        assert out.finish_reason == "length", out
        return out.token_ids

    sem = asyncio.Semaphore(4)

    async def bounded(i: int, prompt: list[int]) -> list[int]:
        async with sem:
            return await one(i, prompt)

    return list(await asyncio.gather(*(bounded(i, p) for i, p in enumerate(ps))))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_one_prefill_one_decode_matches_colocated(servers: dict[str, VllmServer]) -> None:
    """20 prompts of 8-400 tokens: the decode's tokens equal a colocated run's, and
    the decode computed at most the last prompt token of each (vLLM's counters)."""
    ps = prompts(20, seed=1)

    async def main() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            reference = await colocated(servers["p1"], client, ps)
            d = servers["d"]
            ext0 = await d.metric(client, EXTERNAL, source="external_kv_transfer")
            local0 = await d.metric(client, EXTERNAL, source="local_compute")
            got = await disagg([servers["p1"]], d, client, ps)
            await asyncio.sleep(1.5)  # the metrics of the last step reach /metrics
            ext = await d.metric(client, EXTERNAL, source="external_kv_transfer") - ext0
            local = await d.metric(client, EXTERNAL, source="local_compute") - local0
        assert got == reference
        total = sum(len(p) for p in ps)
        # vLLM recomputes the last prompt token to sample the next one.
        assert ext in (total, total - len(ps)), (ext, local, total)
        assert local <= len(ps), (ext, local, total)

    run(main())


@pytest.mark.parametrize("decode", ["d", "dasync"])
def test_flipped_bits_change_the_output(servers: dict[str, VllmServer], decode: str) -> None:
    """Negative control: the same pull with every bit of the landed blocks flipped
    gives other tokens, so the decode really attends over the transferred KV
    (in both load modes)."""
    ps = prompts(4, seed=2 + len(decode), low=64, high=300)

    async def main() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            d = servers[decode]
            reference = await colocated(servers["p1"], client, ps)
            clean = await disagg([servers["p1"]], d, client, ps)
            flipped = await disagg([servers["p1"]], d, client, ps, **{CORRUPT_KEY: True})
        assert clean == reference
        for ref, bad in zip(reference, flipped, strict=True):
            assert bad != ref

    run(main())


def test_async_load_mode_matches_colocated(servers: dict[str, VllmServer]) -> None:
    """load_mode async: the same tokens, and the whole prompt came from the
    prefill (the decode recomputes at most the last token of each)."""
    ps = prompts(8, seed=5)

    async def main() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            reference = await colocated(servers["p1"], client, ps)
            d = servers["dasync"]
            ext0 = await d.metric(client, EXTERNAL, source="external_kv_transfer")
            got = await disagg([servers["p1"], servers["p2"]], d, client, ps)
            await asyncio.sleep(1.5)  # the metrics of the last step reach /metrics
            ext = await d.metric(client, EXTERNAL, source="external_kv_transfer") - ext0
        assert got == reference
        total = sum(len(p) for p in ps)
        assert ext in (total, total - len(ps)), (ext, total)

    run(main())


def test_two_prefills_one_decode(servers: dict[str, VllmServer]) -> None:
    """Requests alternate between two prefill instances (one pinning its blocks,
    one holding them by the request); the decode's tokens are identical to the
    colocated run's."""
    ps = prompts(10, seed=3)

    async def main() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            reference = await colocated(servers["p1"], client, ps)
            got = await disagg([servers["p1"], servers["p2"]], servers["d"], client, ps)
        assert got == reference

    run(main())


def test_pinned_prefill_idles_while_its_blocks_wait_for_the_decode(
    servers: dict[str, VllmServer],
) -> None:
    """A finished prefill whose KV no decode has read yet: with pinned blocks
    (p1) its engine goes idle; holding them by the request (p2, vLLM's way)
    keeps vLLM stepping the engine every millisecond until the read. Then the
    decode reads both, and gets the colocated tokens."""
    ps = prompts(2, seed=6, low=100, high=200)

    async def cpu_while_waiting(
        client: httpx.AsyncClient, server: VllmServer, prompt: list[int]
    ) -> tuple[float, dict[str, Any]]:
        params = await prefill(server, client, prompt)
        # After its last step a vLLM worker busy-polls its input queue for 1 s
        # (vLLM's own idle policy, any connector): measure after that.
        await asyncio.sleep(1.5)
        before = server.cpu_seconds()
        await asyncio.sleep(1.5)
        return server.cpu_seconds() - before, params

    async def main() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            reference = await colocated(servers["p1"], client, ps)
            pinned, params1 = await cpu_while_waiting(client, servers["p1"], ps[0])
            held, params2 = await cpu_while_waiting(client, servers["p2"], ps[1])
            got = [
                (await servers["d"].complete(client, p, NEW_TOKENS, params)).token_ids
                for p, params in zip(ps, (params1, params2), strict=True)
            ]
        assert got == reference
        # Idle: heartbeats and housekeeping only. Stepping: >= 0.1 s of CPU a
        # second even on a loaded two-core box.
        assert pinned < 0.1, (pinned, held)
        assert held > 2 * pinned + 0.05, (pinned, held)

    run(main())


def test_prefill_killed_before_the_read(servers: dict[str, VllmServer]) -> None:
    """The prefill answers, then dies before any decode read its blocks.

    recompute: the decode computes the prompt itself and returns the right
    tokens (both load modes). fail: the request fails with an error,
    promptly. Either way no hang, and the decodes go on serving
    disaggregated requests."""
    ps = prompts(3, seed=4, low=100, high=300)

    async def main() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            reference = await colocated(servers["p1"], client, ps)
            for_recompute = await prefill(servers["p2"], client, ps[0])
            for_fail = await prefill(servers["p2"], client, ps[1])
            for_async = await prefill(servers["p2"], client, ps[0])
            mapped = servers["p2"]._mapped_shm()
            servers["p2"].kill()
            # The crashed engine's /dev/shm segments do not outlive the test.
            assert mapped and not [p for p in mapped if os.path.exists(p)]  # noqa: ASYNC240 (a stat)

            started = time.monotonic()
            out = await servers["d"].complete(client, ps[0], NEW_TOKENS, for_recompute)
            assert out.token_ids == reference[0]
            assert time.monotonic() - started < 30
            out = await servers["dasync"].complete(client, ps[0], NEW_TOKENS, for_async)
            assert out.token_ids == reference[0]
            assert time.monotonic() - started < 30

            started = time.monotonic()
            with pytest.raises((httpx.HTTPStatusError, RuntimeError)) as info:
                bad = await servers["dfail"].complete(client, ps[1], NEW_TOKENS, for_fail)
                # Some vLLM versions end the stream with finish_reason "error".
                if bad.finish_reason == "error" or bad.token_ids != reference[1]:
                    raise RuntimeError(f"request failed: finish_reason={bad.finish_reason}")
            assert time.monotonic() - started < 30, info.value
            assert "KV load of request" in servers["dfail"].log_text()

            # Every decode instance keeps serving.
            for decode in (servers["d"], servers["dfail"], servers["dasync"]):
                again = await disagg([servers["p1"]], decode, client, ps[2:])
                assert again == reference[2:]

    run(main())


def test_token_never_logged(servers: dict[str, VllmServer], token: str) -> None:
    """The shared token is read from the environment and appears in no log."""
    for server in servers.values():
        assert token not in server.log_text(), server.name
