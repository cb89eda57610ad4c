"""Who listens where, and proving the token before any data is read.

Flow of :func:`rendezvous` for rank ``r`` of ``world_size``:

1. Rank 0 serves a rendezvous endpoint at ``(host, port)``.
2. Every rank (rank 0 too, through the same code) connects to it, proves the
   token, and registers ``PeerInfo``: the address and ephemeral port of its
   own data listener, a host identity, pid, device and wanted transport.
3. Once all ranks registered, rank 0 answers everyone with the full table.
4. Rank ``r`` connects to rank ``r+1``'s listener (its *send* link) and
   accepts rank ``r-1`` on its own (its *recv* link); both are authenticated
   again, so a stranger who learns a port gets nothing.

Every socket is a plain non-blocking socket driven through ``loop.sock_*``
calls (supported by asyncio and uvloop alike), then handed to a transport.

The token handshake and the control-message framing live in
:mod:`aiokvpipe.handshake`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import asdict
from typing import Any, TypeVar

from ._timeouts import deadline
from .config import PipeConfig
from .errors import (
    AuthenticationError,
    ConfigError,
    PeerClosedError,
    ProtocolError,
    TransferTimeout,
)
from .handshake import (
    authenticate_acceptor,
    authenticate_connector,
    recv_message,
    send_message,
)
from .transport.base import Link, PeerInfo

T = TypeVar("T")

_CONNECT_RETRY = 0.05


def host_identity() -> str:
    """An identity shared by exactly the processes that can share memory.

    Compares kernel boot id and the IPC/net namespaces rather than IP
    strings: two containers on one machine with separate /dev/shm differ,
    and one host reached through two addresses does not.
    """
    parts = []
    for path in ("/proc/sys/kernel/random/boot_id",):
        try:
            with open(path, encoding="ascii") as fh:
                parts.append(fh.read().strip())
        except OSError:
            parts.append(socket.gethostname())
    for ns in ("ipc", "net"):
        try:
            parts.append(os.readlink(f"/proc/self/ns/{ns}"))
        except OSError:
            pass
    try:
        st = os.stat("/dev/shm")
        parts.append(f"shm:{st.st_dev}:{st.st_ino}")
    except OSError:
        pass
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


# --------------------------------------------------------------------- sockets


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _listener(host: str, port: int, backlog: int) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def tune_data_socket(sock: socket.socket) -> None:
    """Low latency for small frames; the kernel autotunes buffers for big ones."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _connect_with_retry(host: str, port: int, until: float, what: str) -> socket.socket:
    """Connect, retrying refused attempts (the peer may not listen yet)."""
    loop = asyncio.get_running_loop()
    while True:
        sock = socket.socket(_family(host), socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (host, port))
            tune_data_socket(sock)
            return sock
        except (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError) as exc:
            sock.close()
            if time.monotonic() + _CONNECT_RETRY >= until:
                raise TransferTimeout(f"{what}: nobody accepted at {host}:{port} in time") from exc
            await asyncio.sleep(_CONNECT_RETRY)
        except OSError as exc:
            sock.close()
            raise PeerClosedError(f"{what}: cannot connect to {host}:{port}: {exc}") from exc
        except BaseException:
            sock.close()
            raise


@contextlib.asynccontextmanager
async def _closing_on_error(sock: socket.socket) -> AsyncIterator[socket.socket]:
    try:
        yield sock
    except BaseException:
        sock.close()
        raise


async def _within(until: float, what: str, aw: Awaitable[T]) -> T:
    async with deadline(max(until - time.monotonic(), 1e-3), lambda: what):
        return await aw


# --------------------------------------------------------------------- rank 0's table


class _RendezvousServer:
    """Collects every rank's PeerInfo and answers each with the full table."""

    def __init__(self, cfg: PipeConfig, sock: socket.socket) -> None:
        self.cfg = cfg
        self.sock = sock
        self.table: dict[int, tuple[PeerInfo, socket.socket]] = {}
        self.complete = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.complete.is_set():
            conn, _ = await loop.sock_accept(self.sock)
            conn.setblocking(False)
            task = asyncio.ensure_future(self._register(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _register(self, conn: socket.socket) -> None:
        what = "rendezvous server"
        try:
            await authenticate_acceptor(conn, self.cfg.token_bytes, what)
            msg = await recv_message(conn, what)
            info = _peer_from_message(msg, self.cfg.world_size, what)
        except ConfigError as exc:
            # An authenticated rank configured differently: tell it why.
            await _reject(conn, str(exc).removeprefix(f"{exc.field}: "), exc.field)
            return
        except (ProtocolError, AuthenticationError, PeerClosedError):
            conn.close()  # a stranger or a broken peer: drop it, keep serving
            return
        except BaseException:
            conn.close()  # cancelled because the server closes: don't leak it
            raise
        if info.rank in self.table:
            await _reject(conn, f"rank {info.rank} registered twice")
            return
        self.table[info.rank] = (info, conn)
        if len(self.table) == self.cfg.world_size:
            await self._answer_all()

    async def _answer_all(self) -> None:
        answer = {
            "peers": [
                asdict(info) for info, _ in sorted(self.table.values(), key=lambda x: x[0].rank)
            ]
        }
        for _, conn in self.table.values():
            try:
                await send_message(conn, answer, "rendezvous server")
            except PeerClosedError:
                pass
        self.complete.set()

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for _, conn in self.table.values():
            conn.close()
        self.sock.close()


async def _reject(conn: socket.socket, reason: str, field: str = "rank") -> None:
    try:
        with contextlib.suppress(PeerClosedError):
            await send_message(conn, {"error": reason, "field": field}, "rendezvous server")
    finally:
        conn.close()


def _peer_from_message(msg: dict[str, Any], world_size: int, what: str) -> PeerInfo:
    try:
        info = PeerInfo(
            rank=int(msg["rank"]),
            address=str(msg["address"]),
            port=int(msg["port"]),
            host_id=str(msg["host_id"]),
            pid=int(msg["pid"]),
            device=str(msg["device"]),
            transport=str(msg["transport"]),
        )
        peer_world = int(msg.get("world_size", world_size))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"{what}: malformed peer registration") from exc
    if peer_world != world_size:
        raise ConfigError(
            "world_size", f"a rank registered with world_size={peer_world}, expected {world_size}"
        )
    if not 0 <= info.rank < world_size or not 0 < info.port < 65536:
        raise ProtocolError(f"{what}: peer registration out of range: {info}")
    return info


# --------------------------------------------------------------------- the public step


async def rendezvous(cfg: PipeConfig) -> tuple[Link, Link]:
    """Meet every rank and return this rank's ``(send_link, recv_link)``.

    Bounded by ``cfg.connect_timeout``; on failure nothing is left open.
    """
    until = time.monotonic() + cfg.connect_timeout
    me = f"rank {cfg.rank}"
    server: _RendezvousServer | None = None
    server_task: asyncio.Task[None] | None = None
    listener: socket.socket | None = None
    send_sock: socket.socket | None = None
    recv_sock: socket.socket | None = None
    try:
        if cfg.rank == 0:
            server = _RendezvousServer(
                cfg, _listener(cfg.host, cfg.port, max(cfg.world_size * 2, 16))
            )
            server_task = asyncio.ensure_future(server.serve())
        what = f"{me}: rendezvous with {cfg.host}:{cfg.port}"
        reg = await _within(until, what, _connect_with_retry(cfg.host, cfg.port, until, what))
        async with _closing_on_error(reg):
            await _within(until, what, authenticate_connector(reg, cfg.token_bytes, what))
            bind = cfg.bind_host or (cfg.host if cfg.rank == 0 else reg.getsockname()[0])
            listener = _listener(bind, 0, 4)
            local = PeerInfo(
                rank=cfg.rank,
                address=bind,
                port=int(listener.getsockname()[1]),
                host_id=host_identity(),
                pid=os.getpid(),
                device=cfg.device,
                transport=cfg.transport,
            )
            await send_message(reg, {**asdict(local), "world_size": cfg.world_size}, what)
            answer = await _within(
                until, f"{what} (waiting for all {cfg.world_size} ranks)", recv_message(reg, what)
            )
        reg.close()
        if "error" in answer:
            raise ConfigError(str(answer.get("field", "rank")), f"{what}: {answer['error']}")
        peers = {
            p.rank: p
            for p in (_peer_from_message(m, cfg.world_size, what) for m in answer.get("peers", []))
        }
        if sorted(peers) != list(range(cfg.world_size)):
            raise ProtocolError(f"{what}: incomplete peer table {sorted(peers)}")
        if server is not None and server_task is not None:
            server_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server_task
            server.close()
            server = None
        nxt, prv = peers[cfg.next_rank], peers[cfg.prev_rank]
        send_sock, recv_sock = await _both_sockets(
            _within(until, f"{me}: connecting to rank {nxt.rank}", _dial(cfg, local, nxt, until)),
            _within(until, f"{me}: waiting for rank {prv.rank}", _accept_from(cfg, listener, prv)),
        )
        return (
            Link(cfg, send_sock, "send", local, nxt),
            Link(cfg, recv_sock, "recv", local, prv),
        )
    except BaseException:
        for s in (send_sock, recv_sock):
            if s is not None:
                s.close()
        raise
    finally:
        if listener is not None:
            listener.close()
        if server_task is not None and not server_task.done():
            server_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await server_task
        if server is not None:
            server.close()


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
    sock = await _connect_with_retry(peer.address, peer.port, until, what)
    async with _closing_on_error(sock):
        await authenticate_connector(sock, cfg.token_bytes, what)
        await send_message(sock, {"rank": cfg.rank, "pid": local.pid}, what)
        reply = await recv_message(sock, what)
        if reply.get("ok") is not True:
            raise ConfigError("rank", f"{what}: refused: {reply.get('error', 'no reason')}")
    return sock


async def _accept_from(cfg: PipeConfig, listener: socket.socket, peer: PeerInfo) -> socket.socket:
    """Accept until the expected predecessor proves itself; drop anyone else.

    Each caller is vetted in its own task, so a stranger that connects and
    then says nothing cannot keep the real predecessor waiting in the backlog.
    """
    loop = asyncio.get_running_loop()
    what = f"rank {cfg.rank} <- rank {peer.rank}"
    won: asyncio.Future[socket.socket] = loop.create_future()
    vetting: set[asyncio.Task[None]] = set()

    async def vet(conn: socket.socket) -> None:
        try:
            await authenticate_acceptor(conn, cfg.token_bytes, what)
            hello = await recv_message(conn, what)
            if hello.get("rank") != peer.rank or hello.get("pid") != peer.pid or won.done():
                await send_message(conn, {"ok": False, "error": f"expected rank {peer.rank}"}, what)
                conn.close()
                return
            won.set_result(conn)  # claimed synchronously: there is one winner
        except (ProtocolError, AuthenticationError, PeerClosedError):
            conn.close()
        except BaseException:
            conn.close()
            raise

    async def accept_all() -> None:
        while True:
            conn, _ = await loop.sock_accept(listener)
            conn.setblocking(False)
            tune_data_socket(conn)
            task = asyncio.ensure_future(vet(conn))
            vetting.add(task)
            task.add_done_callback(vetting.discard)

    acceptor = asyncio.ensure_future(accept_all())
    try:
        try:
            waits: set[asyncio.Future[Any]] = {won, acceptor}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not won.done():
                acceptor.result()  # accepting failed: raise why
        finally:
            acceptor.cancel()
            for task in list(vetting):
                task.cancel()
            await asyncio.gather(acceptor, *vetting, return_exceptions=True)
        conn = won.result()
        await send_message(conn, {"ok": True}, what)
        return conn
    except BaseException:
        if won.done() and not won.cancelled():
            won.result().close()
        raise
