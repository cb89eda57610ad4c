"""Setting up the shm transport: ring geometry, the handshake on the link socket.

The sender (the ring's only writer) creates the ring, so the receiver needs
its handle: a name, sizes and the segment's random token. It travels over
the link's authenticated TCP socket as one control message (the JSON
framing of :mod:`aiokvpipe.handshake`, never pickle); the receiver maps
it, removes its name and answers with one more, saying it attached or why
it could not. Only then does the sender write. From the receiver's attach
on, nothing is left in ``/dev/shm`` for a killed or wedged process to leak
(a sender that never hears back unlinks the name when it closes), and both
mappings stay valid.
"""

from __future__ import annotations

import re
import socket
from typing import Any

from ..errors import AiokvpipeError, HandleError, PeerClosedError, ProtocolError
from ..handshake import recv_message, send_message
from ..shm.ring import LAYOUT_VERSION, NAME_PREFIX, ShmRingHandle
from ..wire import HEADER_SIZE

KiB, MiB = 1 << 10, 1 << 20

# Chunk geometry. Every chunk carries at most ``piece`` payload bytes (a power
# of two); the first chunk of a message holds the frame header in a slot of
# HEADER_SLOT bytes before its payload. So a message of up to ``piece`` bytes
# is exactly one chunk, payload bytes start 64-byte aligned, and the source
# offset of every later piece is a multiple of ``piece`` (page aligned).
HEADER_SLOT = 256
assert HEADER_SIZE <= HEADER_SLOT
# A small ring beats a big one: at 8 MiB it stays in the last-level cache, so
# the reader copies out of cache what the writer just copied in. Measured on
# the 2-core EPYC (32 MiB L3): 4 MiB tensors ~20 GB/s through 4 x 2 MiB, ~9
# GB/s through 16 x 4 MiB (every byte went to DRAM and back).
_MAX_REGION = 8 * MiB
_MIN_REGION = 1 * MiB
_MAX_PIECE = 2 * MiB  # per-chunk hand-off costs ~5-10 us: keep pieces >= ~50 us of copying
_MIN_PIECE = 64 * KiB
_CHUNKS = 4  # enough for both ends to copy in parallel (double buffering, plus slack)

# Most time spent copying between yields to the loop, as the tcp transport's
# callbacks: a 1 GiB payload must not stall the loop's other tasks.
SLICE_SECONDS = 0.5e-3
# 2: a chunk may carry several whole frames (see record_end); a version-1
# reader would take only the first, so the two refuse each other.
_VERSION = 2  # of the set-up messages below
# Frames packed into one chunk: each starts RECORD_ALIGN-aligned with its header
# slot; after the last, four zero bytes (where the next header's magic would
# be) end the chunk, unless less than a header slot is left.
RECORD_ALIGN = 64
END_MARK = b"\0\0\0\0"
_NAME = re.compile(re.escape(NAME_PREFIX) + r"[0-9a-f]{1,64}")


def ring_geometry(buffer_bytes: int) -> tuple[int, int]:
    """``(piece, chunks)`` for a pipe window of ``buffer_bytes``.

    The region is ``buffer_bytes`` clamped to [1 MiB, 8 MiB], split into
    (at least) 4 chunks of a power-of-two piece between 64 KiB and 2 MiB.
    """
    region = min(max(buffer_bytes, _MIN_REGION), _MAX_REGION)
    piece = 1 << max((region // _CHUNKS).bit_length() - 1, 0)
    piece = min(max(piece, _MIN_PIECE), _MAX_PIECE)
    return piece, max(_CHUNKS, region // piece)


def record_end(payload_end: int) -> int:
    """Where the record after one whose payload ends at ``payload_end`` starts."""
    return -(-payload_end // RECORD_ALIGN) * RECORD_ALIGN


def encode_handle(handle: ShmRingHandle) -> dict[str, Any]:
    return {
        "name": handle.name,
        "n_reader": handle.n_reader,
        "max_chunk_bytes": handle.max_chunk_bytes,
        "max_chunks": handle.max_chunks,
        "version": handle.version,
        "token": handle.token.hex(),
    }


def decode_handle(message: Any, what: str) -> ShmRingHandle:
    """The handle in ``message``, refusing anything but a plain ring name and ints."""
    try:
        name, token = message["name"], bytes.fromhex(message["token"])
        sizes = [message[k] for k in ("n_reader", "max_chunk_bytes", "max_chunks", "version")]
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"{what}: malformed ring handle ({exc!r})") from None
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ProtocolError(f"{what}: {name!r} is not an aiokvpipe ring name")
    if not all(type(v) is int and v >= 0 for v in sizes) or len(token) != 16:
        raise ProtocolError(f"{what}: malformed ring handle sizes or token")
    n_reader, chunk_bytes, chunks, version = sizes
    if version != LAYOUT_VERSION:
        raise HandleError(
            f"{what}: the sender's ring has layout version {version}, "
            f"this build speaks {LAYOUT_VERSION}"
        )
    if n_reader != 1:
        raise ProtocolError(f"{what}: a pipe ring has exactly one reader, not {n_reader}")
    if chunk_bytes <= HEADER_SLOT:
        raise ProtocolError(f"{what}: ring chunks of {chunk_bytes} bytes cannot hold a header")
    return ShmRingHandle(name, n_reader, chunk_bytes, chunks, version, token)


async def send_control(sock: socket.socket, payload: dict[str, Any], what: str) -> None:
    """One set-up message (the shared control framing, tagged with our version)."""
    await send_message(sock, {"shm": _VERSION, **payload}, f"{what} (shm set-up)")


async def recv_control(sock: socket.socket, what: str) -> dict[str, Any]:
    payload = await recv_message(sock, f"{what} (shm set-up)")
    if payload.get("shm") != _VERSION:
        raise ProtocolError(
            f"{what}: expected shm set-up version {_VERSION}, got {payload.get('shm')!r}"
        )
    return payload


def translate_error(exc: Exception, describe: str) -> Exception:
    """At the transport boundary: our errors pass; OS errors mean the link broke."""
    if isinstance(exc, AiokvpipeError) or not isinstance(exc, OSError):
        return exc
    error = PeerClosedError(f"{describe}: {exc}")
    error.__cause__ = exc
    return error
