"""ShmRingBuffer: the shared-memory segment of a one-writer, N-reader ring.

Its byte layout (offsets, flags, descriptors) and the flag protocol over it are
described in :mod:`aiokvpipe.shm.layout`. The chunk protocol itself lives in
:mod:`aiokvpipe.shm.endpoint`.

Security: the segment is created mode 0600 under the creating user, and
:class:`~aiokvpipe.shm.io.ShmRingBufferIO` unpickles what it reads, so the
trust boundary is "processes of the same user on the same host".

Segments are opened with ``_posixshmem`` and mapped with ``mmap`` directly,
not through ``multiprocessing.shared_memory``, so Python's resource tracker
never adopts (and unlinks) a segment that another process created.
"""

from __future__ import annotations

import contextlib
import importlib
import mmap
import os
import secrets
import weakref
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, HandleError, PipeClosedError
from .layout import (
    _FIXED,
    CREATOR_OFF,
    DESC,
    DESC_BYTES,
    DESC_STAMP,
    DESC_STAMP_OFF,
    IDENTITY,
    LAYOUT_MAGIC,
    LAYOUT_VERSION,
    MAX_READERS,
    NAME_PREFIX,
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
    _Layout,
)
from .liveness import ProcessIdentity

__all__ = [
    "LAYOUT_VERSION",
    "DESC_BYTES",
    "DESC_STAMP",
    "DESC_STAMP_OFF",
    "NAME_PREFIX",
    "ShmRingBuffer",
    "ShmRingHandle",
    # the segment layout, defined in layout.py (endpoint.py, io.py and tests import it from here)
    "CREATOR_OFF",
    "DESC",
    "IDENTITY",
    "LAYOUT_MAGIC",
    "MAX_READERS",
    "READER_SLOTS_OFF",
    "SLOT_BYTES",
    "SLOT_ID",
    "SLOT_PARKED",
    "SLOT_SPINNING",
    "SLOT_STATE",
    "STATE_ATTACHED",
    "STATE_CLOSED",
    "STATE_NONE",
    "WRITER_ID_OFF",
    "WRITER_PARKED_OFF",
    "WRITER_STATE_OFF",
]


# POSIX shm_open/shm_unlink without multiprocessing's resource tracker (no stubs ship for it).
_posixshmem: Any = importlib.import_module("_posixshmem")


def _shm_path(name: str) -> str:
    return name if name.startswith("/") else "/" + name


@dataclass(frozen=True)
class ShmRingHandle:
    """What a reader needs to attach: small, picklable, sent over any channel.

    ``token`` is a random value written into the segment at creation, so a
    stale handle cannot attach to a different ring that reused the name.
    """

    name: str
    n_reader: int
    max_chunk_bytes: int
    max_chunks: int
    version: int
    token: bytes


class _Mapping:
    """Owns the mmap and every view of it, so teardown can release them in order.

    Kept apart from :class:`ShmRingBuffer` so ``weakref.finalize`` can hold it
    without keeping the ring alive.
    """

    def __init__(self, name: str, mm: mmap.mmap, unlink: bool) -> None:
        self.name = name
        self.mm = mm
        self.unlink = unlink
        self.views: list[memoryview] = []

    def view(self, start: int, stop: int, words: bool = False) -> memoryview:
        v = memoryview(self.mm)[start:stop]
        if words:
            v = v.cast("I")
        self.views.append(v)
        return v

    def release(self) -> None:
        for v in self.views:
            v.release()
        self.views.clear()
        # BufferError: a caller still holds a slice; the mapping then goes
        # with the last reference, but the name is unlinked regardless.
        with contextlib.suppress(BufferError):
            self.mm.close()
        if self.unlink:
            self.unlink = False
            with contextlib.suppress(FileNotFoundError):
                _posixshmem.shm_unlink(_shm_path(self.name))


class ShmRingBuffer:
    """A shared-memory segment laid out as a broadcast ring (see module doc).

    ``name=None`` creates a new segment (mode 0600, named ``aiokv_<random>``);
    a name attaches to an existing one, whose header must match the given
    sizes. The creator unlinks the segment on :meth:`close`, when garbage
    collected, and at interpreter exit; attachers only unmap it. A creator
    that crashed leaves its segment behind: :meth:`unlink_stale` removes it.
    """

    def __init__(
        self,
        n_reader: int,
        max_chunk_bytes: int,
        max_chunks: int,
        name: str | None = None,
    ) -> None:
        _validate(n_reader, max_chunk_bytes, max_chunks)
        layout = _Layout(n_reader, max_chunk_bytes, max_chunks)
        if name is None:
            token = secrets.token_bytes(16)
            self._setup(layout, _create(layout, token), token, is_creator=True)
        else:
            mapping = _open(name, layout, None)
            self._setup(layout, mapping, _FIXED.unpack_from(mapping.mm, 0)[5], is_creator=False)

    @classmethod
    def attach(cls, handle: ShmRingHandle) -> ShmRingBuffer:
        """Map the ring ``handle`` names; :class:`HandleError` if it does not match."""
        if not isinstance(handle, ShmRingHandle):
            raise HandleError(f"expected a ShmRingHandle, got {type(handle).__name__}")
        if handle.version != LAYOUT_VERSION:
            raise HandleError(
                f"handle for ring {handle.name!r} has layout version {handle.version}; "
                f"this build speaks version {LAYOUT_VERSION}"
            )
        try:
            _validate(handle.n_reader, handle.max_chunk_bytes, handle.max_chunks)
        except ConfigError as exc:
            raise HandleError(f"handle for ring {handle.name!r} is malformed: {exc}") from exc
        layout = _Layout(handle.n_reader, handle.max_chunk_bytes, handle.max_chunks)
        self = cls.__new__(cls)
        mapping = _open(handle.name, layout, handle.token)
        self._setup(layout, mapping, handle.token, is_creator=False)
        return self

    def _setup(self, layout: _Layout, mapping: _Mapping, token: bytes, is_creator: bool) -> None:
        self.layout = layout
        self.is_creator = is_creator
        self.name = mapping.name
        self._token = token
        self._mapping = mapping
        self._finalizer = weakref.finalize(self, _Mapping.release, mapping)
        n_flags = (1 + layout.n_reader) * layout.max_chunks
        self.header = mapping.view(0, layout.header_bytes)
        # The same header as native u32 words: park words are single aligned stores.
        self.header_words = mapping.view(0, layout.header_bytes, words=True)
        self.flags = mapping.view(layout.flags_offset, layout.flags_offset + n_flags)
        self.descriptors = mapping.view(
            layout.desc_offset, layout.desc_offset + DESC_BYTES * layout.max_chunks
        )
        first, stride = layout.header_bytes, layout.chunk_stride
        self.chunks = [
            mapping.view(first + i * stride, first + i * stride + layout.max_chunk_bytes)
            for i in range(layout.max_chunks)
        ]

    @property
    def n_reader(self) -> int:
        return self.layout.n_reader

    @property
    def max_chunk_bytes(self) -> int:
        return self.layout.max_chunk_bytes

    @property
    def max_chunks(self) -> int:
        return self.layout.max_chunks

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def export_handle(self) -> ShmRingHandle:
        """A picklable handle other processes pass to :meth:`attach`."""
        self._check_open()
        lay = self.layout
        return ShmRingHandle(
            self.name,
            lay.n_reader,
            lay.max_chunk_bytes,
            lay.max_chunks,
            LAYOUT_VERSION,
            self._token,
        )

    def __reduce__(self) -> tuple[object, tuple[ShmRingHandle]]:
        # Pickling a ring (as the seed did to broadcast it) attaches elsewhere.
        return (ShmRingBuffer.attach, (self.export_handle(),))

    def close(self) -> None:
        """Unmap; the creator also unlinks the name. Idempotent."""
        self._finalizer()

    def unlink(self) -> None:
        """Creator: remove the name now; every mapping stays valid. Idempotent.

        Once every peer has attached, the name is only a liability: a process
        killed by a signal can never remove it. Unlinking early leaves nothing
        in ``/dev/shm``; the memory lives until the last mapping goes.
        :meth:`close` then only unmaps. Attachers never unlink here (no-op);
        the last reader to attach may :meth:`drop_name`.
        """
        mapping = self._mapping
        if mapping.unlink:
            mapping.unlink = False
            with contextlib.suppress(FileNotFoundError):
                _posixshmem.shm_unlink(_shm_path(mapping.name))

    def drop_name(self) -> None:
        """Remove the name from ``/dev/shm`` now, whichever side mapped it.

        For a ring whose every reader has attached, the last one to attach
        calls this: from then on no process, killed at any moment, can leave
        the name behind (the creator may be wedged or killed before it reads
        the confirmation that would make it unlink). The header was checked
        against the handle's token when this mapping attached, so the name
        is this ring's. Idempotent; the creator's later unlink is a no-op.
        """
        mapping = self._mapping
        mapping.unlink = False
        with contextlib.suppress(FileNotFoundError):
            _posixshmem.shm_unlink(_shm_path(mapping.name))

    def __enter__(self) -> ShmRingBuffer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise PipeClosedError(f"ring {self.name!r} is closed")

    @staticmethod
    def unlink_stale(name: str, *, force: bool = False) -> bool:
        """Remove the segment a crashed creator left behind.

        Returns False when no such segment exists. Refuses (HandleError) names
        outside the ``aiokv_`` prefix, segments that are not aiokvpipe rings,
        and, unless ``force``, rings whose creator is still running.
        """
        bare = name.lstrip("/")
        if not bare.startswith(NAME_PREFIX):
            raise HandleError(f"refusing to unlink {name!r}: not an aiokvpipe ring name")
        try:
            fd = _posixshmem.shm_open(_shm_path(bare), os.O_RDONLY, 0)
        except FileNotFoundError:
            return False
        try:
            head = os.pread(fd, CREATOR_OFF + IDENTITY.size, 0)
        finally:
            os.close(fd)
        if head[:8] != LAYOUT_MAGIC:
            raise HandleError(f"refusing to unlink {name!r}: not an aiokvpipe ring")
        creator = ProcessIdentity(*IDENTITY.unpack_from(head, CREATOR_OFF))
        if not force and creator.is_alive():
            raise HandleError(
                f"refusing to unlink ring {name!r}: its creator (pid {creator.pid}) is running"
            )
        try:
            _posixshmem.shm_unlink(_shm_path(bare))
        except FileNotFoundError:
            return False
        return True


def _validate(n_reader: int, max_chunk_bytes: int, max_chunks: int) -> None:
    if not isinstance(n_reader, int) or not 0 <= n_reader <= MAX_READERS:
        raise ConfigError("n_reader", f"must be an int in [0, {MAX_READERS}], got {n_reader!r}")
    if not isinstance(max_chunk_bytes, int) or max_chunk_bytes < 1:
        raise ConfigError("max_chunk_bytes", f"must be a positive int, got {max_chunk_bytes!r}")
    if not isinstance(max_chunks, int) or max_chunks < 1:
        raise ConfigError("max_chunks", f"must be a positive int, got {max_chunks!r}")


def _create(layout: _Layout, token: bytes) -> _Mapping:
    for _ in range(16):
        name = NAME_PREFIX + secrets.token_hex(8)
        try:
            fd = _posixshmem.shm_open(_shm_path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 16 collisions of 64 random bits
        raise OSError("could not find a free shared-memory name")
    try:
        os.ftruncate(fd, layout.total_bytes)  # zero-filled: every flag starts at 0
        mm = mmap.mmap(fd, layout.total_bytes)
    except BaseException:
        os.close(fd)
        _posixshmem.shm_unlink(_shm_path(name))
        raise
    os.close(fd)
    _FIXED.pack_into(
        mm,
        0,
        LAYOUT_MAGIC,
        LAYOUT_VERSION,
        layout.n_reader,
        layout.max_chunk_bytes,
        layout.max_chunks,
        token,
    )
    me = ProcessIdentity.current()
    IDENTITY.pack_into(mm, CREATOR_OFF, me.pid, me.start, me.namespace)
    return _Mapping(name, mm, unlink=True)


def _open(name: str, layout: _Layout, token: bytes | None) -> _Mapping:
    bare = name.lstrip("/")
    try:
        fd = _posixshmem.shm_open(_shm_path(bare), os.O_RDWR, 0)
    except FileNotFoundError:
        raise HandleError(
            f"no shared-memory ring named {bare!r} (its creator closed it, or it never existed)"
        ) from None
    except OSError as exc:
        raise HandleError(f"cannot open ring {bare!r}: {exc}") from exc
    try:
        size = os.fstat(fd).st_size
        if size < CREATOR_OFF:
            raise HandleError(f"segment {bare!r} is too small ({size} bytes) to be a ring")
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    try:
        _check_header(bare, mm, size, layout, token)
    except BaseException:
        mm.close()
        raise
    return _Mapping(bare, mm, unlink=False)


def _check_header(
    name: str, mm: mmap.mmap, size: int, layout: _Layout, token: bytes | None
) -> None:
    magic, version, n_reader, chunk_bytes, chunks, seg_token = _FIXED.unpack_from(mm, 0)
    if magic != LAYOUT_MAGIC:
        raise HandleError(f"segment {name!r} is not an aiokvpipe ring (bad magic)")
    if version != LAYOUT_VERSION:
        raise HandleError(
            f"ring {name!r} has layout version {version}; this build speaks version "
            f"{LAYOUT_VERSION}"
        )
    found = (n_reader, chunk_bytes, chunks)
    wanted = (layout.n_reader, layout.max_chunk_bytes, layout.max_chunks)
    if found != wanted:
        raise HandleError(
            f"ring {name!r} has (n_reader, max_chunk_bytes, max_chunks)={found}, "
            f"the handle says {wanted}"
        )
    if token is not None and seg_token != token:
        raise HandleError(f"ring {name!r} is not the ring this handle was made for (token differs)")
    if size < layout.total_bytes:
        raise HandleError(
            f"segment {name!r} holds {size} bytes, the layout needs {layout.total_bytes}"
        )
