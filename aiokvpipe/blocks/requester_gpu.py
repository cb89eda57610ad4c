"""The requester side's GPU paths: staging, CUDA IPC mappings and copies, NCCL.

Which path a GPU region's transfer takes is decided per connection by
:meth:`~aiokvpipe.blocks.requester.Requester._transfer_on`; these helpers
carry it out (see :mod:`aiokvpipe.blocks.gpu` and :mod:`aiokvpipe.blocks.ncclpath`).
"""

from __future__ import annotations

import asyncio

from ..cuda.streams import fence
from ..errors import (
    AiokvpipeError,
    MalformedFrameError,
    ProtocolError,
)
from ..tensors import byte_view
from . import ncclpath, protocol
from .core import (
    ServiceCore,
    _Conn,
    _Outbound,
)
from .gpu import (
    MappedRegion,
    PeerMaps,
    enqueue_copies,
    parse_export_answer,
    plan_copies,
    stage_in,
    stage_out,
)
from .ncclpath import (
    MAX_RUNS,
    OWNER_RANK,
    NcclLink,
    run_counts,
    run_group,
    scratch_like,
    segments,
)
from .protocol import Kind
from .sgio import Segments


class RequesterGpu(ServiceCore):
    """GPU regions, requester side; mixed into BlockService."""

    def _stream_segs(self, op: _Outbound) -> Segments:
        """What the socket or ring moves for ``op``: its blocks, or a GPU region's staged bytes."""
        if not op.gpu:
            return op.segs
        receive = op.op == "read"
        if op.segs.redirected or (op.host is None and not receive):
            segs = Segments.scratch(op.nbytes, receive=receive)
        else:
            if op.host is None:
                assert op.local.placement is not None
                op.host = self._gpu.ops(op.local.placement).empty_pinned(op.nbytes)
            segs = Segments([byte_view(op.host)] if op.nbytes else [], receive=receive)
            self.staged_bytes += op.nbytes
        op.segs = segs  # stop() redirects what is moving now
        return segs

    async def _stage_out(self, op: _Outbound) -> None:
        assert op.local.placement is not None
        ops = self._gpu.ops(op.local.placement)
        what = f"staging {op.nbytes} bytes of region {op.region!r} to the host"
        op.host = await stage_out(
            ops, op.local, op.local_ids, op.layers, op.ready, self._settle, what
        )

    async def _stage_in(self, op: _Outbound) -> None:
        assert op.local.placement is not None and op.host is not None
        ops = self._gpu.ops(op.local.placement)
        what = f"copying {op.nbytes} staged bytes into region {op.region!r}"
        await stage_in(ops, op.local, op.local_ids, op.layers, op.host, None, self._settle, what)

    async def _mapping(self, conn: _Conn, op: _Outbound) -> MappedRegion | None:
        """The owner's region mapped here (mapped now if need be), or None: stage instead."""
        assert op.local.placement is not None
        key = op.local.placement
        maps = self._maps.get(conn.peer)
        if maps is None:
            try:
                memory = self._gpu.memory(key, conn.in_process)
            except AiokvpipeError:
                return None  # no cupy, say: staging needs none
            maps = self._maps[conn.peer] = PeerMaps(memory)
        mapped = maps.regions.get(op.region)
        if mapped is not None or op.region in maps.refused:
            return mapped
        what = f"mapping region {op.region!r} of {conn.owner}"
        first, tensors = 0, []
        ident: tuple[str, int, int] | None = None
        while True:
            body = {"ipc": 1, "region": op.region, "request_id": op.request[0]["request_id"]}
            await protocol.send_message(conn.sock, Kind.SETUP, {**body, "first": first}, what)
            answer = (await protocol.expect_message(conn.sock, Kind.SETUP, what)).body
            error = answer.get("error")
            if error is not None:
                if answer.get("retry") is not True:  # for good: stage from now on
                    maps.refused[op.region] = str(error)[:500]
                return None
            export_id, num_blocks, layers, part = parse_export_answer(answer, first, what)
            if ident is not None and ident != (export_id, num_blocks, layers):
                raise MalformedFrameError(f"{what}: the export changed between answers")
            ident = (export_id, num_blocks, layers)
            tensors.extend(part)
            first += len(part)
            if first >= layers:
                break
        try:
            return maps.map(
                op.region,
                export_id,
                num_blocks,
                tensors,
                lambda address, n: self._gpu.view(key, address, n),
            )
        except ProtocolError:
            raise
        except AiokvpipeError as exc:  # cannot map here (another GPU set, say): stage
            maps.refused[op.region] = str(exc)[:500]
            return None

    async def _ipc_copy(self, conn: _Conn, op: _Outbound, mapped: MappedRegion, what: str) -> None:
        """Copy the blocks through the mapping, every copy checked before the first is queued."""
        assert op.local.placement is not None
        remote = op.request[1]
        maps = self._maps[conn.peer]
        try:
            copies = plan_copies(op.op, op.local, op.local_ids, mapped, remote, op.layers, what)
        except ProtocolError:
            maps.drop(op.region)  # an export that lies is not kept for the next transfer
            raise
        if op.segs.redirected:
            return  # stopped before a copy was queued: nothing to undo
        mapped.busy += 1
        try:
            key = op.local.placement
            event = enqueue_copies(self._gpu.ops(key), self._gpu.stream(key), copies, op.ready)
        except BaseException:
            maps.copy_done(mapped)
            raise
        await self._settle(event, f"{what}: CUDA IPC copies", lambda: maps.copy_done(mapped))
        self.payload_bytes["cuda_ipc"] += op.nbytes

    async def _ipc_verdict(
        self,
        conn: _Conn,
        op: _Outbound,
        success: protocol.Status,
        counted: str,
        what: str,
        pending: asyncio.Future[protocol.Message] | None = None,
    ) -> AiokvpipeError | None:
        """Tell the owner the copies landed (or that we stopped); its answer.

        ``pending``: the read of that answer, already started (the NCCL path
        reads the socket while its transfer runs, to see the owner vanish).
        """
        verdict: protocol.Status = "abort" if op.segs.redirected else success
        try:
            await protocol.send_message(conn.sock, Kind.STATUS, protocol.status(verdict), what)
            if pending is not None:
                answer = await pending
            else:
                answer = await protocol.expect_message(conn.sock, Kind.STATUS, what)
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
        value = protocol.parse_status(answer, frozenset((counted, "aborted", "error")), what)
        if value == "error":
            return protocol.remote_error(answer.body, f"owner {conn.owner}")
        if (value == "aborted") != (verdict == "abort"):
            raise MalformedFrameError(f"{what}: owner answered {value!r} to {verdict!r}")
        return None

    # ------------------------------------------------------------ NCCL, requester side
    async def _nccl_link(self, conn: _Conn, op: _Outbound) -> NcclLink | None:
        """The connection's communicator (built now if need be), or None: stage instead."""
        assert op.local.placement is not None
        key = op.local.placement
        runs = len(run_counts(op.local_ids, op.request[1]))
        if not 0 < runs <= MAX_RUNS:
            return None  # no blocks, or too scattered for one REQUEST: this one stages
        link = conn.nccl
        if link is not None and not link.comm.aborted:
            return link if link.key == key else None  # built for another device: stage
        conn.nccl = None
        if conn.peer in self._nccl_refused:
            return None
        try:
            nccl, thread = self._gpu.nccl(key)
        except AiokvpipeError as exc:  # no cupy/NCCL here: stage from now on
            self._nccl_refused[conn.peer] = str(exc)[:500]
            return None
        link, why, retry = await ncclpath.connect(
            conn.sock,
            nccl,
            thread,
            self._gpu.ops(key),
            key,
            op.region,
            op.request[0]["request_id"],
            self._op_timeout,
            f"NCCL blocks with {conn.owner}",
        )
        if link is None and not retry:
            self._nccl_refused[conn.peer] = why
        conn.nccl = link
        return link

    async def _nccl_transfer(
        self, conn: _Conn, op: _Outbound, link: NcclLink, what: str
    ) -> asyncio.Future[protocol.Message]:
        """Post our half of the NCCL group, await it; the pending read of the owner's answer.

        Every segment is planned (and checked) before the group is queued.
        Stopped before that (cancelled, lease ended), the pair's framing still
        completes, through scratch memory, so the owner's half never hangs.
        """
        views = segments(
            op.local, op.local_ids, run_counts(op.local_ids, op.request[1]), op.layers, what
        )
        answer = asyncio.ensure_future(protocol.expect_message(conn.sock, Kind.STATUS, what))
        try:
            ops = self._gpu.ops(link.key)
            if op.segs.redirected:
                views = scratch_like(views)
                if views:  # freed on the current stream: not reused before the comm's use
                    ops.record_stream(views[0], link.comm.stream)
            ready = [e for e in (op.ready, fence(ops)) if e is not None]
            sends, recvs = (views, []) if op.op == "write" else ([], views)
            label = f"{what}: NCCL {op.op} of {op.nbytes} bytes in {len(views)} runs"
            await run_group(link, OWNER_RANK, sends, recvs, ready, answer, self._op_timeout, label)
        except BaseException:
            answer.cancel()
            link.close()  # queued work cannot be recalled: abort it (once)
            conn.nccl = None
            raise
        if not op.segs.redirected:
            self.payload_bytes["nccl"] += op.nbytes
        return answer
