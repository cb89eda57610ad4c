"""CPU tensors over a TCP socket, with no copies on either side.

Sending is callback-driven, the way asyncio's own transports write, but
without their copy: :meth:`TcpSendChannel.submit` tries ``sendmsg`` at once
with the header and a view of the tensor's memory as a gather list, and only
if the kernel buffer is full does it register a writer callback to go on.
Nothing awaits per message, so small messages cost one syscall.

Receiving works like a :class:`asyncio.BufferedProtocol`, driven by a
reader callback: headers (and small payloads that arrive with them) are read
into one reusable staging buffer, while large payloads are read straight into
the destination tensor's memory by ``recv_into``. Reading pauses when
``buffer_bytes`` of received tensors wait for ``recv``, so a slow consumer
pushes back on the sender through TCP.
"""

from __future__ import annotations

from ._tcp_recv import TcpRecvChannel
from ._tcp_send import TcpSendChannel
from .base import Link, RecvChannel, SendChannel, Transport

__all__ = ["TcpRecvChannel", "TcpSendChannel", "TcpTransport"]


class TcpTransport(Transport):
    name = "tcp"

    @classmethod
    async def open_sender(cls, link: Link) -> SendChannel:
        return TcpSendChannel(link)

    @classmethod
    async def open_receiver(cls, link: Link) -> RecvChannel:
        return TcpRecvChannel(link)
