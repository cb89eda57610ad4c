"""Unauthenticated connections are bounded (issue 15, defect 5).

Every accepted connection must prove the token within ``handshake_timeout``;
at most ``max_pending_handshakes`` wait at once (the oldest is dropped); out
of file descriptors the listener backs off and keeps accepting. Strangers
(hundreds of idle connections, a slowloris dribbling its handshake) never
keep real ranks or endpoints out.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import pytest
from endpoint_workers import TOKEN
from test_endpoint_procs import client, decode, workers
from transport_conformance import assert_same, close_all, tagged

from aiokvpipe import Endpoint, EndpointConfig, Pipe, PipeConfig
from aiokvpipe.handshake import recv_exactly

IDLE = 300


@contextlib.asynccontextmanager
async def idle_connections(host: str, port: int, count: int) -> AsyncIterator[list[socket.socket]]:
    """``count`` connections that never say a word (kept open until exit)."""
    socks: list[socket.socket] = []
    try:
        for i in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            socks.append(sock)
            sock.connect_ex((host, port))  # the kernel completes it; we never write
            if i % 32 == 31:
                await asyncio.sleep(0.01)  # let the listener take them
        await asyncio.sleep(0.1)
        yield socks
    finally:
        for sock in socks:
            sock.close()


async def slowloris(host: str, port: int, started: asyncio.Event) -> float:
    """Reads the acceptor's hello, then dribbles a response one byte at a
    time; returns how long the acceptor put up with it."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, port))
        await recv_exactly(sock, 38, "slowloris")
        began = time.monotonic()
        started.set()
        for _ in range(200):
            try:
                await loop.sock_sendall(sock, b"A")
            except OSError:
                break
            data = b"x"
            with contextlib.suppress(BlockingIOError):
                data = sock.recv(1)
            if not data:
                break  # dropped
            await asyncio.sleep(0.1)
        return time.monotonic() - began
    finally:
        sock.close()


def live_sockets(socks: list[socket.socket]) -> int:
    """How many of ``socks`` the other side has not closed."""
    alive = 0
    for sock in socks:
        try:
            data = sock.recv(64)
        except BlockingIOError:
            alive += 1
            continue
        except OSError:
            continue
        if data:  # its hello, then (maybe) EOF behind it
            try:
                alive += bool(sock.recv(64) is None)
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
    return alive


@pytest.mark.timeout(30)
async def test_idle_flood_and_slowloris_do_not_keep_an_endpoint_busy() -> None:
    config = EndpointConfig(token=TOKEN, handshake_timeout=1.0, max_pending_handshakes=32)
    async with (
        await Endpoint.start(config) as server,
        await Endpoint.start(EndpointConfig(token=TOKEN)) as real,
    ):
        host, port = server.local.address, server.local.port
        started = asyncio.Event()
        dribble = asyncio.ensure_future(slowloris(host, port, started))
        try:
            await started.wait()
            async with idle_connections(host, port, IDLE) as idle:
                t0 = time.monotonic()
                await real.send(server.address, tagged(1))
                src, obj = await asyncio.wait_for(server.recv(), 10)
                assert src == real.address
                assert_same(obj, tagged(1))
                # Served while 32 strangers hold their slots: seconds, not the
                # handshake deadline times the flood (a loaded 2-core box took 5.5 s).
                assert time.monotonic() - t0 < 10.0
                listener = server._listener
                assert listener.pending <= 32 and listener.dropped > 0
                put_up_with = await asyncio.wait_for(dribble, 10)
                assert put_up_with < 1.0 + 0.5  # the deadline, not 200 dribbles
                for _ in range(100):  # every stranger dropped or timed out
                    if listener.pending == 0:
                        break
                    await asyncio.sleep(0.05)
                assert listener.pending == 0
                assert live_sockets(idle) == 0
        finally:  # a failed assertion must not strand the dribbler and its socket
            dribble.cancel()
            await asyncio.gather(dribble, return_exceptions=True)


@pytest.mark.timeout(30)
async def test_rendezvous_server_keeps_serving_under_an_idle_flood() -> None:
    """Rank 0's rendezvous port full of idle connections: ranks still meet."""
    from conftest import free_port

    port = free_port()
    configs = [
        PipeConfig(rank=r, world_size=3, port=port, connect_timeout=10.0, handshake_timeout=1.0)
        for r in range(3)
    ]
    rank0 = asyncio.ensure_future(Pipe.connect(configs[0]))
    pipes: list[Pipe] = []
    try:
        for _ in range(200):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            await asyncio.sleep(0.02)
        async with idle_connections("127.0.0.1", port, IDLE):
            t0 = time.monotonic()
            others = await asyncio.wait_for(
                asyncio.gather(*(Pipe.connect(c) for c in configs[1:])), 8
            )
            pipes = [await rank0, *others]
            assert time.monotonic() - t0 < 5.0
            for rank, pipe in enumerate(pipes):
                await pipe.send(tagged(rank))
            for rank, pipe in enumerate(pipes):
                assert_same(await asyncio.wait_for(pipe.recv(), 5), tagged((rank - 1) % 3))
    finally:
        rank0.cancel()
        results = await asyncio.gather(rank0, return_exceptions=True)
        if isinstance(results[0], Pipe) and results[0] not in pipes:
            pipes.append(results[0])
        await close_all(pipes)


@pytest.mark.timeout(60)
async def test_out_of_fds_the_listener_backs_off_and_keeps_accepting() -> None:
    """A decode process limited to 160 fds, flooded with 300 connections and
    no cap short of EMFILE: its accept loop survives, drops the oldest
    strangers, and a real endpoint still gets its answer."""
    spec = decode("d0", "--max-fds", "160", "--max-pending", "10000", "--handshake-timeout", "3")
    async with workers(spec) as (d0,), client() as c:
        host, port = d0.address.rsplit(":", 1)
        async with idle_connections(host, int(port), IDLE):
            await asyncio.sleep(0.5)  # it hits EMFILE here
            answer = await asyncio.wait_for(c.ask(d0.address, 1), 10)
            assert [int(x) for x in answer] == [0, 1, 1]
        assert d0.proc.poll() is None
        answer = await asyncio.wait_for(c.ask(d0.address, 2), 10)
        assert [int(x) for x in answer] == [0, 2, 1]
        result = await d0.finish()
        assert result["received"] == 2 and not result["problems"]
