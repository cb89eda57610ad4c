"""Block payloads through shared memory, between two endpoints on one host.

Over TCP every payload byte is copied twice by the kernel. On one host a
shared-memory ring costs one copy on each side, and the two sides copy in
parallel, chunk by chunk: the sender copies the next block-run segments
into one chunk while the receiver copies the previous chunk out, straight
into its destination blocks. Only payload bytes take the ring; every
control message (REQUEST, REPLY, STATUS) stays on the connection's socket,
in the order :mod:`aiokvpipe.blocks.protocol` gives.

The rings are the project's :class:`~aiokvpipe.shm.io.ShmRingBufferIO` with
one reader (waiting, doorbells, fences and peer liveness are the ring's),
set up the way the shm transport sets up its own
(:mod:`aiokvpipe.transport._shm_setup`): the writer creates the ring and
sends its handle over the socket, the reader attaches, removes the name and
says so (the writer unlinks too once it hears back), so nothing stays in
``/dev/shm`` for a killed or wedged process to leak. A connection has at
most one ring per direction, opened by the requester with SETUP messages
before the first transfer that needs it::

    push (payloads requester -> owner, for writes):
        SETUP{open: push, ring: handle} ->  <- SETUP{attached: true | false, error}
    pull (payloads owner -> requester, for reads):
        SETUP{open: pull} ->  <- SETUP{ring: handle | null, error}  SETUP{attached} ->

A refusal (the owner's rule says no, or a ring cannot be created or
attached) leaves that connection on TCP for good: it is not an error.

Chunks: each starts with a header -- transfer number (counted per
direction by both sides), payload bytes in the chunk, stream offset -- and
then the bytes. The receiver checks every claim against its own cursor
before it copies: the transfer it is in, the offset it reached, a length
no larger than the chunk nor than what its blocks still take. Where bytes
land is decided by the receiver's own validated block list, as on TCP;
a chunk claiming anything else is a :class:`MalformedFrameError` and the
connection is dropped.

Cancellation and ended leases work as on TCP: the
:class:`~aiokvpipe.blocks.sgio.Segments` is redirected and the remaining
bytes still cross the ring (zeros out, scratch in), so both sides stay in
step and the connection stays usable.

Peer death: a writer waiting for a chunk that a dead or closed reader holds
gets ReaderGoneError; a reader waiting on a dead or closed writer gets
WriterGoneError; both are PeerClosedError, re-raised here with the
transfer's progress.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any, Literal

from ..errors import AiokvpipeError, MalformedFrameError, PeerClosedError
from ..loop_turns import yield_turn
from ..shm.io import ShmRingBufferIO
from ..shm.ring import ShmRingBuffer, ShmRingHandle
from ..transport._shm_setup import SLICE_SECONDS, decode_handle, encode_handle, ring_geometry
from ..transport.base import PeerInfo
from . import protocol
from .protocol import Kind
from .sgio import Segments

Direction = Literal["push", "pull"]

#: Default ring size per direction of a connection: 4 chunks of 2 MiB, small
#: enough to stay in the last-level cache (see ``_shm_setup.ring_geometry``).
RING_BYTES = 8 << 20
_HEAD = 64  # chunk header slot; payload bytes start cache-line aligned
_CHUNK = struct.Struct("<IIQ")  # transfer number, payload bytes in this chunk, stream offset
_MAX_CHUNK_BYTES = (64 << 20) + _HEAD  # geometry we agree to map for a peer
_MAX_CHUNKS = 64
_VERSION = 1  # of the SETUP bodies
_perf_counter = time.perf_counter


def may_share_memory(local: PeerInfo, peer: PeerInfo | None) -> bool:
    """Whether block payloads between ``local`` and ``peer`` may go through shared memory.

    The rule :func:`~aiokvpipe.transport.choose_transport` uses for shm: one
    host (the same boot id and namespaces), and neither end forced onto
    another transport (an endpoint configured with ``transport="tcp"`` keeps
    its block payloads on TCP too). The endpoints' devices do not matter:
    block payloads on this path are always host bytes (CPU regions, or GPU
    regions staged through pinned memory).
    """
    if peer is None or not local.host_id or local.host_id != peer.host_id:
        return False
    allowed = ("auto", "shm", "cuda_ipc")
    return local.transport in allowed and peer.transport in allowed


class RingPath:
    """The shared-memory payload rings of one block connection, one per direction.

    ``allowed``: this side's rule (:func:`may_share_memory` and the
    service's ``transport`` option) lets the connection use shared memory;
    it turns False for good when a set-up is refused. ``tx`` is the ring we
    write payloads into, ``rx`` the one we read them from (None: that
    direction is on TCP).
    """

    def __init__(self, allowed: bool, ring_bytes: int = RING_BYTES) -> None:
        self.allowed = allowed
        self.refusal = "" if allowed else "not on one host, or TCP forced"
        self._ring_bytes = ring_bytes
        self.tx: ShmRingBufferIO | None = None
        self.rx: ShmRingBufferIO | None = None
        self._tx_number = 0
        self._rx_number = 0
        self.closed = False

    # ------------------------------------------------------------ set-up
    def needs(self, op: str) -> Direction | None:
        """Requester: the direction to open before ``op`` ("read"/"write"), if any."""
        if not self.allowed:
            return None
        if op == "write":
            return "push" if self.tx is None else None
        return "pull" if self.rx is None else None

    def _create(self) -> ShmRingBufferIO | None:
        piece, chunks = ring_geometry(self._ring_bytes)
        try:
            ring = ShmRingBuffer(1, piece + _HEAD, chunks)
        except OSError as exc:  # /dev/shm full or missing: stay on TCP
            self._refuse(f"cannot create a {chunks} x {piece} byte ring: {exc}")
            return None
        try:
            return ShmRingBufferIO(ring, -1, owns_buffer=True)
        except BaseException:
            ring.close()
            raise

    def _attach(self, handle: ShmRingHandle, what: str) -> ShmRingBufferIO:
        if not (_HEAD < handle.max_chunk_bytes <= _MAX_CHUNK_BYTES) or not (
            1 <= handle.max_chunks <= _MAX_CHUNKS
        ):
            raise MalformedFrameError(
                f"{what}: a ring of {handle.max_chunks} x {handle.max_chunk_bytes} bytes is "
                f"outside what a block connection maps ({_MAX_CHUNKS} x {_MAX_CHUNK_BYTES})"
            )
        io = ShmRingBufferIO.attach(handle, 0, anticipate=False)
        io.buffer.drop_name()  # its only reader is in: nothing left to leak
        return io

    def _refuse(self, reason: str) -> None:
        self.allowed = False
        self.refusal = reason

    async def open(self, sock: socket.socket, direction: Direction, what: str) -> None:
        """Requester: open ``direction``'s ring with the owner, or settle on TCP for it."""
        if direction == "push":
            io = self._create()
            if io is None:
                return
            try:
                offer = encode_handle(io.export_handle())
                await _send(sock, {"open": "push", "ring": offer}, what)
                answer = await _expect(sock, what)
                if answer.get("attached") is True:
                    io.buffer.unlink()  # both mapped it: the name is only a liability now
                    self.tx, io = io, None
                else:
                    self._refuse(_reason(answer))
            finally:
                if io is not None:
                    io.close()  # the creator's close unlinks the name too
            return
        await _send(sock, {"open": "pull"}, what)
        answer = await _expect(sock, what)
        ring = answer.get("ring")
        if ring is None:
            self._refuse(_reason(answer))
            return
        handle = decode_handle(ring, what)  # malformed: ProtocolError, the connection drops
        try:
            self.rx = self._attach(handle, what)
        except AiokvpipeError as exc:
            self._refuse(str(exc))
            await _send(sock, {"attached": False, "error": str(exc)[:500]}, what)
            return
        await _send(sock, {"attached": True}, what)

    async def answer(self, sock: socket.socket, message: protocol.Message, what: str) -> None:
        """Owner: serve one SETUP from the requester (see the module doc)."""
        body = message.body
        direction = body.get("open")
        if body.get("shm") != _VERSION or direction not in ("push", "pull"):
            raise MalformedFrameError(f"{what}: malformed shared-memory set-up {body!r:.200}")
        if (self.rx if direction == "push" else self.tx) is not None:
            raise MalformedFrameError(f"{what}: a second {direction} ring on one connection")
        if direction == "push":
            if not self.allowed:
                await _send(sock, {"attached": False, "error": self.refusal}, what)
                return
            handle = decode_handle(body.get("ring"), what)
            try:
                self.rx = self._attach(handle, what)
            except AiokvpipeError as exc:
                if isinstance(exc, MalformedFrameError):
                    raise
                await _send(sock, {"attached": False, "error": str(exc)[:500]}, what)
                return
            await _send(sock, {"attached": True}, what)
            return
        io = self._create() if self.allowed else None
        if io is None:
            await _send(sock, {"ring": None, "error": self.refusal}, what)
            return
        try:
            await _send(sock, {"ring": encode_handle(io.export_handle())}, what)
            confirm = await _expect(sock, what)
            if confirm.get("attached") is True:
                io.buffer.unlink()
                self.tx, io = io, None
        finally:
            if io is not None:
                io.close()

    # ------------------------------------------------------------ payloads
    async def send(self, segs: Segments, what: str) -> None:
        """Copy every remaining byte of ``segs`` into the ``tx`` ring, chunk by chunk."""
        io = self.tx
        assert io is not None
        self._tx_number = number = (self._tx_number + 1) & 0xFFFFFFFF
        room = io.buffer.max_chunk_bytes - _HEAD
        slice_end = _perf_counter() + SLICE_SECONDS
        try:
            while segs.remaining:
                async with io.acquire_write() as buf:
                    offset = segs.moved
                    _CHUNK.pack_into(buf, 0, number, _fill(buf, segs, room), offset)
                if _perf_counter() >= slice_end:  # a long copy must not freeze the loop
                    await yield_turn()
                    slice_end = _perf_counter() + SLICE_SECONDS
        except PeerClosedError as exc:
            raise PeerClosedError(
                f"{what}: the peer stopped taking the shared-memory ring after "
                f"{segs.moved} of {segs.total} bytes: {exc}"
            ) from exc

    async def recv(self, segs: Segments, what: str) -> None:
        """Fill every remaining byte of ``segs`` from the ``rx`` ring, checking each chunk."""
        io = self.rx
        assert io is not None
        self._rx_number = number = (self._rx_number + 1) & 0xFFFFFFFF
        slice_end = _perf_counter() + SLICE_SECONDS
        try:
            while segs.remaining:
                async with io.acquire_read() as buf:
                    room = len(buf) - _HEAD
                    if room <= 0:
                        raise MalformedFrameError(f"{what}: a shared-memory chunk of {len(buf)} B")
                    claimed, n, offset = _CHUNK.unpack_from(buf, 0)
                    if claimed != number or offset != segs.moved or not 0 < n <= room:
                        raise _bad_chunk(what, segs, number, claimed, offset, n, room)
                    if n > segs.remaining:
                        raise _bad_chunk(what, segs, number, claimed, offset, n, room)
                    _drain(buf, n, segs)
                if _perf_counter() >= slice_end:
                    await yield_turn()
                    slice_end = _perf_counter() + SLICE_SECONDS
        except PeerClosedError as exc:
            raise PeerClosedError(
                f"{what}: the peer stopped filling the shared-memory ring after "
                f"{segs.moved} of {segs.total} bytes: {exc}"
            ) from exc

    # ------------------------------------------------------------ closing
    def close(self) -> None:
        """Close both rings (a peer waiting on one sees us gone at once); idempotent."""
        if self.closed:
            return
        self.closed = True
        for io in (self.tx, self.rx):
            if io is not None:
                io.close()
        self.tx = self.rx = None


def _fill(buf: memoryview, segs: Segments, limit: int) -> int:
    """Copy up to ``limit`` bytes of ``segs`` into ``buf`` after the header slot."""
    pos = _HEAD
    while limit and segs.remaining:
        moved = 0
        for view in segs.batch(limit):
            end = pos + len(view)
            buf[pos:end] = view
            moved += end - pos
            pos = end
        segs.advance(moved)
        limit -= moved
    return pos - _HEAD


def _drain(buf: memoryview, n: int, segs: Segments) -> None:
    """Copy ``n`` bytes after ``buf``'s header slot into the next views of ``segs``."""
    pos = _HEAD
    while n:
        moved = 0
        for view in segs.batch(n):
            end = pos + len(view)
            view[:] = buf[pos:end]
            moved += end - pos
            pos = end
        segs.advance(moved)
        n -= moved


def _bad_chunk(
    what: str, segs: Segments, number: int, claimed: int, offset: int, n: int, room: int
) -> MalformedFrameError:
    return MalformedFrameError(
        f"{what}: a shared-memory chunk claims transfer {claimed}, bytes {offset}..{offset + n}; "
        f"expected transfer {number} at byte {segs.moved} of {segs.total}, at most "
        f"{min(room, segs.remaining)} bytes"
    )


def _reason(answer: dict[str, Any]) -> str:
    error = answer.get("error")
    return error[:500] if isinstance(error, str) else "refused by the peer"


async def _send(sock: socket.socket, body: dict[str, Any], what: str) -> None:
    await protocol.send_message(sock, Kind.SETUP, {"shm": _VERSION, **body}, what)


async def _expect(sock: socket.socket, what: str) -> dict[str, Any]:
    message = await protocol.expect_message(sock, Kind.SETUP, what)
    if message.body.get("shm") != _VERSION:
        raise MalformedFrameError(f"{what}: shared-memory set-up of another version")
    return message.body
