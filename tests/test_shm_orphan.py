"""A ring's name leaves /dev/shm as soon as its only reader has attached, so a
creator that is wedged or killed before it hears back cannot leak it."""

from __future__ import annotations

import os

import shm_workers

from aiokvpipe.config import PipeConfig
from aiokvpipe.shm import ShmRingBuffer, ShmRingBufferIO
from aiokvpipe.transport._shm_setup import HEADER_SLOT, encode_handle, ring_geometry, send_control
from aiokvpipe.transport.shm import ShmTransport
from aiokvpipe.transport.testing import link_pair


def shm_path(name: str) -> str:
    return f"/dev/shm/{name.lstrip('/')}"


def named(name: str) -> bool:
    return os.path.exists(shm_path(name))  # a tmpfs lookup: never blocks


def test_the_reader_drops_a_live_creators_name_and_keeps_its_data() -> None:
    with shm_workers.child(shm_workers.create_and_hang) as (proc, conn):
        handle = conn.recv()
        io = ShmRingBufferIO.attach(handle, 0)
        try:
            assert os.path.exists(shm_path(handle.name)), "the creator never unlinks it"
            io.buffer.drop_name()
            assert not os.path.exists(shm_path(handle.name))
            io.buffer.drop_name()  # idempotent
            proc.kill()
            proc.join(10)
            assert io.dequeue_sync(timeout=5) == b"before the crash"  # the mapping lives on
        finally:
            io.close()
        assert not os.path.exists(shm_path(handle.name))


async def test_the_shm_receiver_removes_the_name_before_the_sender_hears_back() -> None:
    """The sender's side is played by hand and never reads the confirmation (as a
    process whose loop is blocked, or that is killed, at that moment)."""
    config = PipeConfig(rank=0, connect_timeout=10.0)
    send_link, recv_link = link_pair(config)
    piece, chunks = ring_geometry(config.buffer_bytes)
    ring = ShmRingBuffer(1, piece + HEADER_SLOT, chunks)
    try:
        assert named(ring.name)
        await send_control(send_link.sock, {"ring": encode_handle(ring.export_handle())}, "t")
        channel = await ShmTransport.open_receiver(recv_link)
        try:
            assert not named(ring.name)
        finally:
            await channel.aclose()
    finally:
        ring.close()  # the creator's own unlink finds the name gone: no error
        send_link.sock.close()
        recv_link.sock.close()
