"""Every exception aiokvpipe raises, in one flat module.

Backends translate OS, socket, CUDA and NCCL failures into these types at
their boundary (``raise X(...) from exc``) so callers only ever catch ours.
Two families matter most to callers:

* *closed* (:class:`PipeClosedError`): you closed it; using it again is a
  programming error.
* *broken* (:class:`PeerClosedError`, :class:`ProtocolError`, ...): the peer or
  the wire broke it; the original cause is chained as ``__cause__``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AiokvpipeError",
    "AuthenticationError",
    "BadMagicError",
    "BlockError",
    "BlockIdError",
    "BlockShapeError",
    "ConfigError",
    "CudaTransferError",
    "CudaUnavailableError",
    "FrameTooLargeError",
    "HandleError",
    "KVBufferError",
    "LeaseCancelledError",
    "LeaseCompletedError",
    "LeaseError",
    "LeaseExpiredError",
    "LeaseNotGrantedError",
    "MalformedFrameError",
    "PeerClosedError",
    "PeerUnreachableError",
    "PipeClosedError",
    "ProtocolError",
    "ReaderGoneError",
    "RegionError",
    "RingEmptyError",
    "RingUsageError",
    "RingViewError",
    "SequenceError",
    "SlowReaderError",
    "TransferTimeout",
    "UnknownRegionError",
    "UnsupportedTensorError",
    "UnsupportedVersionError",
    "WriterGoneError",
]


class AiokvpipeError(Exception):
    """Root of every error this library raises."""


class ConfigError(AiokvpipeError, ValueError):
    """A configuration value is invalid; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class PipeClosedError(AiokvpipeError):
    """The resource was closed by this process and cannot be used any more."""


class ProtocolError(AiokvpipeError):
    """Bytes from the peer do not form a valid frame (or a value we refuse)."""


class BadMagicError(ProtocolError):
    """A frame did not start with the aiokvpipe magic: not our protocol."""


class UnsupportedVersionError(ProtocolError):
    """The peer speaks a wire version this build does not understand."""


class MalformedFrameError(ProtocolError):
    """A frame header is internally inconsistent (dims, sizes, kind)."""


class SequenceError(ProtocolError):
    """A frame arrived out of sequence: the stream lost or repeated data."""


class FrameTooLargeError(ProtocolError):
    """A frame announces more payload bytes than ``max_frame_bytes`` allows."""

    def __init__(self, nbytes: int, limit: int, where: str = "") -> None:
        self.nbytes = nbytes
        self.limit = limit
        prefix = f"{where}: " if where else ""
        super().__init__(
            f"{prefix}frame of {nbytes} payload bytes exceeds max_frame_bytes={limit} "
            "(by default buffer_bytes + 256 MiB; set max_frame_bytes on both ends to allow more)"
        )


class UnsupportedTensorError(ProtocolError, TypeError):
    """The object cannot be sent (not a tensor, unsupported dtype, too many dims)."""


class PeerClosedError(AiokvpipeError, ConnectionError):
    """The peer went away: it closed the pipe, died, or the connection broke."""


class PeerUnreachableError(PeerClosedError):
    """No endpoint answered at a peer's address within ``connect_timeout``
    (nothing listens there, or the network does not reach it)."""


class WriterGoneError(PeerClosedError):
    """The writer of a shared-memory ring exited or closed it."""


class ReaderGoneError(PeerClosedError):
    """A ring writer cannot go on: a reader that still holds the chunk it needs
    closed its endpoint or its process exited, so the chunk will never free up.

    ``rank`` is the first such reader; ``lagging_readers`` are all the readers
    holding that chunk (as in :class:`SlowReaderError`), gone or merely slow.
    """

    def __init__(self, message: str, rank: int, lagging_readers: Sequence[int] = ()) -> None:
        self.rank = rank
        self.lagging_readers = tuple(lagging_readers) or (rank,)
        super().__init__(message)


class AuthenticationError(AiokvpipeError):
    """A connection could not prove (or verify) knowledge of the shared token."""


class TransferTimeout(AiokvpipeError, TimeoutError):
    """An operation waited longer than its timeout."""


class SlowReaderError(TransferTimeout):
    """A ring writer timed out because some readers stopped consuming."""

    def __init__(self, message: str, lagging_readers: Sequence[int]) -> None:
        self.lagging_readers = tuple(lagging_readers)
        super().__init__(message)


class HandleError(AiokvpipeError, ValueError):
    """A shared-memory handle does not match the segment it names."""


class CudaUnavailableError(AiokvpipeError, RuntimeError):
    """A CUDA transport was requested but CUDA, cupy or NCCL is not usable."""


class CudaTransferError(AiokvpipeError, RuntimeError):
    """CUDA or NCCL reported an error while moving a tensor."""


class RingEmptyError(AiokvpipeError):
    """``dequeue_nowait`` found no complete message waiting (the ring is
    fine: try again later, or ``await dequeue()``)."""


class RingUsageError(AiokvpipeError, RuntimeError):
    """A ring endpoint was used against its role (a reader writing, a writer
    reading) or by two tasks at once; both are programming errors."""


class RingViewError(RingUsageError, BufferError):
    """An ``acquire_read``/``acquire_write`` block ended while a view of its
    chunk (a slice, a numpy array, a tensor) was still alive. The chunk is then
    neither marked read nor published, so the writer cannot overwrite memory
    the caller still sees: release the views and acquire again."""


class KVBufferError(AiokvpipeError, ValueError):
    """A KVLookupBuffer call got an argument it cannot use (wrong type, shape,
    dtype or device); ``argument`` names the offending parameter so a caller
    can tell ``roi`` from ``value`` without parsing the message."""

    def __init__(self, argument: str, message: str) -> None:
        self.argument = argument
        super().__init__(f"{argument}: {message}")


# --------------------------------------------------------------- paged blocks


class BlockError(AiokvpipeError):
    """Root of the paged-block family: registration, block ids and leases."""


class RegionError(BlockError, ValueError):
    """``register`` got tensors it cannot serve (registered twice, block counts
    that differ, memory it cannot address); the message names the tensor."""


class UnknownRegionError(BlockError, LookupError):
    """No region of this name is registered (here, or on the owner)."""

    def __init__(self, name: str, where: str = "") -> None:
        self.name = name
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}no block region named {name!r} is registered")


class BlockIdError(BlockError, ValueError):
    """Block ids or layers a call cannot use (out of range, duplicated, lists
    of different lengths); ``argument`` names the parameter and ``values`` the
    offending entries, so a caller need not parse the message."""

    def __init__(self, argument: str, values: Sequence[int], message: str) -> None:
        self.argument = argument
        self.values = tuple(values)
        super().__init__(f"{argument}: {message}")


class BlockShapeError(BlockError, ValueError):
    """The two sides registered blocks of different dtype or shape for the
    same region, so a block of one cannot be a block of the other."""


class LeaseError(BlockError):
    """A transfer was refused (or a lease ended) because of what its lease grants."""


class LeaseNotGrantedError(LeaseError):
    """No lease grants this access: unknown request id, the wrong kind (read
    vs write), or blocks and layers outside those granted."""


class LeaseExpiredError(LeaseError, TransferTimeout):
    """The lease's ``ttl`` ran out before its transfer completed."""


class LeaseCompletedError(LeaseError):
    """The lease already completed; its blocks may have been reused."""


class LeaseCancelledError(LeaseError):
    """The owner cancelled the lease (or closed the endpoint) before it completed."""
