"""NCCL communicators from a raw unique id, set up on the process's NCCL thread.

The helpers here build one rank's end of a communicator (:func:`reserve_communicator`,
armed by the caller once its peer has reserved too) or a whole one that needs no peer
hello (:func:`create_endpoint`). They know nothing of links or frames: the ``nccl``
transport and the blocks' NCCL path both build on them. See
:mod:`aiokvpipe.transport.nccl` for the set-up protocol around them.
"""

from __future__ import annotations

from typing import Any

import torch

from ..cuda.communicator import Communicator
from ..cuda.nccl_thread import InitTicket, NcclThread, nccl_thread
from ..cuda.runtime import cuda_errors
from ..cuda.streams import DeviceOps
from ..errors import MalformedFrameError

UNIQUE_ID_BYTES = 128
SENDER_RANK = 0
RECEIVER_RANK = 1


def unique_id_bytes(uid: Any) -> bytes:
    """The raw bytes of an NCCL unique id.

    cupy >= 14 returns ``bytes``; older cupy a tuple of 128 (signed) chars.
    """
    if isinstance(uid, (bytes, bytearray)):
        raw = bytes(uid)
    else:
        raw = bytes(int(c) & 0xFF for c in uid)
    if len(raw) != UNIQUE_ID_BYTES:
        raise MalformedFrameError(
            f"NCCL unique id has {len(raw)} bytes, expected {UNIQUE_ID_BYTES}"
        )
    return raw


def new_communicator(nccl: Any, world_size: int, uid: bytes, rank: int) -> Any:
    """``NcclCommunicator`` from raw id bytes, for either cupy id convention."""
    try:
        return nccl.NcclCommunicator(world_size, uid, rank)
    except TypeError:
        # cupy < 14 types the id as a tuple of C chars (-128..127).
        legacy = tuple(b - 256 if b > 127 else b for b in uid)
        return nccl.NcclCommunicator(world_size, legacy, rank)


def reserve_communicator(
    thread: NcclThread,
    nccl: Any,
    ops: DeviceOps,
    uid: bytes,
    *,
    world_size: int,
    rank: int,
    warmup_peer: int | None,
    what: str,
) -> InitTicket:
    """Reserve the set-up of this rank's end of communicator ``uid``.

    With ``warmup_peer``, one byte is sent to it (rank 0) or received from
    it (other ranks) right after the build, in a group of its own.
    """
    stream = ops.new_stream()  # the transport's own, for the communicator's life
    device = ops.device

    def build() -> Any:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        with cuda_errors(f"{what}: ncclCommInitRank (rank {rank} of {world_size})"):
            return new_communicator(nccl, world_size, uid, rank)

    warmup = None
    if warmup_peer is not None:
        probe = torch.zeros(1, dtype=torch.uint8, device=device)
        peer = warmup_peer

        def warmup(comm: Any) -> None:
            op = comm.send if rank == SENDER_RANK else comm.recv
            with cuda_errors(f"{what}: NCCL warm-up transfer"):
                op(probe.data_ptr(), 1, nccl.NCCL_UINT8, peer, stream.cuda_stream)

    return thread.reserve(nccl, build, stream=stream, warmup=warmup, what=what)


async def create_endpoint(
    nccl: Any,
    ops: DeviceOps,
    uid: bytes,
    *,
    world_size: int,
    rank: int,
    timeout: float | None,
    what: str,
    thread: NcclThread | None = None,
) -> Communicator:
    """A communicator of ``world_size`` ranks, for callers that need no peer hello.

    A one-rank communicator (``world_size=1``, the grouped self send/recv of
    the tests and benchmarks) is armed at once. Bounded by ``timeout``; a
    build that finishes after the caller gave up is aborted.
    """
    runner = thread if thread is not None else nccl_thread()
    ticket = reserve_communicator(
        runner, nccl, ops, uid, world_size=world_size, rank=rank, warmup_peer=None, what=what
    )
    ticket.arm()
    communicator, _ = await runner.wait(
        ticket.future, timeout=timeout, what=f"{what}: NCCL set-up", on_abandoned=_abort_pair
    )
    return communicator


def _abort_pair(built: tuple[Communicator, Any]) -> None:
    built[0].abort_now()  # on the NCCL thread: on_abandoned runs there
