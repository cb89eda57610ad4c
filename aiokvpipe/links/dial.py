"""The dialling side of the link layer: connect, prove the token, say hello.

A hello is one control message ``{"purpose": ..., "peer": PeerInfo, ...}``
after the token handshake; the acceptor answers ``{"ok": true, ...}`` (with
its own PeerInfo where it has one to give) or ``{"ok": false, "error": ...}``.
A refusal that names a ``field`` is a configuration mismatch
(:class:`ConfigError`); any other is :class:`PeerClosedError`.
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError, PeerClosedError
from ..handshake import authenticate_connector, recv_message, send_message
from ..transport.base import PeerInfo
from .accept import peer_from_hello
from .net import closing_on_error, connect_with_retry, within


@dataclass
class Dialed:
    """An authenticated connection we opened, and what the acceptor answered."""

    sock: socket.socket
    reply: dict[str, Any] = field(repr=False)
    peer: PeerInfo | None = None  # the acceptor's PeerInfo, when it sent one


async def introduce(
    sock: socket.socket,
    *,
    purpose: str,
    local: PeerInfo,
    token: bytes | None,
    until: float,
    what: str,
    extra: dict[str, Any] | None = None,
) -> Dialed:
    """Prove the token on a connected socket, send our hello, read the answer.

    Closes ``sock`` on any failure. Bounded by the monotonic time ``until``.
    """
    async with closing_on_error(sock):
        await within(until, what, authenticate_connector(sock, token, what))
        hello = {**(extra or {}), "purpose": purpose, "peer": asdict(local)}
        await send_message(sock, hello, what)
        reply = await within(until, what, recv_message(sock, what))
        if reply.get("ok") is not True:
            reason = f"{what}: refused: {reply.get('error', 'no reason given')}"
            if "field" in reply:
                raise ConfigError(str(reply["field"]), reason)
            raise PeerClosedError(reason)
        peer = peer_from_hello(reply["peer"], what) if "peer" in reply else None
    return Dialed(sock, reply, peer)


async def dial(
    host: str,
    port: int,
    *,
    purpose: str,
    local: PeerInfo,
    token: bytes | None,
    until: float,
    what: str,
    extra: dict[str, Any] | None = None,
    retry_refused: bool = True,
) -> Dialed:
    """Connect to ``host:port`` (retrying refusals until ``until``, unless
    ``retry_refused`` is False) and :func:`introduce`."""
    sock = await connect_with_retry(host, port, until, what, retry_refused=retry_refused)
    return await introduce(
        sock, purpose=purpose, local=local, token=token, until=until, what=what, extra=extra
    )
