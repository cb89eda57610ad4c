"""The chunk protocol shared by every ring endpoint.

Chunks are used strictly in sequence (chunk ``seq`` lives at index
``seq % max_chunks``; sequences start at 1, 0 marks a chunk never published),
so every reader sees every message in order.

Chunk protocol, per chunk flags ``[written, read_0 .. read_{n-1}]``:

* writer claims a chunk when it was never written or every reader has read
  it; it clears ``written``, fills the chunk and its descriptor, clears the
  read flags, **fences**, sets ``written``, **fences**, then rings every
  reader whose park word is odd (parked) and differs from the value it had
  when last rung (so one ring per park, however many chunks follow);
* a reader may read when ``written`` is set and its read flag is not; after
  a **fence** it reads the descriptor and bytes, **fences**, sets its read
  flag, **fences**, and rings the writer if the writer is parked.

Only the fences before reading a park word (store, then load) are real
barriers on x86; the others order what TSO already orders and are skipped
there (``ORDERING_FENCE_NEEDED`` in :mod:`aiokvpipe.shm.fence`).

Waiting for a chunk (spin, then park on the doorbell) is
:mod:`aiokvpipe.shm.waiting`'s, the peer checks (is the writer or a reader
gone, and the errors that say so) :mod:`aiokvpipe.shm.peers`'s; both are
mixed into :class:`RingEndpoint`.
"""

from __future__ import annotations

import struct
import time

from ..backoff import Backoff
from ..cadence import Cadence
from ..errors import HandleError, PipeClosedError, RingUsageError, SequenceError
from .doorbell import Doorbell, doorbell_address
from .fence import ORDERING_FENCE_NEEDED, fence
from .liveness import ProcessIdentity
from .peers import RingPeerChecks
from .ring import (
    DESC,
    DESC_BYTES,
    DESC_STAMP,
    IDENTITY,
    READER_SLOTS_OFF,
    SLOT_BYTES,
    SLOT_ID,
    SLOT_PARKED,
    SLOT_SPINNING,
    SLOT_STATE,
    STATE_ATTACHED,
    STATE_CLOSED,
    STATE_NONE,
    WRITER_ID_OFF,
    WRITER_PARKED_OFF,
    WRITER_STATE_OFF,
    ShmRingBuffer,
)
from .waiting import _WATCHED_MAX_PARK, TAKEN, RingWaiting, _sched_yield

__all__ = ["TAKEN", "RingEndpoint", "deadline_after"]

DESC_SIZE = DESC_BYTES  # stride of the descriptor table
unpack_desc = DESC.unpack_from
_DESC_FULL = struct.Struct(DESC.format + DESC_STAMP.format.lstrip("<"))
_pack_desc = _DESC_FULL.pack_into
_OFFSET_AND_STAMP = struct.Struct("<Q8xQ")  # from byte 16: offset in message, (kind), stamp
_unpack_offset_stamp = _OFFSET_AND_STAMP.unpack_from
_monotonic = time.monotonic
_monotonic_ns = time.monotonic_ns
_WRITER_PARK_WORD = WRITER_PARKED_OFF // 4
_ORDERING_FENCE = ORDERING_FENCE_NEEDED  # publish/observe fences (none on x86, see fence.py)


def deadline_after(timeout: float | None) -> float | None:
    """The monotonic deadline ``timeout`` seconds from now (None: no deadline)."""
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0 or None, got {timeout}")
    return _monotonic() + timeout


class RingEndpoint(RingWaiting, RingPeerChecks):
    """Role setup and chunk protocol; waiting (RingWaiting) and peer checks
    (RingPeerChecks) are mixed in. The public API is ShmRingBufferIO."""

    def __init__(
        self,
        buffer: ShmRingBuffer,
        reader_rank: int,
        *,
        backoff: Backoff | None = None,
        owns_buffer: bool = False,
        anticipate: bool = True,
    ) -> None:
        buffer._check_open()
        n = buffer.n_reader
        if reader_rank != -1 and not (isinstance(reader_rank, int) and 0 <= reader_rank < n):
            raise HandleError(
                f"reader_rank {reader_rank!r} is invalid for ring {buffer.name!r} "
                f"with {n} readers (use 0..{n - 1}, or -1 for the writer)"
            )
        self.buffer = buffer
        self.reader_rank = reader_rank
        self.is_writer = reader_rank == -1
        self._owns = owns_buffer
        self._closed = False
        self._busy = False
        self._idle = True  # open and not busy: the synchronous fast paths may run
        self._hdr = buffer.header
        self._words = buffer.header_words
        self._flags = buffer.flags
        self._desc = buffer.descriptors
        self._chunks = buffer.chunks
        self._nflag = 1 + n
        self._nchunks = buffer.max_chunks
        self._cap = buffer.max_chunk_bytes
        self._backoff = backoff or Backoff(
            spin_seconds=50e-6, initial_sleep=20e-3, max_sleep=_WATCHED_MAX_PARK
        )
        self._spin_base = self._backoff.spin_seconds
        self._spin_max = 8 * self._spin_base
        # Readers learn the writer's rhythm to be awake when a message is due.
        self._cadence = Cadence() if anticipate and reader_rank != -1 else None
        self._pidfd: int | None = None
        self._writer: ProcessIdentity | None = None
        name = buffer.name
        if self.is_writer:
            state = self._hdr[WRITER_STATE_OFF]
            if state != STATE_NONE:
                pid = IDENTITY.unpack_from(self._hdr, WRITER_ID_OFF)[0]
                raise HandleError(
                    f"ring {name!r} already has a writer (pid {pid}, "
                    f"{'closed' if state == STATE_CLOSED else 'attached'}); "
                    "a ring takes exactly one writer for its lifetime"
                )
            self._bell = Doorbell(doorbell_address(name, "w"))
            self._park_word = WRITER_PARKED_OFF // 4
            self._ones = b"\1" * n
            self._zeros = bytes(n)
            # per reader: rank, park word index, doorbell address, spinning-hint offset
            self._readers = [
                (
                    r,
                    (READER_SLOTS_OFF + SLOT_BYTES * r + SLOT_PARKED) // 4,
                    doorbell_address(name, f"r{r}"),
                    READER_SLOTS_OFF + SLOT_BYTES * r + SLOT_SPINNING,
                )
                for r in range(n)
            ]
            self._rung = [0] * n  # the park word each reader had when last rung
            self._seq = 1
            self._park_gen = self._words[self._park_word] & ~1
            self._announce(WRITER_ID_OFF, WRITER_STATE_OFF)
        else:
            slot = READER_SLOTS_OFF + SLOT_BYTES * reader_rank
            if self._hdr[slot + SLOT_STATE] == STATE_ATTACHED:
                other = ProcessIdentity(*IDENTITY.unpack_from(self._hdr, slot + SLOT_ID))
                if other.is_alive():
                    raise HandleError(
                        f"reader rank {reader_rank} of ring {name!r} is already attached "
                        f"(pid {other.pid})"
                    )
            self._bell = Doorbell(doorbell_address(name, f"r{reader_rank}"))
            self._park_word = (slot + SLOT_PARKED) // 4
            self._spin_flag = slot + SLOT_SPINNING
            self._hdr[self._spin_flag] = 0
            self._rflag = 1 + reader_rank
            self._writer_bell = doorbell_address(name, "w")
            self._rung_writer = 0
            self._seq = self._resume_position()
            self._park_gen = self._words[self._park_word] & ~1
            self._announce(slot + SLOT_ID, slot + SLOT_STATE)

    def _announce(self, id_off: int, state_off: int) -> None:
        me = ProcessIdentity.current()
        IDENTITY.pack_into(self._hdr, id_off, me.pid, me.start, me.namespace)
        fence()  # identity before state: whoever sees "attached" sees the pid
        self._hdr[state_off] = STATE_ATTACHED

    def _resume_position(self) -> int:
        """The first sequence this reader has not read (1 for a fresh ring).

        Unread chunks cannot be overwritten, so it is the oldest unread
        published chunk, or one past the newest chunk ever published.
        """
        fl, rflag, nflag = self._flags, self._rflag, self._nflag
        fence()
        unread: list[int] = []
        newest = 0
        for i in range(self._nchunks):
            seq = unpack_desc(self._desc, i * DESC_SIZE)[0]
            newest = max(newest, seq)
            if fl[i * nflag] and not fl[i * nflag + rflag]:
                unread.append(seq)
        return min(unread) if unread else newest + 1

    # -- state checks ----------------------------------------------------------

    def _enter(self, writer: bool) -> None:
        if self._closed or self.buffer.closed:
            raise PipeClosedError(f"ring endpoint on {self.buffer.name!r} is closed")
        if writer != self.is_writer:
            role = "writer" if self.is_writer else f"reader {self.reader_rank}"
            raise RingUsageError(f"the {role} endpoint cannot {'write' if writer else 'read'}")
        if self._busy:
            raise RingUsageError("another task is already using this ring endpoint")
        self._busy = True
        self._idle = False

    def _leave(self) -> None:
        self._busy = False
        self._idle = not self._closed

    # -- the chunk protocol (hot path: keep lean) ------------------------------

    def _try_claim(self) -> int | None:
        """Writer: the index of the next chunk if it is free (and mark it unwritten).

        Inlined in ``ShmRingBufferIO.enqueue``'s fast path: change both together.
        """
        idx = self._seq % self._nchunks
        fl = self._flags
        base = idx * self._nflag
        if fl[base] and fl[base + 1 : base + self._nflag] != self._ones:
            return None
        if _ORDERING_FENCE:
            fence()  # observe the read flags before overwriting what they guard
        fl[base] = 0
        return idx

    def _publish(
        self, idx: int, total: int, offset: int, kind: int, data: bytes | None = None
    ) -> None:
        """Writer: make claimed chunk ``idx`` visible (copying ``data`` into it first)."""
        if data is not None:
            self._chunks[idx][: len(data)] = data
        seq = self._seq
        _pack_desc(self._desc, idx * DESC_SIZE, seq, total, offset, kind, _monotonic_ns())
        fl = self._flags
        base = idx * self._nflag
        fl[base + 1 : base + self._nflag] = self._zeros
        if _ORDERING_FENCE:
            fence()  # bytes, descriptor and cleared read flags before "written"
        fl[base] = 1
        fence()  # "written" before reading park words (pairs with the reader's park)
        self._seq = seq + 1
        words, rung, hdr = self._words, self._rung, self._hdr
        spinning = 0
        for r, word, address, spin_flag in self._readers:
            w = words[word]
            if w & 1 and w != rung[r]:  # parked, and not yet rung during this park
                rung[r] = w
                self._bell.ring(address)
            spinning |= hdr[spin_flag]
        if spinning:
            # A reader is spinning for this message: if it shares this CPU
            # (schedulers pack light processes onto one vCPU), let it run now
            # rather than when this task next blocks (~20 us).
            _sched_yield()

    def _poll_readable(self) -> int | None:
        """Reader: the index of the next chunk if it is published and unread."""
        idx = self._seq % self._nchunks
        fl = self._flags
        base = idx * self._nflag
        if fl[base] and not fl[base + self._rflag]:
            if _ORDERING_FENCE:
                fence()  # observe "written" before the bytes it guards
            return idx
        return None

    def _consume(self, idx: int) -> None:
        cadence = self._cadence
        if cadence is not None:
            offset, stamp = _unpack_offset_stamp(self._desc, idx * DESC_SIZE + 16)
            if offset == 0:  # a message's first chunk: its publish time is an arrival
                cadence.arrived(stamp * 1e-9)
        fl = self._flags
        if _ORDERING_FENCE:
            fence()  # finish reading the bytes before giving the chunk back
        fl[idx * self._nflag + self._rflag] = 1
        fence()  # read flag before reading the park word (pairs with the writer's park)
        w = self._words[_WRITER_PARK_WORD]
        if w & 1 and w != self._rung_writer:  # parked, and not yet rung during this park
            self._rung_writer = w
            self._bell.ring(self._writer_bell)
        self._seq += 1

    def _descriptor(self, idx: int) -> tuple[int, int, int]:
        seq, total, offset, kind = unpack_desc(self._desc, idx * DESC_SIZE)
        if seq != self._seq:
            raise SequenceError(
                f"reader {self.reader_rank} of ring {self.buffer.name!r} expected chunk "
                f"#{self._seq}, found #{seq}"
            )
        return total, offset, kind
