"""The peer checks of a ring endpoint: is the other side still there, and if not, why.

A reader watches its writer (slot state, then pidfd or pid), the writer the
readers that hold the chunk it waits for; both build the errors a wait that
ran out, or a peer that went, raises. Only waits and failures run these, never
the per-message fast path. Mixed into :class:`~aiokvpipe.shm.endpoint.RingEndpoint`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import (
    PeerClosedError,
    PipeClosedError,
    ReaderGoneError,
    SlowReaderError,
    TransferTimeout,
    WriterGoneError,
)
from .doorbell import RUNG, Doorbell
from .fence import fence
from .layout import (
    IDENTITY,
    READER_SLOTS_OFF,
    SLOT_BYTES,
    SLOT_ID,
    SLOT_STATE,
    STATE_ATTACHED,
    STATE_CLOSED,
    STATE_NONE,
    WRITER_ID_OFF,
    WRITER_STATE_OFF,
)
from .liveness import ProcessIdentity, open_pidfd, pidfd_exited

if TYPE_CHECKING:
    from .ring import ShmRingBuffer

__all__ = ["RingPeerChecks"]


class RingPeerChecks:
    """Peer liveness checks and the errors they raise; mixed into RingEndpoint.

    RingEndpoint's ``__init__`` sets the state declared here (annotations
    only: no class attributes, so lookups stay on the instance).
    """

    buffer: ShmRingBuffer
    is_writer: bool
    reader_rank: int
    _hdr: memoryview  # the ring's header bytes
    _flags: memoryview  # per chunk: [written, read_0 .. read_{n-1}]
    _bell: Doorbell  # this endpoint's own doorbell
    _seq: int  # the next sequence this endpoint writes or reads
    _nchunks: int
    _nflag: int  # 1 + n_reader
    _writer: ProcessIdentity | None  # reader: its writer, once seen attached
    _pidfd: int | None  # reader: the writer's pidfd, once it has one

    def _released(self, exc: ValueError) -> PipeClosedError:
        """Translate "released memoryview" after the ring was closed under us."""
        if not self.buffer.closed:
            raise exc
        return PipeClosedError(f"ring {self.buffer.name!r} was closed")

    def _check_peer_or_poll(
        self, poll: Callable[[], int | None], reason: str | None, parking: bool = False
    ) -> int | None:
        """:meth:`_check_peer`, except that a chunk ``poll`` finds now wins.

        A writer may publish a last message and close (or die) between our
        ``poll()`` and the check: the check then sees it gone although a
        chunk is waiting. So on "gone", look once more, after a fence (the
        writer published before it closed, so whoever sees the close sees the
        chunk), and report the peer gone only if nothing is there.
        """
        try:
            self._check_peer(reason, parking)
        except PeerClosedError:
            fence()
            idx = poll()
            if idx is None:
                raise
            return idx
        return None

    def _check_peer(self, reason: str | None, parking: bool = False) -> None:
        """Raise when the peer this endpoint waits for can no longer act.

        A reader raises WriterGoneError when its writer closed or exited. The
        writer raises ReaderGoneError when a reader holding the chunk it waits
        for closed or exited (see :meth:`_check_readers`).

        ``reason`` is why the last park ended (None: first park of this call).
        With a pidfd the loop callback or poll already reported an exit; the
        slower pid check runs only when the safety timer, not a ring, woke us.
        ``parking``: a wait that watches the pidfd follows at once, so an exit
        not seen yet ends that wait: no syscall to look now (a sparse reader
        parks once per message, and on a VM every syscall costs microseconds).
        """
        if self.is_writer:
            self._check_readers(reason)
            return
        hdr = self._hdr
        state = hdr[WRITER_STATE_OFF]
        if state == STATE_CLOSED:
            raise WriterGoneError(f"the writer closed ring {self.buffer.name!r}")
        if state != STATE_ATTACHED:
            return
        writer = self._writer
        if writer is None:
            fence()
            writer = self._writer = ProcessIdentity(*IDENTITY.unpack_from(hdr, WRITER_ID_OFF))
            try:
                self._pidfd = open_pidfd(writer)
            except ProcessLookupError:
                raise self._writer_gone(writer) from None
        pidfd = self._pidfd
        if pidfd is not None:
            if self._bell.exited(pidfd) or (reason is None and not parking and pidfd_exited(pidfd)):
                raise self._writer_gone(writer)
        elif reason != RUNG and not writer.is_alive():
            raise self._writer_gone(writer)

    def _writer_gone(self, writer: ProcessIdentity) -> WriterGoneError:
        return WriterGoneError(f"the writer of ring {self.buffer.name!r} (pid {writer.pid}) exited")

    def _check_readers(self, reason: str | None) -> None:
        """Writer: raise ReaderGoneError if a reader holding the next chunk is gone.

        Such a chunk never frees up: without this, one crashed reader would
        stall the writer (claims wait without a deadline by default) and so
        every other reader. A reader that closes marks its slot closed and
        rings a parked writer, so that shows at once, on any wake-up; a
        reader that died is found by its pid, on the safety timer's
        rechecks only (never between a ring and the claim it allows: a ring
        means a reader is alive and moving).
        """
        fl, hdr = self._flags, self._hdr
        base = (self._seq % self._nchunks) * self._nflag
        check_pids = reason is not None and reason != RUNG
        gone = [
            r
            for r in range(self._nflag - 1)
            if not fl[base + 1 + r] and self._reader_gone(hdr, r, check_pids)
        ]
        if gone:
            # The reader set its read flag before it closed (or died): now that
            # we saw it gone, a fresh look at the flags tells "gone holding
            # the chunk" from "read it, then went".
            fence()
            if any(not fl[base + 1 + r] for r in gone):
                error = self._lagging_error(None)
                if isinstance(error, ReaderGoneError):  # else it re-attached meanwhile
                    raise error

    @staticmethod
    def _reader_gone(hdr: memoryview, rank: int, check_pid: bool) -> bool:
        slot = READER_SLOTS_OFF + SLOT_BYTES * rank
        state = hdr[slot + SLOT_STATE]
        if state == STATE_CLOSED:
            return True
        if state != STATE_ATTACHED or not check_pid:
            return False  # never attached (it may yet): only a timeout can tell
        return not ProcessIdentity(*IDENTITY.unpack_from(hdr, slot + SLOT_ID)).is_alive()

    def _timeout_error(
        self, timeout: float | None, ahead: int = 0
    ) -> TransferTimeout | PeerClosedError:
        """What a wait that ran out says; a writer's names the readers that
        hold chunk ``ahead`` chunks past the next one."""
        if not self.is_writer:
            return TransferTimeout(
                f"reader {self.reader_rank} of ring {self.buffer.name!r}: "
                f"no message within {timeout:g} s"
            )
        return self._lagging_error(timeout, ahead)

    def _lagging_error(
        self, timeout: float | None, ahead: int = 0
    ) -> SlowReaderError | ReaderGoneError:
        """Writer: why chunk ``ahead`` past the next one is not free, naming
        the readers that hold it. ReaderGoneError when one of them closed or
        exited (waiting longer cannot help), else SlowReaderError.
        ``timeout`` None: no deadline ran out (a reader was found gone)."""
        fl, hdr = self._flags, self._hdr
        seq = self._seq + ahead
        base = (seq % self._nchunks) * self._nflag
        lagging = [r for r in range(self._nflag - 1) if not fl[base + 1 + r]]
        notes = []
        gone: list[int] = []
        for r in lagging:
            slot = READER_SLOTS_OFF + SLOT_BYTES * r
            state = hdr[slot + SLOT_STATE]
            who = ProcessIdentity(*IDENTITY.unpack_from(hdr, slot + SLOT_ID))
            if state == STATE_NONE:
                notes.append(f"reader {r}: never attached")
            elif state == STATE_CLOSED:
                notes.append(f"reader {r}: closed (pid {who.pid})")
                gone.append(r)
            elif who.is_alive():
                notes.append(f"reader {r}: pid {who.pid}")
            else:
                notes.append(f"reader {r}: pid {who.pid} exited")
                gone.append(r)
        name, chunk = self.buffer.name, seq - self._nchunks
        detail = f"readers {lagging} have not consumed chunk #{chunk} ({'; '.join(notes)})"
        if gone:
            return ReaderGoneError(
                f"ring {name!r}: reader {gone[0]} is gone (closed or exited) without "
                f"consuming chunk #{chunk}, so the writer cannot go on; {detail}",
                gone[0],
                lagging,
            )
        within = "" if timeout is None else f" within {timeout:g} s"
        return SlowReaderError(f"ring {name!r}: no free chunk{within}; {detail}", lagging)
