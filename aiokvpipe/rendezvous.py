"""The Pipe's rank table: rank 0 tells every rank where to dial.

Flow of :func:`rendezvous` for rank ``r`` of ``world_size``:

1. Rank 0 serves a rendezvous listener at ``(host, port)``.
2. Every rank (rank 0 too, through the same code) dials it with purpose
   ``"register"``: the token handshake, then a hello carrying its
   ``PeerInfo`` (the address and ephemeral port of its own data listener, a
   host identity, process id, device and wanted transport).
3. Once all ranks registered, rank 0 answers everyone with the full table.
4. Rank ``r`` dials rank ``r+1``'s listener with purpose ``"ring"`` (its
   *send* link) and accepts rank ``r-1`` on its own (its *recv* link); both
   are authenticated again, so a stranger who learns a port gets nothing.

Listening, dialling, the handshake and its limits are the link layer's
(:mod:`aiokvpipe.links`), shared with :class:`~aiokvpipe.endpoint.Endpoint`;
this module only keeps the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Awaitable
from dataclasses import asdict

from .config import PipeConfig
from .errors import ProtocolError
from .links.accept import Incoming, Listener, peer_from_hello
from .links.dial import dial, introduce
from .links.net import connect_with_retry, host_identity, within
from .transport.base import Link, PeerInfo

__all__ = ["host_identity", "rendezvous"]


class _Table:
    """Rank 0's side: collects every rank's PeerInfo and answers each with the table."""

    def __init__(self, cfg: PipeConfig) -> None:
        self.cfg = cfg
        self.table: dict[int, tuple[PeerInfo, Incoming]] = {}
        self.complete = asyncio.Event()

    async def register(self, incoming: Incoming) -> None:
        cfg, info = self.cfg, incoming.peer
        peer_world = incoming.message.get("world_size")
        if peer_world != cfg.world_size:
            # An authenticated rank configured differently: tell it why.
            await incoming.refuse(
                f"a rank registered with world_size={peer_world}, expected {cfg.world_size}",
                "world_size",
            )
            return
        if not 0 <= info.rank < cfg.world_size:
            await incoming.refuse(f"rank {info.rank} is out of range", "rank")
            return
        if info.rank in self.table:
            await incoming.refuse(f"rank {info.rank} registered twice", "rank")
            return
        self.table[info.rank] = (info, incoming)
        if len(self.table) == cfg.world_size:
            peers = [
                asdict(info) for info, _ in sorted(self.table.values(), key=lambda x: x[0].rank)
            ]
            for _, waiting in self.table.values():
                with contextlib.suppress(ConnectionError):
                    await waiting.accept(peers=peers)
            self.complete.set()

    def close(self) -> None:
        for _, incoming in self.table.values():
            incoming.sock.close()


def _local_info(cfg: PipeConfig, bind: str, port: int, instance: str) -> PeerInfo:
    return PeerInfo(
        rank=cfg.rank,
        address=bind,
        port=port,
        host_id=host_identity(),
        pid=os.getpid(),
        device=cfg.device,
        transport=cfg.transport,
        name=f"rank {cfg.rank}",
        instance=instance,
    )


def _listener(cfg: PipeConfig, host: str, port: int, what: str) -> Listener:
    return Listener(
        host,
        port,
        token=cfg.token_bytes,
        what=what,
        handshake_timeout=cfg.handshake_timeout,
        backlog=max(cfg.world_size * 2, 16),
    ).start()


async def rendezvous(cfg: PipeConfig) -> tuple[Link, Link]:
    """Meet every rank and return this rank's ``(send_link, recv_link)``.

    Bounded by ``cfg.connect_timeout``; on failure nothing is left open.
    """
    until = time.monotonic() + cfg.connect_timeout
    me = f"rank {cfg.rank}"
    server: Listener | None = None
    table: _Table | None = None
    listener: Listener | None = None
    predecessor = _Predecessor()
    try:
        if cfg.rank == 0:
            table = _Table(cfg)
            server = _listener(cfg, cfg.host, cfg.port, "rendezvous server")
            server.serve("register", table.register)
        what = f"{me}: rendezvous with {cfg.host}:{cfg.port}"
        reg = await connect_with_retry(cfg.host, cfg.port, until, what)
        try:
            bind = cfg.bind_host or (cfg.host if cfg.rank == 0 else reg.getsockname()[0])
            listener = _listener(cfg, bind, 0, me)
            listener.serve("ring", predecessor.vet)
        except BaseException:
            reg.close()
            raise
        local = _local_info(cfg, bind, listener.port, secrets.token_hex(8))
        answer = await introduce(
            reg,
            purpose="register",
            local=local,
            token=cfg.token_bytes,
            until=until,
            what=f"{what} (waiting for all {cfg.world_size} ranks)",
            extra={"world_size": cfg.world_size},
        )
        answer.sock.close()
        peers = {p.rank: p for p in (peer_from_hello(m, what) for m in answer.reply["peers"])}
        if sorted(peers) != list(range(cfg.world_size)):
            raise ProtocolError(f"{what}: incomplete peer table {sorted(peers)}")
        if server is not None:
            await server.aclose()
            server = None
        nxt, prv = peers[cfg.next_rank], peers[cfg.prev_rank]
        send_sock, recv_sock = await _both_sockets(
            _within(until, f"{me}: connecting to rank {nxt.rank}", _dial(cfg, local, nxt, until)),
            _within(until, f"{me}: waiting for rank {prv.rank}", predecessor.accept_from(prv)),
        )
        return (
            Link(cfg, send_sock, "send", local, nxt),
            Link(cfg, recv_sock, "recv", local, prv),
        )
    finally:
        predecessor.close()
        if listener is not None:
            await asyncio.shield(listener.aclose())
        if server is not None:
            await asyncio.shield(server.aclose())
        if table is not None:
            table.close()


def _within(until: float, what: str, aw: Awaitable[socket.socket]) -> Awaitable[socket.socket]:
    return within(until, what, aw)


async def _both_sockets(
    first: Awaitable[socket.socket], second: Awaitable[socket.socket]
) -> tuple[socket.socket, socket.socket]:
    """Run both steps concurrently; if either fails, cancel the other and close
    whatever socket it already produced (gather would leave it running)."""
    tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return tasks[0].result(), tasks[1].result()
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled() and task.exception() is None:
                task.result().close()
        raise


async def _dial(cfg: PipeConfig, local: PeerInfo, peer: PeerInfo, until: float) -> socket.socket:
    what = f"rank {cfg.rank} -> rank {peer.rank}"
    dialed = await dial(
        peer.address,
        peer.port,
        purpose="ring",
        local=local,
        token=cfg.token_bytes,
        until=until,
        what=what,
    )
    return dialed.sock


class _Predecessor:
    """The data listener's "ring" service: the first caller that proves to be
    the expected predecessor (same rank, process and instance as in the
    table) wins; anyone else is refused. Served from the moment the listener
    exists, because the predecessor may get the table and dial before we do;
    callers wait (each in its own task, so a silent stranger keeps nobody
    waiting) until the table says whom to expect."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.expected: asyncio.Future[PeerInfo] = loop.create_future()
        self.won: asyncio.Future[socket.socket] = loop.create_future()
        self.taken = False

    async def vet(self, incoming: Incoming) -> None:
        peer = await asyncio.shield(self.expected)
        who = incoming.peer
        if self.won.done() or (who.rank, who.process_id, who.instance) != (
            peer.rank,
            peer.process_id,
            peer.instance,
        ):
            await incoming.refuse(f"expected rank {peer.rank}")
            return
        await incoming.accept()
        if self.won.done():
            incoming.sock.close()
            return
        self.won.set_result(incoming.sock)

    async def accept_from(self, peer: PeerInfo) -> socket.socket:
        self.expected.set_result(peer)
        sock = await asyncio.shield(self.won)
        self.taken = True
        return sock

    def close(self) -> None:
        """Cancel waiting callers; close a winner nobody took."""
        self.expected.cancel()
        if not self.won.done():
            self.won.cancel()
        elif not self.won.cancelled() and not self.taken:
            self.won.result().close()
