"""Every message costs its header and bookkeeping on both windows (issue 15, defect 3).

A message of no payload (``None``, an empty or a tiny tensor) still costs a
header on the wire and a few hundred bytes of Python and torch objects on
each side. When only payload bytes were charged, a loop of ``send(None)``
passed a full send window (``try_acquire(0)`` always fits) and the receiver
queued ``(None, 0)`` without ever pausing: memory grew without bound on
both sides. Real pipes over tcp and shm, both loops.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
import torch
from transport_conformance import TRANSPORTS, opened, pipe_factory

from aiokvpipe import TransferTimeout
from aiokvpipe.pipe import Pipe
from aiokvpipe.wire import HEADER_SIZE, MESSAGE_OVERHEAD, message_charge

FLOOD = 10**6  # what a careless producer loop would send
WINDOW = 64 << 10


def test_every_message_is_charged_its_header_and_bookkeeping() -> None:
    assert MESSAGE_OVERHEAD > HEADER_SIZE
    assert message_charge(0) == MESSAGE_OVERHEAD
    assert message_charge(8) == 8 + MESSAGE_OVERHEAD
    assert message_charge(1 << 30) == (1 << 30) + MESSAGE_OVERHEAD
    with pytest.raises(ValueError):
        message_charge(-1)


def shrink_kernel_buffers(sender: Pipe, receiver: Pipe) -> None:
    """Small fixed socket buffers on the tcp link from ``sender`` to ``receiver``.

    Only to keep the test short: autotuned loopback buffers hold ~30 000
    None frames before the sender's window even starts to fill. The windows
    under test do not depend on the kernel's sizes.
    """
    sender._sender._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # type: ignore[attr-defined]
    receiver._receiver._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)  # type: ignore[attr-defined]


def receiver_queue(pipe: Pipe) -> tuple[int, int]:
    """(messages, charged bytes) received but not yet taken by ``recv``."""
    channel = pipe._receiver
    return len(channel._ready), channel._queued_bytes  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("payload", ["none", "8-byte"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_flood_of_tiny_messages_parks_the_sender_and_bounds_the_receiver(
    transport: str, payload: str
) -> None:
    """10**6 sends of ``None`` (or of an 8-byte tensor) to a receiver that never
    reads: the sender parks once its window holds ``buffer_bytes`` of charges,
    the receiver stops taking at ``buffer_bytes`` of charges, and everything
    accepted arrives intact and in order once the receiver reads."""
    item = None if payload == "none" else torch.arange(1, dtype=torch.int64)
    charge = message_charge(0 if item is None else 8)
    bound = WINDOW // charge + 1  # messages either window may hold at once
    async with opened(pipe_factory(transport), buffer_bytes=WINDOW) as (a, b):
        if transport == "tcp":
            shrink_kernel_buffers(a, b)
        accepted = 0
        for i in range(FLOOD):
            try:
                await a.send(item, timeout=0.3)
            except TransferTimeout:
                break  # parked: the window is full of messages that cannot leave
            accepted += 1
            if i % 128 == 0:
                # Let the receiver's reader run, as a real loop would, and
                # fail fast (long before 10**6) if either side grows unbounded.
                await asyncio.sleep(0)
                assert a.window.held <= WINDOW, "the send window let more in than it holds"
                queued, charged = receiver_queue(b)
                assert queued <= bound, f"receiver queued {queued} messages (bound {bound})"
                assert charged < WINDOW + charge
        else:
            raise AssertionError(f"{FLOOD} tiny sends never parked the sender")
        await asyncio.sleep(0.05)  # the receiver had every chance to take more
        queued, charged = receiver_queue(b)
        assert queued <= bound and charged < WINDOW + charge
        assert a.window.held <= WINDOW
        assert len(a._inflight) <= bound  # what the sender keeps alive is bounded too
        # The stalled receiver resumes: every accepted message, in order.
        async with asyncio.timeout(20):
            for i in range(accepted):
                got = await b.recv()
                if item is None:
                    assert got is None, f"message {i}: {got!r}"
                else:
                    assert got is not None and torch.equal(got, item), f"message {i}: {got!r}"
        await asyncio.wait_for(a.flush(), 10)
        assert a.pending_bytes == 0 and a.window.held == 0
        assert receiver_queue(b) == (0, 0)
