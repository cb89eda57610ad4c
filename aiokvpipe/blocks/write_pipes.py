"""Write pipes, requester side: pipelined writes sent in turn, the owner's answers read.

Writes of one request and region to one owner share a
:class:`~aiokvpipe.blocks.core._WritePipe` (see
:meth:`~aiokvpipe.blocks.requester.Requester._exchange`): they are sent in call
order on one connection, pipelined once the owner accepted one of them there,
and a reader task takes the owner's answers back in the order they were sent
(see :mod:`aiokvpipe.blocks.service`). A connection that breaks fails every
write queued or pending on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TYPE_CHECKING, Any

from ..errors import (
    AiokvpipeError,
    MalformedFrameError,
    PeerClosedError,
    ProtocolError,
)
from . import protocol
from .core import (
    ServiceCore,
    _Answer,
    _Conn,
    _Outbound,
    _WritePipe,
)
from .protocol import Kind

if TYPE_CHECKING:
    from .gpu import MappedRegion
    from .ncclpath import NcclLink


class WritePipes(ServiceCore):
    """Write pipes, requester side; mixed into Requester (and so BlockService)."""

    if TYPE_CHECKING:
        # Requester's steps of one exchange, which the pipe calls back into
        # (unpipelined transfers use them too): declared for the type checker only.
        async def _transfer_on(self, conn: _Conn, op: _Outbound) -> AiokvpipeError | None: ...

        async def _request(
            self, conn: _Conn, op: _Outbound, mapped: MappedRegion | None, link: NcclLink | None
        ) -> None: ...

        async def _agreed(
            self,
            conn: _Conn,
            op: _Outbound,
            mapped: MappedRegion | None,
            link: NcclLink | None,
            what: str,
        ) -> tuple[AiokvpipeError | None, protocol.Path]: ...

    async def _send_in_turn(
        self, pipe: _WritePipe, op: _Outbound
    ) -> asyncio.Future[AiokvpipeError | None] | None:
        """Send ``op`` in its turn on the pipe's connection: the future of the owner's
        answer, or None when there is none to wait for (refusals raised)."""
        async with pipe.turn:
            if op.segs.redirected:  # cancelled, or its peer lost, while it queued
                if op.error is not None:
                    raise op.error
                return None
            if pipe.broken is not None:
                raise _broke(op, pipe.broken)
            if pipe.conn is None:
                pipe.conn = await self._acquire(op.owner)
            conn = op.conn = pipe.conn
            pipe.sending = op
            outcome: asyncio.Future[AiokvpipeError | None] | AiokvpipeError | None
            try:
                if op.gpu:  # GPU regions: one whole exchange each (their paths need the REPLY)
                    outcome = await self._transfer_on(conn, op)
                else:
                    outcome = await self._send_streamed(pipe, conn, op)
            except BaseException as exc:
                # Stopped mid-framing (or the connection failed): nobody can
                # tell where the next message starts. Every write on it fails.
                pipe.sending = None
                self._break(pipe, exc)
                raise
            finally:
                pipe.sending = None
        if isinstance(outcome, asyncio.Future):
            return outcome
        if op.error is not None:
            raise op.error
        if outcome is not None:
            raise outcome
        return None

    async def _send_streamed(
        self, pipe: _WritePipe, conn: _Conn, op: _Outbound
    ) -> asyncio.Future[AiokvpipeError | None] | AiokvpipeError | None:
        """REQUEST, payload and verdict; the future of the owner's answer.

        Pipelined when the owner already accepted a write of this request and
        region on ``conn``; else the REQUEST waits for its REPLY first (the
        owner's refusal is returned, before any payload byte moved), and only
        the final answer is left to the reader.
        """
        what = f"write to {conn.owner}"
        body, ids = op.request
        prefix = b""
        if pipe.key in conn.accepted:
            self.pipelined_writes += 1
            # Leaves in the payload's first sendmsg: a small message sent
            # alone before a bulk payload slows loopback TCP (see send_segments).
            prefix = protocol.encode(Kind.REQUEST, {**body, "pipelined": True}, ids)
        else:
            assert not pipe.pending  # nothing is pipelined on a connection before this
            direction = conn.path.needs(op.op)
            if direction is not None and not op.segs.redirected:
                await conn.path.open(conn.sock, direction, what)
            if op.segs.redirected:  # stopped before a byte was sent
                return None
            await self._request(conn, op, None, None)
            refusal, _path = await self._agreed(conn, op, None, None, what)
            if refusal is not None:
                return refusal
            conn.accept_writes(pipe.key)
        await self._send_payload(conn.sock, conn.path, op.segs, what, prefix=prefix)
        verdict: protocol.Status = "abort" if op.segs.redirected else "commit"
        await protocol.send_message(conn.sock, Kind.STATUS, protocol.status(verdict), what)
        # No await from here to the append: the reader cannot see this
        # answer before its entry is queued.
        future: asyncio.Future[AiokvpipeError | None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        pipe.pending.append(_Answer(op, verdict, future))
        if pipe.reader is None:
            pipe.reader = asyncio.get_running_loop().create_task(self._read_answers(pipe, conn))
        return future

    async def _answer_of(
        self, pipe: _WritePipe, op: _Outbound, answer: asyncio.Future[AiokvpipeError | None]
    ) -> AiokvpipeError | None:
        try:
            return await answer
        except asyncio.CancelledError:
            # Only a hard stop (peer lost, closing, or a cancelled write's
            # framing outlived abort_timeout) cancels the task itself: the
            # owner's answers are not worth waiting for on this connection.
            if not answer.done() or answer.cancelled():
                self._break(pipe, op.error or PeerClosedError(f"{op.describe()}: stopped"))
            raise

    async def _read_answers(self, pipe: _WritePipe, conn: _Conn) -> None:
        """The owner's answers to the pipelined writes, in the order they were sent."""
        what = f"write to {conn.owner}"
        allowed = frozenset(("landed", "aborted", "error"))
        try:
            while pipe.pending:
                message = await protocol.expect_message(conn.sock, Kind.STATUS, what)
                entry = pipe.pending.popleft()
                try:
                    value = protocol.parse_status(message, allowed, what)
                    if (value == "aborted") != (entry.verdict == "abort") and value != "error":
                        raise MalformedFrameError(
                            f"{what}: owner answered {value!r} to {entry.verdict!r}"
                        )
                except ProtocolError as exc:
                    if not entry.future.done():
                        entry.future.set_exception(exc)
                    raise
                result = (
                    protocol.remote_error(message.body, f"owner {conn.owner}")
                    if value == "error"
                    else None
                )
                if not entry.future.done():
                    entry.future.set_result(result)
        except asyncio.CancelledError:
            pass  # _break stopped us; it fails what is pending
        except (AiokvpipeError, OSError) as exc:
            self._break(pipe, exc)
        finally:
            if pipe.reader is asyncio.current_task():
                pipe.reader = None

    def _break(self, pipe: _WritePipe, error: BaseException) -> None:
        """The pipe's connection is unusable: fail every answer still owed, stop
        the tasks using the connection, close it once they are off it."""
        if pipe.broken is None:
            pipe.broken = error
        owed = list(pipe.pending)
        pipe.pending.clear()
        for entry in owed:
            if not entry.future.done():
                entry.future.set_exception(_broke(entry.op, error))
        conn, pipe.conn = pipe.conn, None
        if conn is None:
            return
        me = asyncio.current_task()
        busy: list[asyncio.Task[Any]] = []
        reader, pipe.reader = pipe.reader, None
        if reader is not None and reader is not me and not reader.done():
            reader.cancel()
            busy.append(reader)
        sender = pipe.sending
        if sender is not None and sender.task is not None and sender.task is not me:
            if not sender.task.done():
                sender.stop(_broke(sender, error), close=True)
                busy.append(sender.task)
        # Wake whatever is parked on the socket now, but close it (and the
        # rings) only once those tasks left it: a parked task deregisters its
        # fd as it unwinds, and a closed fd's number may already be reused.
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
        if not busy:
            conn.close()
            return
        left = len(busy)

        def off(_task: asyncio.Task[Any]) -> None:
            nonlocal left
            left -= 1
            if not left:
                conn.close()

        for task in busy:
            task.add_done_callback(off)

    def _retire(self, key: tuple[str, str, str], pipe: _WritePipe) -> None:
        """The pipe's last user left: its connection back to the pool, the entry gone."""
        if self._write_pipes.get(key) is pipe:
            del self._write_pipes[key]
        if pipe.pending or pipe.reader is not None:  # answers nobody reads: not reusable
            self._break(pipe, PeerClosedError(f"write pipe to {pipe.owner} retired"))
        conn, pipe.conn = pipe.conn, None
        if conn is not None:
            self._release(conn)


def _broke(op: _Outbound, error: BaseException) -> PeerClosedError:
    """Why a write queued or pending on a connection that broke fails (a fresh error each)."""
    fresh = PeerClosedError(
        f"{op.describe()}: the block connection to the owner broke with writes of this "
        f"request queued on it: {error}"
    )
    fresh.__cause__ = error
    return fresh


def _retrieve(future: asyncio.Future[Any]) -> None:
    """An answer nobody awaits (its writer was stopped) is not news for the loop."""
    if not future.cancelled():
        future.exception()
