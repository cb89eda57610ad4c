"""Endpoints across real processes: 2 prefill x 2 decode, SIGKILL, SIGSTOP,
restart on the same address (issue 12's fault list).

Workers are tests/endpoint_workers.py scripts; where the test needs to time
an error precisely, the test process itself is the prefill endpoint.
Heartbeats are fast here (0.2 s interval, 1 s peer_timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import free_port
from endpoint_workers import TOKEN, payload
from forked import Forked

from aiokvpipe import Endpoint, EndpointConfig, PeerClosedError
from aiokvpipe.links import dial
from aiokvpipe.peers import PeerEvent
from aiokvpipe.transport.base import PeerInfo

WORKERS = str(Path(__file__).with_name("endpoint_workers.py"))
PEER_TIMEOUT = 1.0


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a thread of its own that ends with it (the leak check
    counts the default executor's idle threads as leaked)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task
            loop.call_soon_threadsafe(lambda e=exc: fut.done() or fut.set_exception(e))
        else:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(result))

    threading.Thread(target=run, daemon=True).start()
    return await fut


class Worker:
    """One endpoint process; ``address`` once started."""

    def __init__(self, role: str, *args: str) -> None:
        self.proc = Forked(
            [sys.executable, WORKERS, role, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.address = ""
        self.instance = ""

    async def started(self) -> Worker:
        line = await asyncio.wait_for(in_thread(self.proc.stdout.readline), 30)  # type: ignore[union-attr]
        if not line:
            pytest.fail(f"worker died: {self.proc.communicate()[1]}")
        info = json.loads(line)
        self.address, self.instance = info["address"], info["instance"]
        return self

    async def finish(self) -> dict[str, Any]:
        out, err = await in_thread(self.proc.communicate, None, 60)
        assert self.proc.returncode == 0, err
        return dict(json.loads(out.strip().splitlines()[-1]))

    def signal(self, sig: int) -> float:
        self.proc.send_signal(sig)
        return time.monotonic()

    def reap(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@contextlib.asynccontextmanager
async def workers(*specs: tuple[str, ...]) -> AsyncIterator[list[Worker]]:
    started = [Worker(*spec) for spec in specs]
    try:
        yield list(await asyncio.gather(*(w.started() for w in started)))
    finally:
        for w in started:
            w.reap()


def decode(name: str, *extra: str) -> tuple[str, ...]:
    return ("decode", "--name", name, *extra)


class Client:
    """The test process as a prefill: request/answer round trips per decode."""

    def __init__(self, ep: Endpoint) -> None:
        self.ep = ep
        self.waiting: dict[tuple[str, int], asyncio.Future[torch.Tensor]] = {}
        self.received: list[tuple[str, torch.Tensor]] = []
        self.reader = asyncio.ensure_future(self._read())
        ep.on_peer_event(self._peer_gone)

    async def _read(self) -> None:
        while True:
            src, obj = await self.ep.recv()
            assert isinstance(obj, torch.Tensor)
            self.received.append((src, obj))
            fut = self.waiting.pop((src, int(obj[1])), None)
            if fut is not None and not fut.done():
                fut.set_result(obj)

    def _peer_gone(self, event: PeerEvent) -> None:
        # The hook at work: answers bound to a dead peer instance fail at once.
        for (address, seq), fut in list(self.waiting.items()):
            if address == event.address and not fut.done():
                fut.set_exception(event.error)
                del self.waiting[(address, seq)]

    async def ask(self, address: str, seq: int, size: int = 4096) -> torch.Tensor:
        fut = asyncio.get_running_loop().create_future()
        self.waiting[(address, seq)] = fut
        await self.ep.send(address, payload(0, seq, size))
        return await fut

    async def close(self) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.ep.aclose()


@contextlib.asynccontextmanager
async def client(**overrides: Any) -> AsyncIterator[Client]:
    values: dict[str, Any] = {
        "name": "test",
        "token": TOKEN,
        "heartbeat_interval": 0.2,
        "peer_timeout": PEER_TIMEOUT,
        "buffer_bytes": 8 << 20,
        "connect_timeout": 5.0,
    }
    values.update(overrides)
    c = Client(await Endpoint.start(EndpointConfig(**values)))
    try:
        yield c
    finally:
        await c.close()


# --------------------------------------------------------------------- 2P x 2D


@pytest.mark.timeout(60)
def test_two_prefill_two_decode_bit_exact_and_in_order() -> None:
    """Every request checked byte for byte by its decode, per-sender order
    checked on both sides, every answer back at its prefill."""

    async def run() -> None:
        async with workers(decode("d0"), decode("d1")) as decodes:
            targets = ",".join(d.address for d in decodes)
            args = ["--targets", targets, "--count", "80", "--size", "32768"]
            async with workers(
                ("prefill", "--name", "p0", "--sender", "1", *args),
                ("prefill", "--name", "p1", "--sender", "2", *args),
            ) as prefills:
                reports = await asyncio.gather(*(p.finish() for p in prefills))
            results = await asyncio.gather(*(d.finish() for d in decodes))
        for report in reports:
            assert report["answered"] == 80 and not report["problems"], report["problems"]
        for result in results:
            assert result["received"] == 80 and not result["problems"], result["problems"]
            assert len(result["stats"]) == 2  # both prefills, each its own peer

    asyncio.run(run())


# --------------------------------------------------------------------- crash


@pytest.mark.timeout(60)
async def test_sigkill_a_decode_mid_transfer() -> None:
    """Sends to the killed decode fail with PeerClosedError within
    peer_timeout + 1 s; round trips with the other decode go on without an
    error or a stall over 100 ms."""
    async with workers(decode("d0"), decode("d1")) as (victim, survivor), client() as c:
        for seq in range(20):  # both links up and warm
            await c.ask(victim.address, seq)
            await c.ask(survivor.address, seq)
        gaps: list[float] = []
        stop = asyncio.Event()

        async def keep_asking() -> None:
            seq, last = 1000, time.monotonic()
            while not stop.is_set():
                await c.ask(survivor.address, seq)
                now = time.monotonic()
                gaps.append(now - last)
                seq, last = seq + 1, now

        async def flood_victim() -> float:
            big = torch.ones(1 << 20, dtype=torch.uint8)
            while True:  # 1 MiB sends through an 8 MiB window, until it fails
                try:
                    await c.ep.send(victim.address, big)
                    await asyncio.sleep(0)
                except PeerClosedError:
                    return time.monotonic()

        asker = asyncio.ensure_future(keep_asking())
        flooder = asyncio.ensure_future(flood_victim())
        await asyncio.sleep(0.5)
        killed = victim.signal(signal.SIGKILL)
        failed = await asyncio.wait_for(flooder, PEER_TIMEOUT + 5)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.wait_for(asker, 10)
        assert failed - killed < PEER_TIMEOUT + 1.0
        assert gaps and max(gaps) < 0.1, f"stalled {max(gaps) * 1000:.0f} ms"
        stats = c.ep.stats()
        assert stats[victim.address].state == "dead" and stats[victim.address].errors >= 1
        assert stats[survivor.address].state == "up" and stats[survivor.address].errors == 0


@pytest.mark.timeout(60)
async def test_sigstop_is_detected_and_sigcont_does_not_resurrect() -> None:
    async with workers(decode("d0")) as (frozen,), client() as c:
        for seq in range(10):
            await c.ask(frozen.address, seq)
        events: list[PeerEvent] = []
        c.ep.on_peer_event(events.append)
        stopped = frozen.signal(signal.SIGSTOP)
        pending = asyncio.ensure_future(c.ask(frozen.address, 10))
        with pytest.raises(PeerClosedError, match=r"silent for \d") as info:
            await asyncio.wait_for(pending, PEER_TIMEOUT + 5)
        assert time.monotonic() - stopped < PEER_TIMEOUT + 1.0
        assert "d0" in str(info.value)
        assert [e.kind for e in events] == ["dead"]
        seen = len(c.received)
        frozen.signal(signal.SIGCONT)
        await asyncio.sleep(PEER_TIMEOUT)  # it wakes and finds its links gone
        # The old links stay dead: nothing it had sent on them surfaces. (Its
        # answer to seq 10, if it sends one now, is a new message on a new link.)
        late = [int(obj[1]) for _, obj in c.received[seen:]]
        assert late in ([], [10]), late
        assert [e.kind for e in events] == ["dead"]
        answer = await asyncio.wait_for(c.ask(frozen.address, 11), 10)  # new links
        assert [int(x) for x in answer] == [0, 11, 1]
        assert c.ep.stats()[frozen.address].state == "up"
        result = await frozen.finish()
        # On its side too, what was bound to the old links failed.
        assert result["stats"][c.ep.address]["errors"] >= 1, result["stats"]


# --------------------------------------------------------------------- restart


@pytest.mark.timeout(60)
async def test_restart_on_the_same_address_fences_the_old_instance() -> None:
    port = str(free_port())
    async with client() as c:
        async with workers(decode("d0", "--port", port, "--gen", "1")) as (old,):
            address = old.address
            for seq in range(5):
                await c.ask(address, seq)
            # Answers that arrive but are never read: still queued in the inbox.
            c.reader.cancel()
            await asyncio.gather(c.reader, return_exceptions=True)
            for seq in range(5, 10):
                await c.ep.send(address, payload(0, seq, 4096))
            for _ in range(100):
                if c.ep.stats()[address].messages_received == 10:
                    break
                await asyncio.sleep(0.02)
            assert c.ep.stats()[address].messages_received == 10
            old.signal(signal.SIGKILL)
            old.proc.wait()
            # Restart once we saw the death (a forked worker restarts in
            # milliseconds; a send racing the hang-up may raise it instead).
            for _ in range(250):
                if c.ep.stats()[address].state != "up":
                    break
                await asyncio.sleep(0.02)
        async with workers(decode("d0", "--port", port, "--gen", "2")) as (new,):
            assert new.address == address and new.instance != old.instance
            await c.ep.send(address, payload(0, 10, 4096))  # dials the new instance
            src, answer = await asyncio.wait_for(c.ep.recv(), 10)
            assert src == address
            assert [int(x) for x in answer] == [0, 10, 2]  # no stale gen-1 answer first
            assert c.ep.stats()[address].instance == new.instance
            result = await new.finish()
            assert result["received"] == 1 and not result["problems"]


@pytest.mark.timeout(60)
async def test_a_new_instance_saying_hello_fences_the_old_one_at_once() -> None:
    """A restart can be noticed before the old instance's death is (a host
    that vanished without closing its sockets): the new instance's hello on
    the same address ends everything bound to the old one right away and
    drops what it sent that was not read yet."""
    async with workers(decode("d0")) as (d0,), client() as c:
        for seq in range(3):
            await c.ask(d0.address, seq)
        c.reader.cancel()  # leave the next answer unread in the inbox
        await asyncio.gather(c.reader, return_exceptions=True)
        await c.ep.send(d0.address, payload(0, 3, 4096))
        for _ in range(100):
            if c.ep.stats()[d0.address].messages_received == 4:
                break
            await asyncio.sleep(0.02)
        events: list[PeerEvent] = []
        c.ep.on_peer_event(events.append)
        d0.signal(signal.SIGSTOP)  # the old instance: alive, silent, not yet timed out
        await c.ep.send(d0.address, torch.ones(16 << 20, dtype=torch.uint8))  # cannot leave
        stuck = asyncio.ensure_future(c.ep.flush(d0.address))
        # The "new instance" on d0's address: the real hello, a new instance id.
        host, port = d0.address.rsplit(":", 1)
        reborn = PeerInfo(-1, host, int(port), "h", os.getpid(), "cpu", "auto", name="d0",
                          instance="a-new-instance")  # fmt: skip
        hello = await dial(
            c.ep.local.address,
            c.ep.local.port,
            purpose="session",
            local=reborn,
            token=TOKEN.encode(),
            until=time.monotonic() + 5,
            what="reborn",
            extra={"session": "s1"},
        )
        try:
            with pytest.raises(PeerClosedError, match="restarted"):
                await asyncio.wait_for(stuck, 2)
            assert [(e.kind, e.instance) for e in events] == [("replaced", d0.instance)]
            assert c.ep.stats()[d0.address].instance == "a-new-instance"
            with pytest.raises(asyncio.TimeoutError):  # the old answer (seq 3) is gone
                await asyncio.wait_for(c.ep.recv(), 0.3)
        finally:
            hello.sock.close()
