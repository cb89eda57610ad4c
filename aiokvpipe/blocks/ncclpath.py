"""Block runs of GPU regions on two hosts, sent with NCCL on the transport stream.

Between two GPU regions on different hosts (neither end forcing another
transport, NCCL available on both), a block connection gets its own
two-rank NCCL communicator the first time a GPU transfer needs it: the
requester is rank 0, the owner rank 1. The set-up reuses the Pipe's
(:mod:`aiokvpipe.transport.nccl`): the requester makes the unique id and
sends its raw bytes over the block socket, each end *reserves* its set-up on
the process's one NCCL thread and is *armed* once the other reserved too,
and the thread builds the communicator and pushes one warm-up byte through
it. SETUP messages on the block socket carry the steps::

    requester                                   owner
    SETUP{nccl, step=uid, uid, region, request_id} ->
                                                <- SETUP{nccl, step=reserved} (or error)
    SETUP{nccl, step=armed}                      ->
    (both build and warm up, bounded)
    SETUP{nccl, step=ready|failed}               <-> SETUP{nccl, step=ready|failed}

A refusal (the owner has no NCCL, the peer is not allowed, no lease) or a
failed build makes the requester stage through host memory from then on with
that peer; the owner only sets up for a peer holding a live lease on one of
its GPU regions.

A transfer then sends every block-run *segment* (a contiguous byte range of
one tensor: per layer, per outer index, per run of ids adjacent on both
sides) as one ``ncclSend`` matched by one ``ncclRecv`` into the destination
segment, all in one NCCL group on the communicator's own stream. Both ends
must cut the blocks into the same segments, so the REQUEST carries the run
lengths (``nccl: [count, ...]``); the owner checks that they cover exactly the
granted ids it was asked for, each run adjacent in its own region, before it
enqueues anything (:func:`segments` checks every range against the tensor
as well). Control stays on the block socket as for every other path (see
:mod:`aiokvpipe.blocks.protocol`)::

    read:  REQUEST{nccl} -> REPLY(ok, path=nccl) <- [NCCL sends owner->requester]
           STATUS(done|abort) -> STATUS(ok|aborted|error) <-
    write: REQUEST{nccl} -> REPLY(ok, path=nccl) <- [NCCL sends requester->owner]
           STATUS(commit|abort) -> STATUS(landed|aborted|error) <-

The owner counts a transfer only once its own side's event completed *and*
the requester said done/commit, so a lease never completes before the bytes
left (read) or landed in (write) its blocks.

Faults: enqueued NCCL work cannot be recalled. A cancelled transfer finishes
the pair's framing in the background (the requester still posts its matching
operations, into scratch memory if it had not enqueued yet, then says
"abort"; the owner counts nothing), bounded by the service's
``abort_timeout``, after which the communicator is aborted and the
connection dropped. A peer that dies mid-transfer (EOF on the block socket,
a peer event, NCCL's asynchronous error, or the operation timing out) gets
the communicator aborted, exactly once (:class:`~aiokvpipe.cuda.communicator.Communicator`
is the one owner of the abort), the lease or operation failed with
:class:`PeerClosedError`, and the connection dropped: the next transfer
dials a new connection and builds a fresh communicator.
"""

from __future__ import annotations

import asyncio
import binascii
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._timeouts import deadline
from ..cuda.communicator import Communicator
from ..cuda.nccl_thread import NcclThread
from ..cuda.streams import DeviceOps
from ..errors import MalformedFrameError
from ..transport.base import PeerInfo
from ..transport.nccl import UNIQUE_ID_BYTES, reserve_communicator, unique_id_bytes
from . import protocol
from .protocol import Kind
from .region import BlockRegion
from .runs import pair_runs

REQUESTER_RANK = 0
OWNER_RANK = 1
MAX_RUNS = protocol.MAX_NCCL_RUNS  # a transfer cut into more runs than this stages


def may_use_nccl(local: PeerInfo, peer: PeerInfo | None) -> bool:
    """Whether GPU regions of ``local`` and ``peer`` may use NCCL (this side's rule).

    Two hosts (one host has CUDA IPC, and NCCL refuses two ranks on one GPU),
    and neither end forced onto another transport.
    """
    if peer is None or (local.host_id and local.host_id == peer.host_id):
        return False
    return local.transport in ("auto", "nccl") and peer.transport in ("auto", "nccl")


def run_counts(local: Sequence[int], remote: Sequence[int]) -> list[int]:
    """Lengths of the runs adjacent on both sides, in order: how both ends cut the blocks."""
    return [count for _, _, count in pair_runs(local, remote)]


def segments(
    region: BlockRegion,
    ids: Sequence[int],
    counts: Sequence[int],
    layers: Sequence[int],
    what: str,
) -> list[torch.Tensor]:
    """uint8 views of ``ids``' blocks cut at ``counts``, in stream order (layer, outer, run).

    Every run must be adjacent ids of this region, and every view lies inside
    its tensor: checked here, before anything is enqueued (MalformedFrameError).
    """
    runs: list[tuple[int, int]] = []
    at = 0
    for count in counts:
        first = ids[at]
        if list(ids[at : at + count]) != list(range(first, first + count)):
            raise MalformedFrameError(
                f"{what}: run of {count} blocks from position {at} is not adjacent ids "
                f"({list(ids[at : at + count])[:8]})"
            )
        if not first >= 0 or first + count > region.num_blocks:
            raise MalformedFrameError(
                f"{what}: run {first}+{count} outside {region.num_blocks} blocks"
            )
        runs.append((first, count))
        at += count
    if at != len(ids):
        raise MalformedFrameError(f"{what}: runs cover {at} of {len(ids)} blocks")
    out: list[torch.Tensor] = []
    for layer in layers:
        size = region.layout(layer).block_bytes
        if size == 0:
            continue
        flat = region.flat(layer)
        stride = region.num_blocks * size
        for o in range(region.outer_count(layer)):
            for first, count in runs:
                begin, n = o * stride + first * size, count * size
                if begin + n > int(flat.numel()):
                    raise MalformedFrameError(f"{what}: segment {begin}+{n} outside tensor {layer}")
                out.append(flat[begin : begin + n])
    return out


@dataclass(eq=False)
class NcclLink:
    """A block connection's communicator, and the device it was built on."""

    comm: Communicator
    key: str  # the device key (GpuBackend) of this end

    def close(self) -> None:
        """Abort the communicator (once, on the NCCL thread); never blocks."""
        if not self.comm.aborted:
            self.comm.thread.submit(self.comm.abort_now)


async def _build(ticket: Any, thread: NcclThread, timeout: float | None, what: str) -> NcclLink:
    """Wait for the reserved set-up and its warm-up byte; aborted if given up on."""

    def abort(built: tuple[Communicator, Any]) -> None:
        built[0].abort_now()

    comm, warm = await thread.wait(
        ticket.future, timeout=timeout, what=f"{what}: NCCL set-up", on_abandoned=abort
    )
    try:
        await comm.wait(warm, timeout=timeout, what="NCCL warm-up transfer")
    except BaseException:
        comm.thread.submit(comm.abort_now)
        raise
    return NcclLink(comm, "")


async def _build_and_agree(
    sock: socket.socket,
    ticket: Any,
    thread: NcclThread,
    timeout: float | None,
    key: str,
    what: str,
) -> tuple[NcclLink | None, str]:
    """Build our side of the armed set-up, then trade verdicts with the peer.

    Returns the link (None unless both sides built theirs) and our own build
    error ("" if ours built): a failed build is told to the peer, and both
    sides stage from then on.
    """
    built: NcclLink | None = None
    error = ""
    try:
        built = await _build(ticket, thread, timeout, what)
        built.key = key
    except Exception as exc:
        error = f"{what}: {exc}"
    return await _verdicts(sock, built, error, what), error


async def _verdicts(
    sock: socket.socket, built: NcclLink | None, error: str, what: str
) -> NcclLink | None:
    """Tell the peer how our build went, hear how its went: the link, or None."""
    body: dict[str, Any] = {"nccl": 1, "step": "ready" if built is not None else "failed"}
    if built is None:
        body["error"] = error[:500]
    await protocol.send_message(sock, Kind.SETUP, body, what)
    answer = (await protocol.expect_message(sock, Kind.SETUP, what)).body
    step = answer.get("step")
    if answer.get("nccl") != 1 or step not in ("ready", "failed"):
        if built is not None:
            built.close()
        raise MalformedFrameError(f"{what}: unexpected NCCL set-up answer {answer!r:.200}")
    if step == "ready" and built is not None:
        return built
    if built is not None:
        built.close()
    return None


async def connect(
    sock: socket.socket,
    nccl: Any,
    thread: NcclThread,
    ops: DeviceOps,
    key: str,
    region: str,
    request_id: str,
    timeout: float | None,
    what: str,
) -> tuple[NcclLink | None, str, bool]:
    """The requester's set-up: ``(link, why not, retry later)``; raises if the socket broke."""
    uid = unique_id_bytes(
        await thread.call(nccl.get_unique_id, timeout=timeout, what="ncclGetUniqueId")
    )
    ticket = reserve_communicator(
        thread, nccl, ops, uid, world_size=2, rank=REQUESTER_RANK,
        warmup_peer=OWNER_RANK, what=what,
    )  # fmt: skip
    try:
        body = {"nccl": 1, "step": "uid", "uid": uid.hex(), "region": region}
        await protocol.send_message(sock, Kind.SETUP, {**body, "request_id": request_id}, what)
        answer = (await protocol.expect_message(sock, Kind.SETUP, what)).body
        if answer.get("nccl") != 1:
            raise MalformedFrameError(f"{what}: unexpected NCCL set-up answer {answer!r:.200}")
        if answer.get("step") != "reserved":
            ticket.cancel()
            return None, str(answer.get("error", "refused"))[:500], answer.get("retry") is True
        ticket.arm()
        await protocol.send_message(sock, Kind.SETUP, {"nccl": 1, "step": "armed"}, what)
    except BaseException:
        ticket.cancel()
        raise
    link, error = await _build_and_agree(sock, ticket, thread, timeout, key, what)
    return link, error or ("the owner's NCCL set-up failed" if link is None else ""), False


async def accept(
    sock: socket.socket,
    body: dict[str, Any],
    nccl: Any,
    thread: NcclThread,
    ops: DeviceOps,
    key: str,
    timeout: float | None,
    what: str,
) -> NcclLink | None:
    """The owner's side of a set-up the requester started (``body``: its uid message)."""
    raw = body.get("uid")
    try:
        uid = binascii.unhexlify(raw) if isinstance(raw, str) else b""
    except (binascii.Error, ValueError):
        uid = b""
    if len(uid) != UNIQUE_ID_BYTES:
        raise MalformedFrameError(f"{what}: NCCL set-up without a {UNIQUE_ID_BYTES}-byte id")
    ticket = reserve_communicator(
        thread, nccl, ops, uid, world_size=2, rank=OWNER_RANK,
        warmup_peer=REQUESTER_RANK, what=what,
    )  # fmt: skip
    try:
        await protocol.send_message(sock, Kind.SETUP, {"nccl": 1, "step": "reserved"}, what)
        # Bounded: while our reservation waits unarmed, no other NCCL set-up of
        # this process (a Pipe's included) can start.
        async with deadline(timeout, lambda: f"{what}: the requester never armed its set-up"):
            armed = (await protocol.expect_message(sock, Kind.SETUP, what)).body
        if armed.get("nccl") != 1 or armed.get("step") != "armed":
            raise MalformedFrameError(f"{what}: NCCL set-up not armed: {armed!r:.200}")
        ticket.arm()
    except BaseException:
        ticket.cancel()
        raise
    link, _ = await _build_and_agree(sock, ticket, thread, timeout, key, what)
    return link


async def refuse(sock: socket.socket, reason: str, retry: bool, what: str) -> None:
    answer = {"nccl": 1, "error": reason[:500], "retry": retry}
    await protocol.send_message(sock, Kind.SETUP, answer, what)


async def run_group(
    link: NcclLink,
    peer: int,
    sends: Sequence[torch.Tensor],
    recvs: Sequence[torch.Tensor],
    ready: Sequence[Any],
    answer: asyncio.Future[protocol.Message],
    timeout: float | None,
    what: str,
) -> None:
    """Enqueue one group of sends/recvs after ``ready``; await its event, or the peer's end.

    ``answer`` is the pending read of the peer's next message: it must not
    finish first (EOF there means the peer died: PeerClosedError); the
    caller aborts the communicator on any error.
    """
    event = await link.comm.group(sends, recvs, peer, ready, timeout=timeout)
    waiting = asyncio.ensure_future(link.comm.wait(event, timeout=timeout, what=what))
    try:
        both: set[asyncio.Future[Any]] = {waiting, answer}
        done, _ = await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        if waiting not in done:
            answer.result()  # raises PeerClosedError on EOF
            if not _await_also(answer):
                raise MalformedFrameError(f"{what}: a message before the NCCL transfer ended")
        await waiting
    finally:
        if not waiting.done():
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)


def _await_also(answer: asyncio.Future[protocol.Message]) -> bool:
    """Whether a message that came before our event is one we may read later (a verdict)."""
    return answer.result().kind == Kind.STATUS


def scratch_like(views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Same-sized stand-ins (one buffer, overlapping) for a pair's framing after a cancel."""
    size = max((int(v.numel()) for v in views), default=0)
    if not views:
        return []
    buffer = torch.empty(size, dtype=torch.uint8, device=views[0].device)
    return [buffer[: int(v.numel())] for v in views]


__all__ = [
    "MAX_RUNS",
    "OWNER_RANK",
    "REQUESTER_RANK",
    "NcclLink",
    "accept",
    "connect",
    "may_use_nccl",
    "refuse",
    "run_counts",
    "run_group",
    "scratch_like",
    "segments",
]
