"""A hung-up shm receiver removes its dead sender's ring name, even when the
hang-up arrives before the kernel shows the sender as exited."""

from __future__ import annotations

import asyncio
import os

import shm_workers

from aiokvpipe.shm.ring import unlink_orphan


def exists(path: str) -> bool:
    return os.path.exists(path)  # a /dev/shm lookup: tmpfs, never blocks


async def test_the_orphan_is_unlinked_once_its_creator_is_gone() -> None:
    with shm_workers.child(shm_workers.create_and_hang) as (proc, conn):
        handle = conn.recv()
        path = f"/dev/shm/{handle.name.lstrip('/')}"
        # The creator still runs: the first attempt is refused, not final.
        unlink_orphan(handle.name)
        assert exists(path)
        proc.kill()
        proc.join(10)
        for _ in range(300):  # the retries find it gone within ~0.1 s of the reap
            if not exists(path):
                break
            await asyncio.sleep(0.01)
        assert not exists(path), "the dead creator's ring name was left in /dev/shm"
