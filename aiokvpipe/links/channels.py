"""Opening a transport channel on one direction of a link.

The transport is a pure function of both ends' PeerInfo
(:func:`~aiokvpipe.transport.choose_transport`), so each end computes the
same choice without talking; set-up is bounded by ``connect_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from .._timeouts import deadline
from ..transport import RecvChannel, SendChannel, choose_transport, load_transport
from ..transport.base import Link, PeerInfo


async def open_sender(link: Link) -> tuple[str, SendChannel]:
    """``(transport name, channel)`` for the sending end; closes the socket on failure."""
    name = _choose(link, link.local, link.peer)
    async with _opening(link, name):
        return name, await load_transport(name).open_sender(link)


async def open_receiver(link: Link) -> tuple[str, RecvChannel]:
    """``(transport name, channel)`` for the receiving end; closes the socket on failure."""
    name = _choose(link, link.peer, link.local)
    async with _opening(link, name):
        return name, await load_transport(name).open_receiver(link)


def _choose(link: Link, sender: PeerInfo, receiver: PeerInfo) -> str:
    try:
        return choose_transport(sender, receiver)
    except BaseException:
        link.sock.close()
        raise


@contextlib.asynccontextmanager
async def _opening(link: Link, name: str) -> AsyncIterator[None]:
    """Bounded by ``connect_timeout``; the link's socket is closed on failure."""
    try:
        async with deadline(
            link.config.connect_timeout, lambda: f"{link.describe}: opening transport {name!r}"
        ):
            yield
    except BaseException:
        link.sock.close()
        raise


async def open_both(send_link: Link, recv_link: Link) -> tuple[str, SendChannel, str, RecvChannel]:
    """Both ends of a ring position: the sender first (it must not wait for
    its peer, or a ring of ranks would deadlock), then the receiver."""
    sender: SendChannel | None = None
    try:
        send_name, sender = await open_sender(send_link)
        recv_name, receiver = await open_receiver(recv_link)
    except BaseException:
        if sender is not None:
            await asyncio.shield(sender.aclose(graceful=False))
        send_link.sock.close()
        recv_link.sock.close()
        raise
    return send_name, sender, recv_name, receiver
