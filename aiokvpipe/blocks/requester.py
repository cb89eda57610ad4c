"""The requester side of a BlockService: reads and writes, on pooled connections.

One transfer runs as a task (:meth:`Requester._run`), so a cancelled or
timed-out caller returns at once while the task finishes the framing with
scratch memory. Writes of one request and region to one owner go through a
:class:`~aiokvpipe.blocks.core._WritePipe`: sent in call order on one
connection, pipelined once the owner accepted one of them there, their
answers read back in order (see :mod:`aiokvpipe.blocks.service`); that
machinery is in :mod:`.write_pipes`. GPU regions' paths are in
:mod:`.requester_gpu`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .._timeouts import deadline
from ..cuda.streams import fence
from ..errors import (
    AiokvpipeError,
    BlockError,
    MalformedFrameError,
)
from . import protocol
from .core import (
    _DEFAULT,
    _U32,
    _Conn,
    _Outbound,
    _WritePipe,
)
from .gpu import (
    MappedRegion,
)
from .lease import LeaseKind
from .ncclpath import (
    NcclLink,
    run_counts,
)
from .protocol import Kind
from .requester_gpu import RequesterGpu
from .runs import as_ids, check_ids, check_same_length
from .sgio import Segments
from .write_pipes import WritePipes


class Requester(WritePipes, RequesterGpu):
    """Reads, writes and write pipes; mixed into BlockService."""

    def _prepare(
        self,
        kind: LeaseKind,
        owner: str,
        request_id: str,
        name: str,
        remote_blocks: Any,
        local_blocks: Any,
        layers: Any,
    ) -> _Outbound:
        """Every local check, before a connection is touched."""
        self._check_open()
        if not isinstance(request_id, str) or not 0 < len(request_id) <= protocol.MAX_NAME:
            raise BlockError(f"request_id must be a str of 1..256 characters, not {request_id!r}")
        region = self.regions.get(name)
        local = region.check_blocks("local_blocks", local_blocks)
        remote = as_ids("remote_blocks", remote_blocks)
        check_ids("remote_blocks", remote, _U32, "a block id")
        check_same_length("local_blocks", local, "remote_blocks", remote)
        layer_ids = region.check_layers("layers", layers)
        nbytes = region.nbytes(len(local), layer_ids)
        request = protocol.request(
            kind,
            request_id,
            name,
            layer_ids,
            [region.layout(i) for i in layer_ids],
            nbytes,
            remote,
        )
        if region.placement is None:
            segs = Segments(region.segments(local, layer_ids), receive=kind == "read")
            ready = None
        else:
            # Bytes of a GPU region take a stream only staged (see _stream_segs).
            segs = Segments([], receive=kind == "read")
            ready = fence(self._gpu.ops(region.placement))  # the producer, at the call
        return _Outbound(
            kind,
            owner,
            (request[0], tuple(request[1])),
            nbytes,
            segs,
            name,
            region,
            local,
            layer_ids,
            ready,
        )

    async def _run(self, op: _Outbound, timeout: float | None) -> None:
        if timeout is _DEFAULT:
            timeout = self._op_timeout
        task = asyncio.get_running_loop().create_task(self._exchange(op))
        op.task = task
        self._ops[task] = op
        task.add_done_callback(self._op_done)
        try:
            async with deadline(timeout, op.describe):
                await asyncio.shield(task)
        except BaseException:
            if not task.done():
                # Cancelled or timed out: stop touching our blocks now and let
                # the task finish the framing with scratch memory, bounded.
                op.stop(None, close=False)
                timer = asyncio.get_running_loop().call_later(self._abort_timeout, task.cancel)
                task.add_done_callback(lambda _t: timer.cancel())
            raise

    def _op_done(self, task: asyncio.Task[None]) -> None:
        self._ops.pop(task, None)
        if not task.cancelled():
            task.exception()  # retrieved: an abandoned transfer's error is not news

    async def _exchange(self, op: _Outbound) -> None:
        """One transfer; writes of one request and region to one owner share a pipe."""
        if op.op != "write":
            await self._transfer(op)
            return
        # A layer-wise push issues a write per layer while the next layer
        # computes. Side by side, those writes would each take (or dial) a
        # connection and split the same bandwidth, so every layer lands late;
        # in call order on one connection each lands as early as it can, and
        # the lease's pieces land in the order they were produced.
        key = (op.owner, op.request[0]["request_id"], op.region)
        pipe = self._write_pipes.get(key)
        if pipe is None:
            pipe = self._write_pipes[key] = _WritePipe(op.owner, key[1:])
        pipe.users += 1
        try:
            answer = await self._send_in_turn(pipe, op)
            if answer is not None:
                refusal = await self._answer_of(pipe, op, answer)
                if op.error is not None:
                    raise op.error
                if refusal is not None:
                    raise refusal
        except asyncio.CancelledError:
            if op.error is not None:
                raise op.error from None
            raise
        finally:
            pipe.users -= 1
            if not pipe.users:
                self._retire(key, pipe)

    async def _transfer(self, op: _Outbound) -> None:
        """The requester's side of one transfer, on a pooled or new connection."""
        try:
            conn = await self._acquire(op.owner)
        except asyncio.CancelledError:
            if op.error is not None:
                raise op.error from None
            raise
        op.conn = conn
        healthy = False
        try:
            refusal = await self._transfer_on(conn, op)
            healthy = True
        except asyncio.CancelledError:
            if op.error is not None:
                raise op.error from None
            raise
        finally:
            if healthy:
                self._release(conn)
            else:
                conn.close()
        if op.error is not None:
            raise op.error
        if refusal is not None:
            raise refusal

    async def _transfer_on(self, conn: _Conn, op: _Outbound) -> AiokvpipeError | None:
        """One whole exchange on ``conn``: the owner's refusal, or None; raises if broken."""
        mapped = link = None
        if op.gpu and conn.ipc and not op.segs.redirected:
            mapped = await self._mapping(conn, op)
        elif op.gpu and conn.nccl_ok and not op.segs.redirected:
            link = await self._nccl_link(conn, op)
        if mapped is None and link is None:
            direction = conn.path.needs(op.op)
            if direction is not None and not op.segs.redirected:
                await conn.path.open(conn.sock, direction, f"{op.op} with {conn.owner}")
            if op.gpu and op.op == "write" and not op.segs.redirected:
                await self._stage_out(op)  # before the owner waits on us
        if op.segs.redirected:  # stopped before a byte was sent
            return None
        if op.op == "read":
            return await self._do_read(conn, op, mapped, link)
        return await self._do_write(conn, op, mapped, link)

    async def _request(
        self, conn: _Conn, op: _Outbound, mapped: MappedRegion | None, link: NcclLink | None
    ) -> None:
        body, ids = op.request
        if mapped is not None:
            body = {**body, "ipc": mapped.export_id}
        if link is not None:
            body = {**body, "nccl": run_counts(op.local_ids, ids)}
        await protocol.send_message(
            conn.sock, Kind.REQUEST, body, f"{op.op} with {conn.owner}", ids
        )

    async def _open_transfer(
        self,
        conn: _Conn,
        op: _Outbound,
        mapped: MappedRegion | None,
        link: NcclLink | None,
        what: str,
        verdict: protocol.Status,
        ack: str,
    ) -> tuple[bool, AiokvpipeError | None]:
        """Request, agree on the path, and carry a device path (NCCL, IPC) to its verdict.

        ``(True, result)`` when that settled the transfer (a refusal included);
        ``(False, None)`` when the payload is to stream over the connection.
        Reads and writes differ only in the words of the verdict and its ack.
        """
        await self._request(conn, op, mapped, link)
        refusal, path = await self._agreed(conn, op, mapped, link, what)
        if refusal is not None:
            return True, refusal
        if path == "nccl":
            assert link is not None
            pending = await self._nccl_transfer(conn, op, link, what)
            return True, await self._ipc_verdict(conn, op, verdict, ack, what, pending)
        if path == "ipc":
            assert mapped is not None
            await self._ipc_copy(conn, op, mapped, what)
            return True, await self._ipc_verdict(conn, op, verdict, ack, what)
        return False, None

    async def _do_read(
        self, conn: _Conn, op: _Outbound, mapped: MappedRegion | None, link: NcclLink | None
    ) -> AiokvpipeError | None:
        """The owner's refusal (the connection stays usable) or None; raises if broken."""
        sock, what = conn.sock, f"read from {conn.owner}"
        settled, result = await self._open_transfer(conn, op, mapped, link, what, "done", "ok")
        if settled:
            return result
        segs = self._stream_segs(op)
        await self._recv_payload(sock, conn.path, segs, what)
        trailer = await protocol.expect_message(sock, Kind.STATUS, what)
        value = protocol.parse_status(trailer, frozenset(("ok", "error")), what)
        if value == "ok" and op.gpu and not op.segs.redirected and op.host is not None:
            await self._stage_in(op)
        verdict: protocol.Status = "done" if value == "ok" and not op.segs.redirected else "abort"
        await protocol.send_message(sock, Kind.STATUS, protocol.status(verdict), what)
        if value == "error":
            return protocol.remote_error(trailer.body, f"owner {conn.owner}")
        return None

    async def _do_write(
        self, conn: _Conn, op: _Outbound, mapped: MappedRegion | None, link: NcclLink | None
    ) -> AiokvpipeError | None:
        sock, what = conn.sock, f"write to {conn.owner}"
        settled, result = await self._open_transfer(
            conn, op, mapped, link, what, "commit", "landed"
        )
        if settled:
            return result
        if op.gpu and op.host is None and not op.segs.redirected:
            await self._stage_out(op)  # we meant to copy by IPC; the owner said stream
        segs = self._stream_segs(op)
        await self._send_payload(sock, conn.path, segs, what)
        verdict: protocol.Status = "abort" if op.segs.redirected else "commit"
        await protocol.send_message(sock, Kind.STATUS, protocol.status(verdict), what)
        answer = await protocol.expect_message(sock, Kind.STATUS, what)
        value = protocol.parse_status(answer, frozenset(("landed", "aborted", "error")), what)
        if value == "error":
            return protocol.remote_error(answer.body, f"owner {conn.owner}")
        if (value == "aborted") != (verdict == "abort"):
            raise MalformedFrameError(f"{what}: owner answered {value!r} to {verdict!r}")
        return None

    async def _agreed(
        self,
        conn: _Conn,
        op: _Outbound,
        mapped: MappedRegion | None,
        link: NcclLink | None,
        what: str,
    ) -> tuple[AiokvpipeError | None, protocol.Path]:
        """The owner's REPLY: its refusal, or None and the path once it agreed to our size."""
        reply = await protocol.expect_message(conn.sock, Kind.REPLY, what)
        try:
            nbytes = protocol.parse_reply(reply, f"owner {conn.owner}", what)
        except BlockError as exc:
            return exc, "stream"
        if nbytes != op.nbytes:
            raise MalformedFrameError(
                f"{what}: owner announced {nbytes} payload bytes for blocks that hold {op.nbytes}"
            )
        path = protocol.reply_path(reply, what)
        if path == "ipc" and mapped is None:
            raise MalformedFrameError(f"{what}: owner chose CUDA IPC for a request without it")
        if path == "nccl" and link is None:
            raise MalformedFrameError(f"{what}: owner chose NCCL for a request without it")
        if path == "stream" and mapped is not None:
            # The owner registered the region anew since we mapped it: the
            # mapping holds memory it no longer uses. Map the new one next time.
            maps = self._maps.get(conn.peer)
            if maps is not None:
                maps.drop(op.region)
        return None, path
