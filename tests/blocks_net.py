"""Test-only link layer for the block tests, and the remote-controlled peer process.

:class:`BlockNode` plays the Endpoint's part for a :class:`BlockService`: a
listening socket, the token handshake in both directions (the project's own
``authenticate_*``), and a one-message hello naming the dialler, then the
socket is handed to the service (``accept``) or returned by ``dial``. It has
no liveness; tests call ``service.peer_lost`` where the Endpoint would.

:func:`peer_main` is a whole peer in a spawned process, driven over a
multiprocessing Connection: ``{"id", "cmd", ...}`` in, ``{"id", "ok" |
"error"}`` out, every command in its own task so a ``wait`` does not block a
``read``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import socket
import traceback
from multiprocessing.connection import Connection
from typing import Any

import torch

from aiokvpipe.blocks import BlockService, Lease
from aiokvpipe.errors import AiokvpipeError
from aiokvpipe.handshake import (
    authenticate_acceptor,
    authenticate_connector,
    recv_message,
    send_message,
)

TOKEN = b"blocks-test-token"
# Small vLLM-shaped layers: [2 (K, V), blocks, block_size, kv_heads, head_dim].
BLOCK_SHAPE = (4, 2, 8)


def make_layers(
    seed: int,
    layers: int,
    blocks: int,
    dtype: torch.dtype = torch.bfloat16,
    block_shape: tuple[int, ...] = BLOCK_SHAPE,
) -> list[torch.Tensor]:
    """Deterministic contents: any process can rebuild what another registered."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((2, blocks, *block_shape), generator=gen).to(dtype) for _ in range(layers)]


class BlockNode:
    """A BlockService reachable at ``address`` over authenticated TCP."""

    def __init__(self, token: bytes | None, **service_options: Any) -> None:
        self.token = token
        self.dials = 0
        self.service = BlockService(self.dial, **service_options)
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.setblocking(False)
        host, port = self._listener.getsockname()
        self.address = f"{host}:{port}"
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    @classmethod
    async def start(cls, token: bytes | None = TOKEN, **service_options: Any) -> BlockNode:
        return cls(token, **service_options)

    async def __aenter__(self) -> BlockNode:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def dial(self, address: str) -> tuple[socket.socket, str]:
        self.dials += 1
        host, port = address.rsplit(":", 1)
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await authenticate_connector(sock, self.token, f"dial {address}")
            await send_message(sock, {"peer": self.address}, f"dial {address}")
        except BaseException:
            sock.close()
            raise
        return sock, address

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            sock.setblocking(False)
            task = loop.create_task(self._admit(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _admit(self, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await authenticate_acceptor(sock, self.token, "accept")
            hello = await recv_message(sock, "accept")
        except Exception:
            sock.close()  # a peer that fails the handshake never reaches the service
            return
        except BaseException:
            sock.close()
            raise
        self.service.accept(sock, str(hello.get("peer")))

    async def aclose(self) -> None:
        self._accepting.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(self._accepting, *self._tasks, return_exceptions=True)
        self._listener.close()
        await self.service.aclose()


# ------------------------------------------------------------------ the peer process


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _outcome(exc: BaseException) -> dict[str, Any]:
    out: dict[str, Any] = {"error": type(exc).__name__, "message": str(exc)}
    for attr in ("argument", "values"):
        if hasattr(exc, attr):
            out[attr] = getattr(exc, attr)
    return out


async def _peer(conn: Connection) -> None:
    node = await BlockNode.start()
    leases: dict[str, Lease] = {}
    tasks: set[asyncio.Task[None]] = set()
    conn.send({"address": node.address, "pid": os.getpid()})

    async def run(cmd: dict[str, Any]) -> Any:
        kind = cmd["cmd"]
        svc = node.service
        if kind == "register":
            shape = tuple(cmd.get("block_shape", BLOCK_SHAPE))
            tensors = make_layers(cmd["seed"], cmd["layers"], cmd["blocks"], block_shape=shape)
            svc.register(cmd["name"], tensors, block_dim=1)
            return None
        if kind in ("expose", "expect"):
            grant = svc.expose if kind == "expose" else svc.expect
            lease = grant(
                cmd["request_id"], cmd["name"], cmd["blocks"], cmd["ttl"], cmd.get("layers")
            )
            leases[cmd["request_id"]] = lease
            return None
        if kind == "wait":
            await leases[cmd["request_id"]].wait()
            return None
        if kind == "state":
            lease = leases[cmd["request_id"]]
            return {"ended": lease.ended, "remaining": lease.remaining}
        if kind == "cancel":
            leases[cmd["request_id"]].cancel()
            return None
        if kind in ("read", "write"):
            op = svc.read if kind == "read" else svc.write
            first, second = (
                (cmd["remote"], cmd["local"]) if kind == "read" else (cmd["local"], cmd["remote"])
            )
            await op(cmd["owner"], cmd["request_id"], cmd["name"], first, second, cmd.get("layers"))
            return None
        if kind == "blocks":  # contents of some blocks, every layer
            region = svc.regions.get(cmd["name"])
            index = torch.tensor(cmd["blocks"], dtype=torch.long)
            return [t.index_select(1, index).clone() for t in region.tensors]
        raise ValueError(f"unknown command {kind!r}")

    async def handle(cmd: dict[str, Any]) -> None:
        try:
            reply: dict[str, Any] = {"ok": await run(cmd)}
        except Exception as exc:
            reply = _outcome(exc)
            if not isinstance(exc, AiokvpipeError):
                reply["traceback"] = traceback.format_exc()
        conn.send({"id": cmd["id"], **reply})

    try:
        while True:
            await _readable(conn.fileno())
            while conn.poll():
                cmd = conn.recv()
                if cmd["cmd"] == "exit":
                    return
                task = asyncio.get_running_loop().create_task(handle(cmd))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await node.aclose()


def peer_main(conn: Connection, loop_name: str) -> None:
    from aiokvpipe.bench.procs import run_loop

    torch.set_num_threads(1)
    try:
        run_loop(loop_name, lambda: _peer(conn))
    finally:
        with contextlib.suppress(OSError):
            conn.close()


class PeerClient:
    """The test's handle on a peer process: ``await peer.call("read", ...)``."""

    def __init__(self, conn: Connection, process: Any) -> None:
        self.conn = conn
        self.process = process
        if not conn.poll(60):
            raise RuntimeError("peer process did not start")
        hello = conn.recv()
        self.address: str = hello["address"]
        self.pid: int = hello["pid"]
        self._next = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._readable: asyncio.Task[None] | None = None

    async def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send a command; its reply (``{"ok": ...}`` or ``{"error": name, ...}``)."""
        self._next += 1
        ident = self._next
        self.conn.send({"id": ident, "cmd": cmd, **args})
        while ident not in self._replies:
            if self.conn.poll():
                reply = self.conn.recv()
                self._replies[reply["id"]] = reply
                continue
            # One reader on the fd however many calls wait (a second
            # add_reader would replace the first).
            if self._readable is None:
                self._readable = asyncio.get_running_loop().create_task(
                    _readable(self.conn.fileno())
                )
            try:
                await asyncio.shield(self._readable)
            finally:
                if self._readable is not None and self._readable.done():
                    self._readable = None
        return self._replies.pop(ident)

    @classmethod
    def spawn(cls, loop_name: str = "asyncio") -> PeerClient:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(target=peer_main, args=(child, loop_name), daemon=True)
        process.start()
        child.close()
        return cls(parent, process)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send({"id": 0, "cmd": "exit"})
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()

    async def ok(self, cmd: str, **args: Any) -> Any:
        reply = await self.call(cmd, **args)
        assert "error" not in reply, reply
        return reply["ok"]


# ------------------------------------------------------------------ scripted peers


def raw_reader_main(conn: Connection, owner: str, request_id: str, name: str, blocks: int) -> None:
    """A reader that asks for ``blocks`` blocks of a ``uint8[2, N, 32768]`` region,
    takes a few payload bytes, says "mid-read" and stops reading (the test kills it)."""
    from aiokvpipe.blocks import protocol
    from aiokvpipe.blocks.region import TensorLayout

    async def main() -> None:
        node_sock, _ = await _dial_raw(owner)
        layout = TensorLayout(torch.uint8, (2,), (32768,))
        ids = list(range(blocks))
        body, _ = protocol.request("read", request_id, name, [0], [layout], 2 * 32768 * blocks, ids)
        await protocol.send_message(node_sock, protocol.Kind.REQUEST, body, "raw", ids)
        reply = await protocol.expect_message(node_sock, protocol.Kind.REPLY, "raw")
        assert reply.body.get("ok") is True, reply.body
        await asyncio.get_running_loop().sock_recv(node_sock, 1000)
        conn.send("mid-read")
        await asyncio.sleep(60)  # nothing reads the socket any more

    from aiokvpipe.bench.procs import run_loop

    run_loop("asyncio", main)


async def _dial_raw(address: str) -> tuple[socket.socket, str]:
    sock = socket.socket()
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    host, port = address.rsplit(":", 1)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    await authenticate_connector(sock, TOKEN, "raw dial")
    await send_message(sock, {"peer": "raw-reader"}, "raw dial")
    return sock, address


def raw_owner_main(conn: Connection) -> None:
    """An owner that answers one read with the right size, sends half the payload,
    says "mid-read" and stops (the test kills it)."""
    from aiokvpipe.blocks import protocol

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        host, port = listener.getsockname()
        conn.send(f"{host}:{port}")
        sock, _ = await loop.sock_accept(listener)
        sock.setblocking(False)
        await authenticate_acceptor(sock, TOKEN, "raw owner")
        await recv_message(sock, "raw owner")
        message = await protocol.read_message(sock, "raw owner")
        assert message is not None
        request = protocol.parse_request(message, "raw owner")
        await protocol.send_message(
            sock, protocol.Kind.REPLY, protocol.reply_ok(request.nbytes), "raw owner"
        )
        await loop.sock_sendall(sock, b"\xab" * (request.nbytes // 2))
        conn.send("mid-read")
        await asyncio.sleep(60)

    from aiokvpipe.bench.procs import run_loop

    run_loop("asyncio", main)


async def message_from(conn: Connection) -> Any:
    """``conn.recv()`` without blocking the loop."""
    while not conn.poll():
        await _readable(conn.fileno())
    return conn.recv()
