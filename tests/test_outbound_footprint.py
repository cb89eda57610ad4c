"""What an accepted, unsent message keeps alive on the sending side.

A receiver that lags behind a stream of small messages leaves the sender
with a deep backlog (up to ``buffer_bytes`` of them: 1 GiB of 4 KiB
messages is 250 000). Every garbage-collector-tracked object per message
is work for each collection: with a closure per message (9 tracked objects
each) the collections took about half the sender's time in such a stream.
"""

from __future__ import annotations

import asyncio
import gc

import pytest
import torch
from transport_conformance import opened, pipe_factory

pytestmark = pytest.mark.timeout(60)


async def test_an_unsent_message_keeps_few_tracked_objects_alive() -> None:
    async with opened(pipe_factory("shm")) as (a, b):
        receiver = b._receiver
        receiver._limit = 0  # type: ignore[attr-defined]  # its reader stops taking chunks
        payload = torch.ones(1024)
        for _ in range(8):  # fill the ring: later messages wait in the sender
            await a.send(payload)
        await asyncio.sleep(0.05)
        n = 2000
        gc.collect()
        before = len(gc.get_objects())
        for _ in range(n):
            await a.send(payload)  # the Transfer is dropped, as a streaming caller does
        gc.collect()
        per_message = (len(gc.get_objects()) - before) / n
        assert len(a._inflight) >= n
        assert per_message <= 5, f"{per_message:.1f} tracked objects per unsent message"
        receiver._limit = 1 << 30  # type: ignore[attr-defined]
        space = receiver._space  # type: ignore[attr-defined]
        if space is not None and not space.done():
            space.set_result(None)
        async with asyncio.timeout(30):
            for _ in range(n + 8):
                assert torch.equal(await b.recv(), payload)
        await a.flush()
        assert len(a._inflight) == 0
