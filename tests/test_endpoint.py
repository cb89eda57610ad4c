"""Endpoint in one process: send/recv, stats, hooks, bad input, tokens, strangers.

Fault cases across processes are in test_endpoint_procs.py; the handshake
limits (issue 15, defect 5) in test_link_limits.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
from conftest import free_port
from transport_conformance import assert_same, tagged

import aiokvpipe
from aiokvpipe import (
    AuthenticationError,
    ConfigError,
    Endpoint,
    EndpointConfig,
    PeerClosedError,
    PeerUnreachableError,
    PipeClosedError,
    PipeConfig,
)
from aiokvpipe.handshake import authenticate_connector, send_message
from aiokvpipe.links import Incoming
from aiokvpipe.peers import PeerEvent

TOKEN = "endpoint-tests-token-0123456789"
FAST = {"heartbeat_interval": 0.2, "peer_timeout": 1.0, "connect_timeout": 3.0}


def cfg(**overrides: Any) -> EndpointConfig:
    values: dict[str, Any] = {"token": TOKEN, "buffer_bytes": 4 << 20, **FAST}
    values.update(overrides)
    return EndpointConfig(**values)


@contextlib.asynccontextmanager
async def endpoints(*configs: EndpointConfig) -> AsyncIterator[list[Endpoint]]:
    eps: list[Endpoint] = []
    try:
        for c in configs:
            eps.append(await Endpoint.start(c))
        yield eps
    finally:
        for ep in eps:
            with contextlib.suppress(Exception):
                await ep.aclose()


@pytest.mark.timeout(20)
async def test_send_recv_both_ways_in_order_with_stats() -> None:
    assert aiokvpipe.Endpoint is Endpoint and aiokvpipe.EndpointConfig is EndpointConfig
    async with endpoints(cfg(name="a"), cfg(name="b"), cfg(name="c")) as (a, b, c):
        items = [tagged(i) for i in range(20)] + [None, torch.zeros(0), torch.ones(3, 5).t()]
        for item in items:
            await a.send(b.address, item)
            await c.send(b.address, tagged(100))
        await a.flush()
        got: dict[str, list[Any]] = {a.address: [], c.address: []}
        for _ in range(2 * len(items)):
            src, obj = await b.recv(timeout=5)
            got[src].append(obj)
        for g, e in zip(got[a.address], items, strict=True):
            assert_same(g, e)
        assert all(torch.equal(t, tagged(100)) for t in got[c.address])
        await b.send(a.address, tagged(7))  # b dials a back: a link per direction
        src, obj = await a.recv(timeout=5)
        assert src == b.address
        assert_same(obj, tagged(7))
        stats = b.stats()[a.address]
        assert stats.name == "a" and stats.instance == a.instance and stats.state == "up"
        nbytes = sum(0 if t is None else t.numel() * t.element_size() for t in items)
        assert (stats.messages_received, stats.bytes_received) == (len(items), nbytes)
        assert (stats.messages_sent, stats.recv_transport, stats.errors) == (1, "shm", 0)
        assert stats.last_heard is not None and stats.last_heard < 1.0
        assert a.stats()[b.address].bytes_sent == nbytes
        assert a.latency.count == len(items) + 0 and repr(a).startswith("<Endpoint a at ")


@pytest.mark.timeout(20)
@pytest.mark.parametrize("transport", ["tcp", "shm"])
async def test_forced_transport_and_large_tensor(transport: str) -> None:
    async with endpoints(cfg(transport=transport), cfg(transport=transport)) as (a, b):
        big = torch.randn(3 << 20)  # 12 MiB through a 4 MiB window
        transfer = await a.send(b.address, big)
        src, obj = await b.recv(timeout=10)
        await transfer
        assert src == a.address
        assert_same(obj, big)
        assert a.stats()[b.address].send_transport == transport


@pytest.mark.timeout(20)
async def test_malformed_addresses_are_config_errors() -> None:
    async with endpoints(cfg()) as (a,):
        for bad in ("", "nohost", "host:", ":80", "h:0", "h:70000", "h:x1", "::1:80", 80, None):
            with pytest.raises(ConfigError) as info:
                await a.send(bad, None)  # type: ignore[arg-type]
            assert info.value.field == "address", bad
        assert a.stats() == {}


@pytest.mark.timeout(20)
async def test_dial_to_nothing_fails_within_connect_timeout() -> None:
    async with endpoints(cfg(connect_timeout=0.5)) as (a,):
        address = f"127.0.0.1:{free_port()}"
        started = time.monotonic()
        with pytest.raises(PeerUnreachableError, match=address):
            await a.send(address, tagged(1))
        assert time.monotonic() - started < 1.5
        assert a.stats()[address].errors == 1
        # the next send tries again (and fails the same way)
        with pytest.raises(PeerUnreachableError):
            await a.send(address, tagged(1))


@pytest.mark.timeout(20)
async def test_wrong_token_is_refused_and_the_endpoint_keeps_serving() -> None:
    async with endpoints(cfg(), cfg(token="another-token-0123456789"), cfg()) as (a, stranger, b):
        with pytest.raises(AuthenticationError, match="rejected our token"):
            await stranger.send(a.address, tagged(1))
        await b.send(a.address, tagged(2))
        src, obj = await a.recv(timeout=5)
        assert src == b.address
        assert_same(obj, tagged(2))


@pytest.mark.timeout(20)
async def test_garbage_speakers_are_dropped() -> None:
    """Raw garbage, an authenticated caller with a bad hello, an unknown
    purpose, a data link for a session that does not exist: all refused or
    dropped; a real peer still gets through."""
    async with endpoints(cfg(handshake_timeout=1.0), cfg()) as (a, b):
        host, port = a.local.address, a.local.port
        loop = asyncio.get_running_loop()
        socks = []
        try:
            for hello in (None, {"purpose": "session"}, {"purpose": "x", "peer": {}}):
                sock = socket.socket()
                sock.setblocking(False)
                socks.append(sock)
                await loop.sock_connect(sock, (host, port))
                if hello is None:
                    await loop.sock_sendall(sock, bytes(range(256)) * 4)
                else:
                    await authenticate_connector(sock, TOKEN.encode(), "test")
                    await send_message(sock, hello, "test")
            with pytest.raises(PeerClosedError, match="nothing here serves 'nope'"):
                await b.dial(a.address, "nope")
            await b.send(a.address, tagged(3))
            assert_same((await a.recv(timeout=5))[1], tagged(3))
            for sock in socks:  # each was closed by a
                sock.setblocking(True)
                sock.settimeout(5)
                with contextlib.suppress(ConnectionResetError):
                    while sock.recv(4096):
                        pass
        finally:
            for sock in socks:
                sock.close()


def test_token_policy_for_both_configs() -> None:
    """Issue 15, defect 4: no token on a routable address needs insecure=True;
    tokens are at least 16 bytes; the error names the opt-out."""
    for make in (
        lambda **kw: EndpointConfig(**kw),
        lambda **kw: PipeConfig(rank=0, **kw),
    ):
        with pytest.raises(ConfigError, match="insecure=True") as info:
            make(host="10.1.2.3")
        assert info.value.field == "token"
        make(host="10.1.2.3", insecure=True)
        make(host="10.1.2.3", token="x" * 16)
        make(host="localhost")
        make(host="::1")
        with pytest.raises(ConfigError, match="at least 16") as info:
            make(token="x" * 15)
        assert info.value.field == "token"
    with pytest.raises(ConfigError, match="insecure=True"):
        PipeConfig(rank=0, bind_host="0.0.0.0")
    with pytest.raises(ConfigError, match="insecure=True"):
        PipeConfig.from_kv_transfer_config({"kv_rank": 0, "kv_ip": "10.0.0.7"})
    assert PipeConfig.from_kv_transfer_config({"kv_rank": 0, "kv_ip": "10.0.0.7"}, token=TOKEN)
    with pytest.raises(ConfigError) as info:
        EndpointConfig(host="0.0.0.0", token=TOKEN)
    assert info.value.field == "advertise_host"
    assert TOKEN not in repr(EndpointConfig(token=TOKEN))
    for field, value in (
        ("peer_timeout", 0.3),  # < 2 x heartbeat_interval
        ("heartbeat_interval", 0),
        ("max_pending_handshakes", 0),
        ("name", 3),
        ("port", -1),
        ("transport", "udp"),
    ):
        with pytest.raises(ConfigError) as info:
            EndpointConfig(**{field: value})
        assert info.value.field == field


@pytest.mark.timeout(20)
async def test_hooks_serve_dial_and_peer_events() -> None:
    """The hooks a block service builds on: a purpose of its own (an
    authenticated socket it owns), and events when a peer instance closes or
    is replaced by a restart on the same address."""
    port = free_port()
    async with endpoints(cfg(name="owner", port=port), cfg(name="user")) as (owner, user):
        got: asyncio.Future[Incoming] = asyncio.get_running_loop().create_future()

        async def handler(incoming: Incoming) -> None:
            await incoming.accept(owner.local)
            got.set_result(incoming)

        owner.serve("echo", handler)
        with pytest.raises(ConfigError):
            owner.serve("session", handler)
        with pytest.raises(ConfigError):
            owner.serve("blocks", handler)  # the paged-block service has it
        dialed = await user.dial(owner.address, "echo")
        incoming = await asyncio.wait_for(got, 5)
        try:
            assert dialed.peer is not None and dialed.peer.instance == owner.instance
            assert incoming.peer.instance == user.instance and incoming.peer.name == "user"
            await asyncio.get_running_loop().sock_sendall(dialed.sock, b"hi")
            assert await asyncio.get_running_loop().sock_recv(incoming.sock, 2) == b"hi"
        finally:
            dialed.sock.close()
            incoming.sock.close()

        events: list[PeerEvent] = []
        unsubscribe = user.on_peer_event(events.append)
        await user.send(owner.address, tagged(1))
        assert_same((await owner.recv(timeout=5))[1], tagged(1))
        old = owner.instance
        await owner.aclose()
        for _ in range(100):
            if events:
                break
            await asyncio.sleep(0.02)
        assert [(e.kind, e.instance) for e in events] == [("closed", old)]
        assert user.stats()[owner.address].state == "closed"
        async with endpoints(cfg(name="owner", port=port)) as (again,):
            await user.send(again.address, tagged(2))  # a new instance: dialled afresh
            assert_same((await again.recv(timeout=5))[1], tagged(2))
            assert user.stats()[again.address].instance == again.instance
        unsubscribe()


@pytest.mark.timeout(20)
async def test_closed_endpoint_refuses_calls_and_wakes_receivers() -> None:
    async with endpoints(cfg()) as (a,):
        pending = asyncio.ensure_future(a.recv())
        await asyncio.sleep(0.05)
        await a.aclose()
        await a.aclose()  # idempotent
        with pytest.raises(PipeClosedError):
            await pending
        with pytest.raises(PipeClosedError):
            await a.send("127.0.0.1:1", None)
        with pytest.raises(PipeClosedError):
            await a.recv()


@pytest.mark.timeout(20)
async def test_prometheus_collector() -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from aiokvpipe.metrics import prometheus_collector

    async with endpoints(cfg(name="a"), cfg(name="b")) as (a, b):
        for i in range(5):
            await a.send(b.address, tagged(i))
        for _ in range(5):
            await b.recv(timeout=5)
        registry = prometheus_client.CollectorRegistry()
        registry.register(prometheus_collector(a))
        text = prometheus_client.generate_latest(registry).decode()
        labels = f'direction="sent",endpoint="a",peer="{b.address}"'
        assert f"aiokvpipe_endpoint_messages_total{{{labels}}} 5.0" in text, text
        assert 'aiokvpipe_endpoint_transfer_seconds_count{endpoint="a"} 5.0' in text, text
        assert f'aiokvpipe_endpoint_peer_up{{endpoint="a",peer="{b.address}"}} 1.0' in text


# -- direct reads: recv parked on the only live link's channel, no pump hop ----------


async def _direct_on(b: Endpoint, a: Endpoint, value: int) -> None:
    """Send one message a -> b and take it, so that b reads a's link directly
    (a recv finding the inbox empty with one live link takes it over)."""
    await a.send(b.address, None)
    assert (await b.recv(timeout=5))[1] is None  # the link is up: one live link
    pending = asyncio.ensure_future(b.recv(timeout=5))
    await asyncio.sleep(0.02)
    await a.send(b.address, tagged(value))
    src, obj = await pending
    assert src == a.address
    assert_same(obj, tagged(value))
    assert b._direct_link is not None  # the case under test is the direct one


@pytest.mark.timeout(20)
@pytest.mark.parametrize("transport", ["tcp", "shm"])
async def test_a_recv_parked_on_one_link_serves_a_second_peer(transport: str) -> None:
    async with endpoints(*(cfg(transport=transport) for _ in range(3))) as (a, b, c):
        await _direct_on(b, a, 0)
        pending = asyncio.ensure_future(b.recv(timeout=5))
        await asyncio.sleep(0.05)  # parked on a's channel
        await c.send(b.address, tagged(1))  # a stays silent: c must not starve
        src, obj = await pending
        assert src == c.address
        assert_same(obj, tagged(1))
        assert b._direct_link is None  # two live links: both pumped
        await a.send(b.address, tagged(2))
        src, obj = await b.recv(timeout=5)
        assert (src, int(obj[0])) == (a.address, 2)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("transport", ["tcp", "shm"])
async def test_cancelled_and_timed_out_direct_reads_lose_nothing(transport: str) -> None:
    async with endpoints(cfg(transport=transport), cfg(transport=transport)) as (a, b):
        await _direct_on(b, a, -1)
        got: list[int] = []

        async def sender() -> None:
            for i in range(200):
                await a.send(b.address, tagged(i))
                if i % 7 == 0:
                    await asyncio.sleep(0.001)

        sending = asyncio.ensure_future(sender())
        turn = 0
        while len(got) < 200:
            turn += 1
            if turn % 3 == 0:  # cancelled wherever it is parked
                task = asyncio.ensure_future(b.recv())
                await asyncio.sleep(0 if turn % 2 else 0.0005)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    _, obj = await task
                    got.append(int(obj[0]))
            elif turn % 3 == 1:  # a timeout that may expire mid-read
                with contextlib.suppress(aiokvpipe.TransferTimeout):
                    _, obj = await b.recv(timeout=0.0005)
                    got.append(int(obj[0]))
            else:
                _, obj = await b.recv(timeout=5)
                got.append(int(obj[0]))
        await sending
        assert got == list(range(200))
        stats = b.stats()[a.address]
        assert stats.messages_received == 202


@pytest.mark.timeout(20)
async def test_an_older_link_of_the_same_peer_is_delivered_first() -> None:
    """b reads a's link directly; a's link breaks and a dials a new one: what
    the old link carried comes first, then the new link's, nothing lost."""
    async with endpoints(cfg(), cfg()) as (a, b):
        await _direct_on(b, a, -1)
        for i in range(5):
            await a.send(b.address, tagged(i))
        await a.flush()
        old = a._peers[b.address].out
        assert old is not None
        a._end_out(old, PeerClosedError("test: this link is gone"))  # a new send dials again
        for i in range(5, 10):
            await a.send(b.address, tagged(i))
        got = [int((await b.recv(timeout=5))[1][0]) for _ in range(10)]
        assert got == list(range(10))


@pytest.mark.timeout(20)
async def test_closing_wakes_a_direct_read() -> None:
    async with endpoints(cfg(), cfg()) as (a, b):
        await _direct_on(b, a, 0)
        pending = asyncio.ensure_future(b.recv())
        await asyncio.sleep(0.05)
        await b.aclose()
        with pytest.raises(PipeClosedError, match=r"endpoint .* is closed"):
            await pending


@pytest.mark.timeout(20)
@pytest.mark.parametrize("order", ["interrupt-then-cancel", "cancel-then-interrupt", "interrupt"])
async def test_a_cancel_meeting_an_interrupt_is_not_swallowed(order: str) -> None:
    """Taking a direct read off its link withdraws only its own cancel: the
    caller's cancel in the same loop turn still ends recv; alone, recv goes
    on and gets the next message."""
    async with endpoints(cfg(), cfg()) as (a, b):
        await _direct_on(b, a, 0)
        pending = asyncio.ensure_future(b.recv())
        await asyncio.sleep(0.02)
        assert b._direct_reads  # parked on a's channel
        if order == "cancel-then-interrupt":
            pending.cancel()
        b._leave_direct()
        if order == "interrupt-then-cancel":
            pending.cancel()
        if order == "interrupt":
            await asyncio.sleep(0.02)
            assert not pending.done()
            await a.send(b.address, tagged(1))
            src, obj = await asyncio.wait_for(pending, 5)
            assert (src, int(obj[0])) == (a.address, 1)
        else:
            await asyncio.wait({pending}, timeout=5)
            assert pending.cancelled()  # not swallowed as if it were only the interrupt
            await a.send(b.address, tagged(2))  # nothing lost, nothing stuck
            src, obj = await b.recv(timeout=5)
            assert (src, int(obj[0])) == (a.address, 2)


async def test_a_block_read_from_an_address_where_nothing_listens_fails_at_once() -> None:
    # Leases die with the owner's instance, so a refused dial cannot be
    # waited out into a lease: the read fails now, not after connect_timeout
    # (an in-step vLLM load stalled the decode's whole step for it).
    async with await Endpoint.start(cfg(connect_timeout=30.0)) as ep:
        ep.register("kv", torch.zeros(2, 4, 8), block_dim=1)
        gone = f"127.0.0.1:{free_port()}"
        t0 = time.monotonic()
        with pytest.raises(PeerClosedError, match="nothing listens"):
            await ep.read(gone, "req", "kv", [0], [1])
        assert time.monotonic() - t0 < 10.0  # not the 30 s connect_timeout
        # Plain sends still wait for a peer that is starting.
        send = asyncio.ensure_future(ep.send(gone, torch.ones(2)))
        await asyncio.sleep(0.3)
        assert not send.done()
        send.cancel()
        with contextlib.suppress(asyncio.CancelledError, PeerClosedError):
            await send


@pytest.mark.timeout(20)
async def test_sends_made_as_the_dial_ends_queue_behind_those_that_waited_for_it() -> None:
    """Per-peer order is call order, also across the first dial: a send made
    after the dial finished, but before the senders that waited for it had
    resumed (two loop turns later), must not overtake them."""
    async with endpoints(cfg(name="a"), cfg(name="b")) as (a, b):
        waited = [asyncio.ensure_future(a.send(b.address, tagged(i))) for i in range(8)]
        await asyncio.sleep(0)  # every waiter is queued on the dial
        waited[3].cancel()  # a sender that gives up keeps the others' order
        key = a._key(b.address)
        while a._peers[key].out is None or a._peers[key].out.outbound is None:  # noqa: ASYNC110 (polls each loop turn on purpose)
            await asyncio.sleep(0)  # the first turn in which the dial is done
        late = await a.send(b.address, tagged(8))
        await asyncio.gather(*waited, return_exceptions=True)
        await late
        got = [int((await b.recv())[1][0]) for _ in range(8)]
        assert got == [0, 1, 2, 4, 5, 6, 7, 8]


@pytest.mark.timeout(20)
async def test_a_sender_cancelled_while_it_waits_for_its_turn_keeps_the_link() -> None:
    """A send that arrives as the dial ends waits for the senders queued before
    it; cancelling it there must not drop the link those senders are using
    (the next send would dial a second link beside the first)."""
    async with endpoints(cfg(name="a"), cfg(name="b")) as (a, b):
        waited = [asyncio.ensure_future(a.send(b.address, tagged(i))) for i in range(4)]
        await asyncio.sleep(0)
        state = a._peers[a._key(b.address)]
        while state.out is None or state.out.outbound is None:  # noqa: ASYNC110 (polls each loop turn on purpose)
            await asyncio.sleep(0)
        link = state.out
        late = asyncio.ensure_future(a.send(b.address, tagged(99)))
        await asyncio.sleep(0)  # it is queued behind the four
        late.cancel()
        await asyncio.gather(*waited, late, return_exceptions=True)
        assert late.cancelled()
        await a.send(b.address, tagged(4))
        assert state.out is link  # the same link, not a second dial
        got = [int((await b.recv(timeout=5))[1][0]) for _ in range(5)]
        assert got == [0, 1, 2, 3, 4]
