"""A small disaggregating proxy in front of vLLM prefill and decode servers.

``POST /v1/completions`` on the proxy becomes two requests, the way vLLM's
NIXL proxies work:

1. to a prefill server (round robin): the same prompt with ``max_tokens=1``,
   ``stream=false`` and ``kv_transfer_params={"do_remote_decode": true}``;
   its response carries the ``kv_transfer_params`` that say where the KV is;
2. to a decode server (round robin): the original request plus those params,
   unchanged; its response (streamed or not) goes back to the client.

The proxy never sees KV bytes: the decode pulls them from the prefill
through aiokvpipe. Run standalone::

    python examples/vllm_disagg/proxy.py --port 8000 \\
        --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from collections.abc import Sequence
from typing import Any

import httpx
from aiohttp import web

__all__ = ["DisaggProxy"]


class DisaggProxy:
    """Routes completions through a prefill server, then a decode server."""

    def __init__(self, prefill: Sequence[str], decode: Sequence[str]) -> None:
        self._prefill = itertools.cycle(prefill)
        self._decode = itertools.cycle(decode)
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(300.0))
        self.app = web.Application()
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.on_cleanup.append(self._close)

    async def _close(self, _app: web.Application) -> None:
        await self._client.aclose()

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = await request.json()
        prefill_body = dict(body)
        prefill_body.update(
            max_tokens=1,
            stream=False,
            kv_transfer_params={"do_remote_decode": True},
        )
        prefill_body.pop("stream_options", None)
        resp = await self._client.post(f"{next(self._prefill)}/v1/completions", json=prefill_body)
        if resp.status_code != 200:
            return web.Response(status=resp.status_code, body=resp.content)
        decode_body = dict(body)
        decode_body["kv_transfer_params"] = resp.json().get("kv_transfer_params")
        url = f"{next(self._decode)}/v1/completions"
        if not body.get("stream"):
            resp = await self._client.post(url, json=decode_body)
            return web.Response(
                status=resp.status_code, body=resp.content, content_type="application/json"
            )
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        async with self._client.stream("POST", url, json=decode_body) as upstream:
            async for chunk in upstream.aiter_raw():
                await out.write(chunk)
        await out.write_eof()
        return out


async def serve(port: int, prefill: Sequence[str], decode: Sequence[str]) -> web.AppRunner:
    """Start the proxy on 127.0.0.1:``port``; returns the runner (``await runner.cleanup()``)."""
    runner = web.AppRunner(DisaggProxy(prefill, decode).app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--prefill", action="append", required=True, help="prefill base URL")
    parser.add_argument("--decode", action="append", required=True, help="decode base URL")
    args = parser.parse_args()

    async def run() -> None:
        runner = await serve(args.port, args.prefill, args.decode)
        print(json.dumps({"proxy": f"http://127.0.0.1:{args.port}"}), flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    asyncio.run(run())


if __name__ == "__main__":
    main()
