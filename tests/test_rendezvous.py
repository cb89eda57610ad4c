"""Rendezvous: token authentication, strangers, timeouts, bind address,
duplicate ranks, mismatched configs; PipeConfig validation and vLLM mapping."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import socket
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import free_port
from transport_conformance import assert_same, close_all, tagged, together

from aiokvpipe import (
    AuthenticationError,
    ConfigError,
    PipeConfig,
    TransferTimeout,
)
from aiokvpipe.handshake import authenticate_connector, recv_message, send_message
from aiokvpipe.pipe import Pipe
from aiokvpipe.transport.base import PeerInfo

TOKEN = "a-token-of-at-least-16-bytes"

# --------------------------------------------------------------------- helpers


def listening_sockets() -> set[tuple[str, int]]:
    """(address, port) of every TCP socket this process is listening on."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with contextlib.suppress(FileNotFoundError), open(table, encoding="ascii") as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                ip_hex, port_hex = local.split(":")
                raw = bytes.fromhex(ip_hex)
                # /proc prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add((socket.inet_ntop(family, raw), int(port_hex, 16)))
    return found


async def wait_for_listeners(count: int, timeout: float = 10.0) -> set[tuple[str, int]]:
    deadline = time.monotonic() + timeout
    while True:
        found = listening_sockets()
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} listeners, found {found}")
        await asyncio.sleep(0.01)


def configs(world_size: int = 2, **overrides: Any) -> list[PipeConfig]:
    port = overrides.pop("port", None) or free_port()
    overrides.setdefault("connect_timeout", 10.0)
    return [
        PipeConfig(rank=r, world_size=world_size, port=port, **overrides) for r in range(world_size)
    ]


async def connect_all(cfgs: list[PipeConfig]) -> list[Pipe]:
    return list(await together(*(Pipe.connect(c) for c in cfgs)))


async def outcomes(*aws: Any) -> list[Any]:
    """Run concurrently; return each result or exception (closing any Pipe)."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    await close_all([r for r in results if isinstance(r, Pipe)])
    return list(results)


@contextlib.asynccontextmanager
async def stranger(host: str, port: int) -> AsyncIterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        yield sock
    finally:
        sock.close()


async def check_ring(pipes: list[Pipe]) -> None:
    n = len(pipes)
    for rank, pipe in enumerate(pipes):
        await pipe.send(tagged(rank))
    for rank, pipe in enumerate(pipes):
        assert_same(await asyncio.wait_for(pipe.recv(), 5), tagged((rank - 1) % n))


# --------------------------------------------------------------------- tokens


@pytest.mark.timeout(15)
async def test_matching_tokens_work_str_or_bytes() -> None:
    cfgs = configs(3, token="s3cr\u00e9t-s3cr\u00e9t-s3cr\u00e9t")
    cfgs[2] = cfgs[2].with_changes(
        token="s3cr\u00e9t-s3cr\u00e9t-s3cr\u00e9t".encode()
    )  # other type
    pipes = await connect_all(cfgs)
    try:
        await check_ring(pipes)
    finally:
        await close_all(pipes)


TOKEN_MISMATCHES = [
    # (rank 0's token, rank 1's token, what rank 1 is told)
    ("alpha-alpha-alpha-alpha", "beta-beta-beta-beta", "rejected our token"),
    ("alpha-alpha-alpha-alpha", None, "requires a token and none is configured"),
    (None, "beta-beta-beta-beta", "rejected our token"),
]


@pytest.mark.timeout(15)
async def test_token_mismatch_fails_the_side_that_tried() -> None:
    """Wrong token, or a token on one side only: the rank that connected gets
    AuthenticationError at once; rank 0 sees nobody legitimate and times out."""

    async def attempt(token0: str | None, token1: str | None) -> list[Any]:
        cfg0, cfg1 = configs(token=token0, connect_timeout=1.0)
        return await outcomes(
            Pipe.connect(cfg0), Pipe.connect(cfg1.with_changes(token=token1, connect_timeout=5.0))
        )

    started = time.monotonic()
    results = await asyncio.gather(*(attempt(t0, t1) for t0, t1, _ in TOKEN_MISMATCHES))
    for (t0, t1, match), (rank0, rank1) in zip(TOKEN_MISMATCHES, results, strict=True):
        case = f"rank 0 token {t0!r}, rank 1 token {t1!r}"
        assert isinstance(rank1, AuthenticationError), (case, rank1)
        assert match in str(rank1), (case, rank1)
        assert isinstance(rank0, TransferTimeout), (case, rank0)  # nobody legitimate came
        assert "waiting for all 2 ranks" in str(rank0), case
    assert time.monotonic() - started < 3


async def hold_silent(host: str, port: int, into: list[socket.socket]) -> None:
    """Connect and say nothing; the socket stays open until the test closes it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    into.append(sock)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))


async def wrong_token(host: str, port: int) -> None:
    async with stranger(host, port) as sock:
        with pytest.raises(AuthenticationError, match="rejected our token"):
            await authenticate_connector(sock, b"a guess", "stranger")


async def impostor(host: str, port: int, token: bytes) -> None:
    """Knows the token but is not the expected predecessor."""
    async with stranger(host, port) as sock:
        await authenticate_connector(sock, token, "impostor")
        me = PeerInfo(5, host, 1, "h", os.getpid(), "cpu", "auto", instance="forged")
        await send_message(sock, {"purpose": "ring", "peer": dataclasses.asdict(me)}, "impostor")
        reply = await recv_message(sock, "impostor")
        assert reply["ok"] is False and "expected rank 1" in reply["error"]


@pytest.mark.timeout(20)
async def test_strangers_cannot_stop_the_legit_pipe() -> None:
    """While rank 0 waits, strangers hit its rendezvous port (wrong token, no
    token, garbage, instant hang-up, silence) and queue up on its data
    listener ahead of rank 1 (silence first, a wrong token, an impostor that
    knows the token). They are refused; ranks 0 and 1 still form their pipe."""
    token = b"the real one, 16+ bytes"
    cfg0, cfg1 = configs(token=token)
    host = cfg0.host
    rank0 = asyncio.ensure_future(Pipe.connect(cfg0))
    silent: list[socket.socket] = []
    pipes: list[Pipe] = []
    queued: list[asyncio.Future[None]] = []
    try:
        listeners = await wait_for_listeners(2)
        assert (host, cfg0.port) in listeners
        (data_port,) = [p for (_, p) in listeners if p != cfg0.port]
        # the rendezvous server vets everyone before rank 1 shows up
        await hold_silent(host, cfg0.port, silent)
        await wrong_token(host, cfg0.port)
        async with stranger(host, cfg0.port) as sock:
            with pytest.raises(AuthenticationError, match="requires a token"):
                await authenticate_connector(sock, None, "stranger")
        async with stranger(host, cfg0.port) as sock:
            await asyncio.get_running_loop().sock_sendall(sock, os.urandom(300))
        async with stranger(host, cfg0.port):
            pass
        # the data listener is served once every rank registered: queue up first
        await hold_silent(host, data_port, silent)
        queued.append(asyncio.ensure_future(wrong_token(host, data_port)))
        queued.append(asyncio.ensure_future(impostor(host, data_port, token)))
        await asyncio.sleep(0.05)
        assert not rank0.done()
        pipes.append(await asyncio.wait_for(Pipe.connect(cfg1), 5))
        pipes.insert(0, await asyncio.wait_for(asyncio.shield(rank0), 5))
        await asyncio.wait_for(asyncio.gather(*queued), 5)
        await check_ring(pipes)
    finally:
        for sock in silent:
            sock.close()
        for fut in [rank0, *queued]:
            fut.cancel()
        results = await asyncio.gather(rank0, *queued, return_exceptions=True)
        if isinstance(results[0], Pipe) and results[0] not in pipes:
            pipes.append(results[0])
        await close_all(pipes)


# --------------------------------------------------------------------- timeouts, binding


@pytest.mark.timeout(15)
async def test_connect_timeout_when_a_rank_never_shows() -> None:
    cfg0, cfg1 = configs(connect_timeout=0.5)
    for alone in (cfg0, cfg1):  # rank 1 never comes; rank 0 never comes
        started = time.monotonic()
        with pytest.raises(TransferTimeout) as info:
            await Pipe.connect(alone)
        assert 0.4 < time.monotonic() - started < 2.0
        assert isinstance(info.value, TimeoutError)
        assert f"rank {alone.rank}" in str(info.value)
    assert not listening_sockets()
    # the rendezvous port was released
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((cfg0.host, cfg0.port))


@pytest.mark.timeout(15)
async def test_listeners_bind_only_the_configured_host() -> None:
    """Rank 0 listens (rendezvous and data) on ``host``; a rank with
    ``bind_host`` listens there; nothing listens on all interfaces."""
    host = "127.0.0.2"  # loopback, but not the default: a wildcard bind would differ
    cfgs = configs(3, host=host)
    cfgs[1] = cfgs[1].with_changes(bind_host="127.0.0.3")
    early = [asyncio.ensure_future(Pipe.connect(c)) for c in cfgs[:2]]
    pipes: list[Pipe] = []
    try:
        listeners = await wait_for_listeners(3)  # rendezvous + two data listeners
        assert sorted(addr for addr, _ in listeners) == [host, host, "127.0.0.3"], listeners
        assert (host, cfgs[0].port) in listeners
        for _, port in listeners:
            with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
                sock.connect(("127.0.0.1", port))
        pipes = await connect_all([cfgs[2]])
        pipes = [*(await asyncio.wait_for(asyncio.gather(*early), 5)), *pipes]
        await check_ring(pipes)
    finally:
        for fut in early:
            fut.cancel()
        results = await asyncio.gather(*early, return_exceptions=True)
        await close_all([p for p in {*pipes, *(r for r in results if isinstance(r, Pipe))}])
    assert not listening_sockets()


# --------------------------------------------------------------------- misconfigured ranks


@pytest.mark.timeout(15)
async def test_duplicate_rank_is_refused_and_the_ring_still_forms() -> None:
    cfgs = configs(3)
    early = [asyncio.ensure_future(Pipe.connect(c)) for c in cfgs[:2]]
    pipes: list[Pipe] = []
    try:
        await wait_for_listeners(3)  # ranks 0 and 1 registered
        with pytest.raises(ConfigError, match="rank 1 registered twice") as info:
            await asyncio.wait_for(Pipe.connect(cfgs[1]), 5)
        assert info.value.field == "rank"
        pipes = await connect_all([cfgs[2]])
        pipes = [*(await asyncio.wait_for(asyncio.gather(*early), 5)), *pipes]
        await check_ring(pipes)
    finally:
        for fut in early:
            fut.cancel()
        results = await asyncio.gather(*early, return_exceptions=True)
        await close_all([p for p in {*pipes, *(r for r in results if isinstance(r, Pipe))}])


@pytest.mark.timeout(15)
async def test_mismatched_world_size_is_a_config_error() -> None:
    cfg0, _ = configs(2, connect_timeout=1.0)
    odd = PipeConfig(rank=1, world_size=3, port=cfg0.port, connect_timeout=5.0)
    started = time.monotonic()
    rank0, rank1 = await outcomes(Pipe.connect(cfg0), Pipe.connect(odd))
    assert isinstance(rank1, ConfigError), repr(rank1)
    assert rank1.field == "world_size" and "world_size=3" in str(rank1)
    assert isinstance(rank0, TransferTimeout), repr(rank0)
    assert time.monotonic() - started < 3


# --------------------------------------------------------------------- PipeConfig

BAD_FIELDS: list[tuple[str, Any]] = [
    ("rank", -1),
    ("rank", "0"),
    ("rank", True),
    ("rank", 1.0),
    ("rank", 2),  # not below world_size=2
    ("world_size", 1),
    ("world_size", 0),
    ("world_size", 2.0),
    ("port", -1),
    ("port", 65536),
    ("port", "29600"),
    ("host", ""),
    ("host", None),
    ("host", 127),
    ("bind_host", ""),
    ("bind_host", 0),
    ("transport", "udp"),
    ("transport", None),
    ("device", "gpu"),
    ("device", "cuda:x"),
    ("device", "cpu:0"),
    ("device", "cuda:"),
    ("device", "cuda:\u0663"),  # a digit, but not an ASCII one
    ("device", 0),
    ("device", torch.device("cpu")),
    ("buffer_bytes", 0),
    ("buffer_bytes", -5),
    ("buffer_bytes", 1.5),
    ("buffer_bytes", None),
    ("max_frame_bytes", 0),
    ("max_frame_bytes", "1"),
    ("connect_timeout", 0),
    ("connect_timeout", -1.0),
    ("connect_timeout", math.inf),
    ("connect_timeout", math.nan),
    ("connect_timeout", None),
    ("connect_timeout", True),
    ("op_timeout", 0.0),
    ("op_timeout", "1"),
    ("op_timeout", math.inf),
    ("close_timeout", None),
    ("close_timeout", 0),
    ("token", ""),
    ("token", b""),
    ("token", 123),
    ("token", "fifteen bytes!!"),  # shorter than MIN_TOKEN_BYTES
    ("handshake_timeout", 0),
    ("insecure", 1),
]


def test_pipe_config_rejects_each_bad_field_by_name() -> None:
    problems = []
    for field, value in BAD_FIELDS:
        try:
            PipeConfig(**{"rank": 0, field: value})  # type: ignore[arg-type]
        except ConfigError as exc:
            if exc.field != field or not str(exc).startswith(f"{field}: "):
                problems.append(f"{field}={value!r}: blamed {exc.field!r}: {exc}")
        else:
            problems.append(f"{field}={value!r}: accepted")
    assert not problems, "\n".join(problems)
    assert issubclass(ConfigError, ValueError)


def test_pipe_config_accepts_good_values_and_is_frozen() -> None:
    cfg = PipeConfig(rank=2, world_size=3)
    assert (cfg.next_rank, cfg.prev_rank) == (0, 1)
    assert PipeConfig(rank=0).prev_rank == 1
    for good in (
        {"device": "cuda"},
        {"device": "cuda:3"},
        {"op_timeout": None},
        {"op_timeout": 0.001},
        {"port": 0},
        {"port": 65535},
        {"token": "t" * 16},
        {"token": b"\x00" * 16},
        {"transport": "shm"},
        {"bind_host": "0.0.0.0", "insecure": True},
        {"bind_host": "0.0.0.0", "token": "t" * 16},
        {"host": "::1", "bind_host": "127.0.0.9"},
        {"connect_timeout": 1},
    ):
        PipeConfig(rank=0, **good)
    assert (
        PipeConfig(rank=0, token="t" * 16).token_bytes
        == b"t" * 16
        == PipeConfig(rank=0, token=b"t" * 16).token_bytes
    )
    assert PipeConfig(rank=0).token_bytes is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 0  # type: ignore[misc]
    with pytest.raises(ConfigError, match=r"^port: "):
        cfg.with_changes(port=-2)  # changes are validated too
    assert cfg.with_changes(port=1234).port == 1234


def test_from_kv_transfer_config_maps_vllm_fields() -> None:
    vllm = {
        "kv_connector": "PyNcclConnector",  # not ours: ignored
        "kv_role": "kv_producer",
        "kv_rank": 1,
        "kv_parallel_size": 2,
        "kv_ip": "10.0.0.7",
        "kv_port": 14579,
        "kv_buffer_size": 1e9,
        "kv_buffer_device": "cpu",
    }
    cfg = PipeConfig.from_kv_transfer_config(vllm, token=TOKEN)
    assert (cfg.rank, cfg.world_size, cfg.host, cfg.port) == (1, 2, "10.0.0.7", 14579)
    assert cfg.buffer_bytes == 10**9 and type(cfg.buffer_bytes) is int
    assert cfg.device == "cpu"
    as_object = PipeConfig.from_kv_transfer_config(SimpleNamespace(**vllm), token=TOKEN)
    assert as_object == cfg
    # missing / None fields fall back to the defaults; overrides win
    minimal = PipeConfig.from_kv_transfer_config({"kv_rank": 0, "kv_ip": None}, port=1, token=TOKEN)
    assert (minimal.host, minimal.port, minimal.token, minimal.world_size) == (
        "127.0.0.1",
        1,
        TOKEN,
        2,
    )
    assert PipeConfig.from_kv_transfer_config({}, rank=0).rank == 0
    for source, field in (
        ({"kv_parallel_size": 2}, "rank"),
        ({"kv_rank": 0, "kv_buffer_size": 1.5}, "buffer_bytes"),
        ({"kv_rank": 0, "kv_buffer_size": math.inf}, "buffer_bytes"),
        ({"kv_rank": 0, "kv_port": 70000}, "port"),
        ({"kv_rank": 3, "kv_parallel_size": 2}, "rank"),
        ({"kv_rank": 0, "kv_buffer_device": "tpu"}, "device"),
    ):
        with pytest.raises(ConfigError) as info:
            PipeConfig.from_kv_transfer_config(source)
        assert info.value.field == field, (source, info.value)
    with pytest.raises(ConfigError) as unknown:
        PipeConfig.from_kv_transfer_config({"kv_rank": 0}, not_a_field=1)
    assert unknown.value.field == "not_a_field"
