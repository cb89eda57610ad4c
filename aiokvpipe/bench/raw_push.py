"""The layer-wise push on a bare TCP socket: what the machine gives before our code.

A same-run baseline for ``bench blocks`` on tcp. The sender ships the
request's bytes once whole (one ``sock_sendall`` of every layer, then waits
for a one-byte answer) and once layer by layer, each layer started after its
simulated compute and sent as a 64-byte header, the layer's bytes and a
64-byte answer back, in the order of the calls: the shape of a pipelined
block write, with no block lists, leases or scatter lists. Its ratio of
layer-wise to whole is the overhead the kernel and the scheduler put on a
layer-wise push here; the blocks' own ratio is read against it.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

HEADER = 64  # the size of a block write's REQUEST, roughly
ANSWER = 64
_CHUNK = 4 << 20


async def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    loop = asyncio.get_running_loop()
    got = 0
    while got < len(view):
        n = await loop.sock_recv_into(sock, view[got : got + _CHUNK])
        if not n:
            raise ConnectionError("raw push: peer closed")
        got += n


async def receive_rounds(sock: socket.socket, nbytes: int, layers: int, rounds: int) -> None:
    """The owner's side: per round, the whole request, then its layers one by one."""
    loop = asyncio.get_running_loop()
    dst = memoryview(bytearray(nbytes))
    header = memoryview(bytearray(HEADER))
    per_layer = nbytes // layers
    for _ in range(rounds):
        await _recv_exactly(sock, dst)
        await loop.sock_sendall(sock, b"k")
        for layer in range(layers):
            await _recv_exactly(sock, header)
            await _recv_exactly(sock, dst[layer * per_layer : (layer + 1) * per_layer])
            await loop.sock_sendall(sock, bytes(ANSWER))


async def send_rounds(
    sock: socket.socket, src: memoryview, layers: int, rounds: int, compute_ms: float
) -> dict[str, list[float]]:
    """The writer's side: ``{"whole": [...], "wise": [...]}`` seconds per round."""
    loop = asyncio.get_running_loop()
    per_layer = len(src) // layers
    answers = memoryview(bytearray(ANSWER * layers))

    async def whole() -> None:
        await loop.sock_sendall(sock, src[: per_layer * layers])
        await _recv_exactly(sock, answers[:1])

    async def one_layer(layer: int) -> None:
        await loop.sock_sendall(sock, bytes(HEADER))
        await loop.sock_sendall(sock, src[layer * per_layer : (layer + 1) * per_layer])

    return await timed_rounds(
        whole, one_layer, lambda: _recv_exactly(sock, answers), layers, rounds, compute_ms
    )


async def timed_rounds(
    whole: Callable[[], Awaitable[None]],
    one_layer: Callable[[int], Awaitable[None]],
    answers: Callable[[], Awaitable[None]],
    layers: int,
    rounds: int,
    compute_ms: float,
) -> dict[str, list[float]]:
    """Per round: ``whole()`` (the request at once, answered), then each layer
    after its simulated compute, in call order, while ``answers()`` collects
    the layers' answers. ``{"whole": [...], "wise": [...]}`` seconds per round.
    """
    turn = asyncio.Lock()  # layers go out in call order, like a write pipe's

    async def in_turn(layer: int) -> None:
        async with turn:
            await one_layer(layer)

    samples: dict[str, list[float]] = {"whole": [], "wise": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        await whole()
        t1 = time.perf_counter()
        reader = asyncio.ensure_future(answers())
        writes = []
        for layer in range(layers):
            await asyncio.sleep(compute_ms / 1e3)
            writes.append(asyncio.ensure_future(in_turn(layer)))
        await asyncio.gather(*writes, reader)
        t2 = time.perf_counter()
        samples["whole"].append(t1 - t0)
        samples["wise"].append(t2 - t1)
    return samples
