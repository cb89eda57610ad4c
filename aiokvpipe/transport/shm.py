"""CPU tensors between two processes on one host, through a shared-memory ring.

Loopback TCP copies every byte twice through the kernel and moves ~4 GB/s;
a shared-memory ring costs one ``memcpy`` on each side, and the two sides
copy in parallel. The ring is :class:`~aiokvpipe.shm.ShmRingBuffer` with one
reader, driven through :class:`~aiokvpipe.shm.ShmRingBufferIO`, so waiting
(spin, then park on a doorbell fd), memory fences and writer liveness are
the ring's, not a second scheme.

Framing: a message starts at a chunk boundary. Its first chunk holds the
136-byte wire header (in a 256-byte slot) and then up to ``piece`` payload
bytes; later chunks continue the payload, ``piece`` bytes each. A CLOSE
header in a chunk ends the stream, ordered after every message. The ring is
small on purpose (at most 4 x 2 MiB, see ``_shm_setup.ring_geometry``): it
stays in the last-level cache, so the reader copies out of cache what the
writer has just copied in.

Modules: ``_shm_setup`` (geometry, the handshake), ``_shm_send`` (the
sending channel), ``_shm_recv`` (the receiving channel); this one opens them.

Why it is built this way:

* The sender, the ring's only writer, creates the ring and sends its handle
  over the link socket; it writes nothing until the receiver confirms it
  attached (a reader that attaches while chunks are being published could
  start mid-stream). The receiver removes the name as soon as it has
  mapped the ring (the sender unlinks it too when the confirmation
  arrives, and on close if it never does), so after set-up ``/dev/shm``
  holds nothing that a killed or wedged process could leak.
* ``done`` resolves once the payload is copied into the ring: from then on
  the caller's tensor is free. The Pipe's byte window bounds what is
  accepted but not yet copied; payloads larger than the ring stream through
  it piece by piece.
* The receiver copies each payload once, out of the ring into a tensor of
  its own (warm blocks from :class:`~aiokvpipe.bufpool.RecvBufferPool`):
  handing out views of the ring would hold chunks hostage to however long
  the consumer keeps a tensor, stalling the sender.
* Peer death: each side watches the link socket with ``loop.add_reader``
  (the kernel closes a dead process's socket at once); the receiver also has
  the ring's writer liveness (a pidfd while parked). After EOF the receiver
  still delivers everything already published, then raises PeerClosedError.
"""

from __future__ import annotations

import contextlib

from ..errors import AiokvpipeError, ConfigError
from ..shm.io import ShmRingBufferIO
from ..shm.ring import ShmRingBuffer
from ._shm_recv import ShmRecvChannel
from ._shm_send import ShmSendChannel
from ._shm_setup import HEADER_SLOT, decode_handle, recv_control, ring_geometry, send_control
from .base import Link, RecvChannel, SendChannel, Transport

__all__ = ["ShmRecvChannel", "ShmSendChannel", "ShmTransport"]


class ShmTransport(Transport):
    name = "shm"

    @classmethod
    async def open_sender(cls, link: Link) -> SendChannel:
        """Create the ring now; the handshake runs in the channel's task.

        Opening must not wait for the peer: every rank opens its sender
        before its receiver, so waiting here would deadlock the ring.
        """
        piece, chunks = ring_geometry(link.config.buffer_bytes)
        try:
            ring = ShmRingBuffer(1, piece + HEADER_SLOT, chunks)
        except OSError as exc:
            raise ConfigError(
                "transport",
                f"{link.describe}: cannot create a {chunks} x {piece} byte shared-memory ring "
                f"({exc}); use transport='tcp' or a smaller buffer_bytes",
            ) from exc
        try:
            io = ShmRingBufferIO(ring, -1, owns_buffer=True)
            return ShmSendChannel(link, io, piece)
        except BaseException:
            ring.close()
            raise

    @classmethod
    async def open_receiver(cls, link: Link) -> RecvChannel:
        """Attach the ring the sender announces and confirm (or say why not)."""
        what = link.describe
        message = await recv_control(link.sock, what)
        try:
            handle = decode_handle(message.get("ring"), what)
            io = ShmRingBufferIO.attach(handle, 0, anticipate=link.config.anticipate)
            io.buffer.drop_name()  # its only reader is in: nothing left to leak
        except AiokvpipeError as exc:
            with contextlib.suppress(AiokvpipeError):
                await send_control(link.sock, {"attached": False, "error": str(exc)}, what)
            raise
        try:
            await send_control(link.sock, {"attached": True}, what)
            return ShmRecvChannel(link, io, handle.max_chunk_bytes - HEADER_SLOT)
        except BaseException:
            io.close()
            raise
