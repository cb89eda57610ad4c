"""The byte layout of a shared-memory ring segment: offsets, record formats, slot states.

Layout (all offsets fixed by ``n_reader``, ``max_chunk_bytes`` and
``max_chunks``, recorded in the header and checked by every attacher)::

    +--------------------------------------------------------------+ 0
    | header (page-rounded)                                        |
    |   magic, layout version, n_reader, chunk size, chunk count,  |
    |   random token, creator identity                             |
    |   writer slot: state, identity          (own cache line)     |
    |   writer park word (u32)                (own cache line)     |
    |   reader slot r: park word, state, identity (a line each)    |
    +--------------------------------------------------------------+ data_offset
    | chunk 0 | chunk 1 | ... | chunk max_chunks-1                 |
    |   each max_chunk_bytes, rounded up to 64 B                   |
    +--------------------------------------------------------------+ flags_offset
    | per chunk: [written, read_0 .. read_{n-1}]  (1 byte each)    |
    +--------------------------------------------------------------+ desc_offset
    | per chunk descriptor: seq, message length, offset, kind      |
    +--------------------------------------------------------------+

Flag protocol (as in vLLM's ring, whose idea this follows): only the writer
sets ``written`` and clears read flags; each reader only sets its own read
flag. The chunk protocol itself lives in :mod:`aiokvpipe.shm.endpoint`.

Everything here is a constant or pure arithmetic on the three sizes; the segment
itself is :mod:`aiokvpipe.shm.ring`, which re-exports these names.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

LAYOUT_MAGIC = b"AIOKVRNG"
LAYOUT_VERSION = 2  # 2: chunk descriptors carry the publish time
NAME_PREFIX = "aiokv_"
MAX_READERS = 4096

_FIXED = struct.Struct("<8sIIQQ16s")  # magic, version, n_reader, chunk bytes, chunks, token
IDENTITY = struct.Struct("<qQQ")  # pid, start time, pid namespace
DESC = struct.Struct("<QQQB7x")  # chunk seq, message length, offset in message, kind
# then the publish time (CLOCK_MONOTONIC ns), read by itself on the reader's hot path
DESC_STAMP = struct.Struct("<Q")
DESC_STAMP_OFF = DESC.size
DESC_BYTES = DESC.size + DESC_STAMP.size
CREATOR_OFF = 64
WRITER_STATE_OFF = 128
WRITER_ID_OFF = 136
WRITER_PARKED_OFF = 192  # u32 park word: odd while parked, a new odd value per park
READER_SLOTS_OFF = 256
SLOT_BYTES = 64
SLOT_PARKED = 0  # u32 park word, as the writer's
SLOT_STATE = 4
SLOT_ID = 8
SLOT_SPINNING = 32  # u8: 1 while the reader spins for a message it expects (a hint)

STATE_NONE = 0
STATE_ATTACHED = 1
STATE_CLOSED = 2

_CACHE_LINE = 64
_PAGE = 4096


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class _Layout:
    n_reader: int
    max_chunk_bytes: int
    max_chunks: int

    @property
    def header_bytes(self) -> int:
        return _round_up(READER_SLOTS_OFF + SLOT_BYTES * self.n_reader, _PAGE)

    @property
    def chunk_stride(self) -> int:
        return _round_up(self.max_chunk_bytes, _CACHE_LINE)

    @property
    def flags_offset(self) -> int:
        return self.header_bytes + self.chunk_stride * self.max_chunks

    @property
    def desc_offset(self) -> int:
        return _round_up(self.flags_offset + (1 + self.n_reader) * self.max_chunks, _CACHE_LINE)

    @property
    def total_bytes(self) -> int:
        return _round_up(self.desc_offset + DESC_BYTES * self.max_chunks, _PAGE)
