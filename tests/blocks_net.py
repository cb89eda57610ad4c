"""Test-only host for the block tests, and the remote-controlled peer process.

:class:`BlockNode` gives a :class:`BlockService` what an Endpoint gives it
(``serve`` / ``dial`` / ``on_peer_event`` over the project's link layer)
without the Endpoint's sessions and heartbeats, so the block tests do not
depend on them; ``lose`` plays the Endpoint declaring a peer dead.

:func:`peer_main` is a whole peer in a spawned process, driven over a
multiprocessing Connection: ``{"id", "cmd", ...}`` in, ``{"id", "ok" |
"error"}`` out, every command in its own task so a ``wait`` does not block a
``read``. The ``raw_*`` peers speak the block protocol by hand to stop
halfway through a transfer, deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import socket
import time
import traceback
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from typing import Any

import torch

from aiokvpipe.bench.procs import worker_context
from aiokvpipe.blocks import Lease
from aiokvpipe.blocks.wiring import attach
from aiokvpipe.errors import AiokvpipeError
from aiokvpipe.links import Dialed, Handler, Incoming, Listener, dial, host_identity
from aiokvpipe.peers import PeerEvent
from aiokvpipe.transport.base import PeerInfo

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


#: Test parameter -> the node's PeerInfo.transport: "shm" moves payloads through
#: shared memory (both ends on this host, transport "auto"), "tcp" over the socket.
PATHS = {"tcp": "tcp", "shm": "auto"}


def local_info(
    port: int, transport: str, host_id: str | None = None, device: str = "cpu"
) -> PeerInfo:
    """A node's PeerInfo; ``transport="auto"``: payloads through shm with peers on this host.
    ``host_id``: pretend to be on another host."""
    return PeerInfo(
        rank=-1,
        address="127.0.0.1",
        port=port,
        host_id=host_identity() if host_id is None else host_id,
        pid=os.getpid(),
        device=device,
        transport=transport,
        name=f"node-{port}",
        instance=secrets.token_hex(8),
    )


class BlockNode:
    """The link-layer side an Endpoint gives a BlockService, and nothing else.

    A :class:`~aiokvpipe.links.Listener` and :func:`~aiokvpipe.links.dial`
    with this node's PeerInfo (a fresh instance id), so block connections go
    through the project's one listener, handshake and hello; ``attach``
    wires the service exactly as it would to an Endpoint. No liveness:
    :meth:`lose` plays the Endpoint's peer event.
    """

    def __init__(
        self,
        token: bytes | None,
        link: str = "tcp",
        host_id: str | None = None,
        **service_options: Any,
    ) -> None:
        """``link``: the PeerInfo.transport this node announces ("auto": payloads
        through shm with peers on this host); ``host_id``: pretend to be on
        another host; ``service_options`` go to the service."""
        self.token = token
        self.dials = 0
        self._listener = Listener("127.0.0.1", 0, token=token, what="block node").start()
        self.local = local_info(self._listener.port, link, host_id)
        self.address = self.local.endpoint
        self.instance = self.local.instance
        self._callbacks: list[Callable[[Any], None]] = []
        self.service = attach(self, **service_options)

    @classmethod
    async def start(
        cls,
        token: bytes | None = TOKEN,
        link: str = "tcp",
        host_id: str | None = None,
        **service_options: Any,
    ) -> BlockNode:
        return cls(token, link, host_id, **service_options)

    async def __aenter__(self) -> BlockNode:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the LinkHost hooks -------------------------------------------------------
    def serve(self, purpose: str, handler: Handler) -> None:
        self._listener.serve(purpose, handler)

    async def dial(
        self, address: str, purpose: str, *, extra: Any = None, retry_refused: bool = True
    ) -> Dialed:
        self.dials += 1
        host, port = address.rsplit(":", 1)
        return await dial(
            host,
            int(port),
            purpose=purpose,
            local=self.local,
            token=self.token,
            until=time.monotonic() + 10,
            what=f"{self.address} -> {address} ({purpose})",
            extra=extra,
            retry_refused=retry_refused,
        )

    def on_peer_event(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)

    def lose(self, address: str, instance: str, error: BaseException) -> None:
        """What the Endpoint does when it declares ``instance`` dead or replaced."""
        event = PeerEvent(address, instance, "dead", error)
        for callback in list(self._callbacks):
            callback(event)

    async def aclose(self) -> None:
        await self.service.aclose()
        await self._listener.aclose()


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


async def _peer(conn: Connection, transport: str) -> None:
    node = await BlockNode.start(link=transport)
    leases: dict[str, Lease] = {}
    tasks: set[asyncio.Task[None]] = set()
    conn.send({"address": node.address, "pid": os.getpid(), "instance": node.instance})

    async def run(cmd: dict[str, Any]) -> Any:
        kind = cmd["cmd"]
        svc = node.service
        if kind == "register":
            shape = tuple(cmd.get("block_shape", BLOCK_SHAPE))
            tensors = make_layers(cmd["seed"], cmd["layers"], cmd["blocks"], block_shape=shape)
            if cmd.get("device"):  # a GPU region (the cuda tests)
                tensors = [t.to(cmd["device"]) for t in tensors]
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
        if kind == "payload_bytes":  # what moved over each path, in this process
            return dict(svc.payload_bytes)
        if kind == "blocks":  # contents of some blocks, every layer
            region = svc.regions.get(cmd["name"])
            index = torch.tensor(cmd["blocks"], dtype=torch.long)
            return [t.index_select(1, index.to(t.device)).cpu() for t in region.tensors]
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


def peer_main(conn: Connection, loop_name: str, transport: str = "tcp") -> None:
    from aiokvpipe.bench.procs import run_loop

    torch.set_num_threads(1)
    try:
        run_loop(loop_name, lambda: _peer(conn, transport))
    finally:
        with contextlib.suppress(OSError):
            conn.close()


class PeerClient:
    """The test's handle on a peer process: ``await peer.call("read", ...)``."""

    def __init__(self, conn: Connection, process: Any, transport: str = "tcp") -> None:
        self.conn = conn
        self.process = process
        self.transport = transport
        if not conn.poll(60):
            raise RuntimeError("peer process did not start")
        hello = conn.recv()
        self.address: str = hello["address"]
        self.pid: int = hello["pid"]
        self.instance: str = hello["instance"]
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
    def spawn(cls, loop_name: str = "asyncio", transport: str = "tcp") -> PeerClient:
        """A peer process whose node uses ``transport`` ("auto": shm on this host)."""
        ctx = worker_context()
        parent, child = ctx.Pipe()
        process = ctx.Process(target=peer_main, args=(child, loop_name, transport), daemon=True)
        process.start()
        child.close()
        return cls(parent, process, transport)

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


_names = itertools.count()


def unique(prefix: str) -> str:
    """A region or request name no other test in this process used."""
    return f"{prefix}-{next(_names)}"


@contextlib.asynccontextmanager
async def node_beside(peer: PeerClient) -> AsyncIterator[BlockNode]:
    """A node on ``peer``'s transport; on exit, no payload took the other path."""
    async with await BlockNode.start(link=peer.transport) as n:
        yield n
        other = "tcp" if peer.transport == "auto" else "shm"
        assert n.service.payload_bytes[other] == 0, n.service.payload_bytes


# ------------------------------------------------------------------ scripted peers


def raw_reader_main(
    conn: Connection, owner: str, request_id: str, name: str, blocks: int, transport: str = "tcp"
) -> None:
    """A reader that asks for ``blocks`` blocks of a ``uint8[2, N, 32768]`` region,
    takes a few payload bytes (over shm: one ring chunk), says "mid-read" and
    stops reading (the test kills it)."""
    from aiokvpipe.blocks import protocol
    from aiokvpipe.blocks.region import TensorLayout
    from aiokvpipe.blocks.shmpath import RingPath

    async def main() -> None:
        node_sock, _ = await _dial_raw(owner, transport)
        path = RingPath(transport == "auto")
        if path.allowed:
            await path.open(node_sock, "pull", "raw")
            assert path.rx is not None, path.refusal
        layout = TensorLayout(torch.uint8, (2,), (32768,))
        ids = list(range(blocks))
        body, _ = protocol.request("read", request_id, name, [0], [layout], 2 * 32768 * blocks, ids)
        await protocol.send_message(node_sock, protocol.Kind.REQUEST, body, "raw", ids)
        reply = await protocol.expect_message(node_sock, protocol.Kind.REPLY, "raw")
        assert reply.body.get("ok") is True, reply.body
        if path.rx is not None:
            async with path.rx.acquire_read():
                pass
        else:
            await asyncio.get_running_loop().sock_recv(node_sock, 1000)
        conn.send("mid-read")
        await asyncio.sleep(60)  # nothing reads the socket any more

    from aiokvpipe.bench.procs import run_loop

    run_loop("asyncio", main)


async def _dial_raw(address: str, transport: str = "tcp") -> tuple[socket.socket, str]:
    """An authenticated block connection that reads slowly (a small receive buffer)."""
    node = await BlockNode.start(link=transport)
    try:
        dialed = await node.dial(address, "blocks")
    finally:
        await node.aclose()
    dialed.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    return dialed.sock, address


def raw_owner_main(conn: Connection, transport: str = "tcp") -> None:
    """An owner that answers one read with the right size, sends half the payload
    (over shm if the reader sets up a ring), says "mid-read" and stops (the test
    kills it)."""
    from aiokvpipe.blocks import protocol
    from aiokvpipe.blocks.sgio import Segments
    from aiokvpipe.blocks.shmpath import RingPath

    async def main() -> None:
        taken: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
        listener = Listener("127.0.0.1", 0, token=TOKEN, what="raw owner").start()

        async def handler(incoming: Incoming) -> None:
            await incoming.accept(local_info(listener.port, transport))
            taken.set_result(incoming.sock)

        listener.serve("blocks", handler)
        conn.send(f"127.0.0.1:{listener.port}")
        sock = await taken
        sock.setblocking(False)
        path = RingPath(transport == "auto")
        message = await protocol.read_message(sock, "raw owner")
        assert message is not None
        if message.kind == protocol.Kind.SETUP:
            await path.answer(sock, message, "raw owner")
            message = await protocol.read_message(sock, "raw owner")
            assert message is not None
        request = protocol.parse_request(message, "raw owner")
        await protocol.send_message(
            sock, protocol.Kind.REPLY, protocol.reply_ok(request.nbytes), "raw owner"
        )
        half = b"\xab" * (request.nbytes // 2)
        if path.tx is not None:
            await path.send(Segments([memoryview(half)], receive=False), "raw owner")
        else:
            await asyncio.get_running_loop().sock_sendall(sock, half)
        conn.send("mid-read")
        await asyncio.sleep(60)

    from aiokvpipe.bench.procs import run_loop

    run_loop("asyncio", main)


async def message_from(conn: Connection) -> Any:
    """``conn.recv()`` without blocking the loop."""
    while not conn.poll():
        await _readable(conn.fileno())
    return conn.recv()
