"""Opening a transport channel on one direction of a link.

The transport is a pure function of both ends' PeerInfo
(:func:`~aiokvpipe.transport.choose_transport`), so each end computes the
same choice without talking; set-up is bounded by ``connect_timeout``.
"""

from __future__ import annotations

import asyncio

from .._timeouts import deadline
from ..transport import RecvChannel, SendChannel, choose_transport, load_transport
from ..transport.base import Link


async def open_sender(link: Link) -> tuple[str, SendChannel]:
    """``(transport name, channel)`` for the sending end; closes the socket on failure."""
    try:
        name = choose_transport(link.local, link.peer)
        async with deadline(
            link.config.connect_timeout, lambda: f"{link.describe}: opening transport {name!r}"
        ):
            return name, await load_transport(name).open_sender(link)
    except BaseException:
        link.sock.close()
        raise


async def open_receiver(link: Link) -> tuple[str, RecvChannel]:
    """``(transport name, channel)`` for the receiving end; closes the socket on failure."""
    try:
        name = choose_transport(link.peer, link.local)
        async with deadline(
            link.config.connect_timeout, lambda: f"{link.describe}: opening transport {name!r}"
        ):
            return name, await load_transport(name).open_receiver(link)
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
