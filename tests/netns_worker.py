"""An endpoint driven by JSON lines on stdin, for the two-namespace test.

In: ``{"op": "send", "to": address, "seq": n}`` (send a tensor and flush)
or ``{"op": "stats"}``. Out, one JSON line each: ``{"op": "address"}`` at
start, ``sent``/``error`` per send, ``got`` per message received, ``event``
per peer event, ``stats``. Exits when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from typing import Any

import torch

from aiokvpipe import Endpoint, EndpointConfig
from aiokvpipe.peers import PeerEvent

TOKEN = "netns-test-token-0123456789"


def emit(**fields: Any) -> None:
    print(json.dumps({**fields, "t": time.monotonic()}), flush=True)


async def main(args: argparse.Namespace) -> None:
    cfg = EndpointConfig(
        name=args.name,
        host=args.host,
        port=args.port,
        token=TOKEN,
        heartbeat_interval=0.2,
        peer_timeout=1.0,
        connect_timeout=3.0,
    )
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str | None] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line)
        loop.call_soon_threadsafe(commands.put_nowait, None)

    threading.Thread(target=read_stdin, daemon=True).start()
    async with await Endpoint.start(cfg) as ep:

        def on_event(event: PeerEvent) -> None:
            emit(op="event", kind=event.kind, address=event.address,
                 error=type(event.error).__name__, message=str(event.error))  # fmt: skip

        ep.on_peer_event(on_event)
        emit(op="address", address=ep.address)

        async def receive() -> None:
            while True:
                src, obj = await ep.recv()
                assert isinstance(obj, torch.Tensor)
                emit(op="got", src=src, seq=int(obj[0]))

        async def send(to: str, seq: int) -> None:
            try:
                await ep.send(to, torch.full((1024,), seq, dtype=torch.int64))
                await ep.flush(to)
                emit(op="sent", seq=seq)
            except Exception as exc:
                emit(op="error", seq=seq, error=type(exc).__name__, message=str(exc))

        tasks = {asyncio.ensure_future(receive())}
        while (line := await commands.get()) is not None:
            cmd = json.loads(line)
            if cmd["op"] == "send":
                task = asyncio.ensure_future(send(cmd["to"], cmd["seq"]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif cmd["op"] == "stats":
                emit(op="stats", peers={k: v.__dict__ for k, v in ep.stats().items()})
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(main(parser.parse_args()))
