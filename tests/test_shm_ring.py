"""ShmRingBuffer: segment creation, attach checks, and who unlinks what."""

from __future__ import annotations

import gc
import os
import pickle
import stat
from dataclasses import replace

import pytest
import shm_workers

from aiokvpipe.errors import ConfigError, HandleError, PipeClosedError
from aiokvpipe.shm import ShmRingBuffer, ShmRingBufferIO
from aiokvpipe.shm.ring import LAYOUT_VERSION, NAME_PREFIX


@pytest.fixture(autouse=True, scope="module")
def _tracker() -> None:
    shm_workers.start_resource_tracker()


def _exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


def test_create_layout_and_mode() -> None:
    with ShmRingBuffer(3, 1000, 5) as ring:
        assert ring.name.startswith(NAME_PREFIX)
        assert ring.is_creator
        st = os.stat(f"/dev/shm/{ring.name}")
        assert stat.S_IMODE(st.st_mode) == 0o600, "segments are private to their user"
        assert st.st_size == ring.layout.total_bytes
        assert len(ring.chunks) == 5 and all(len(c) == 1000 for c in ring.chunks)
        assert len(ring.flags) == 5 * (1 + 3)
        assert not any(ring.flags), "every flag starts at 0"
        # Chunks are cache-line aligned and do not overlap flags or descriptors.
        assert ring.layout.chunk_stride % 64 == 0
        assert ring.layout.flags_offset >= ring.layout.header_bytes + 5 * 1000
    assert not _exists(ring.name)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((-1, 64, 4), "n_reader"),
        ((1, 0, 4), "max_chunk_bytes"),
        ((1, 64, 0), "max_chunks"),
        ((1, 64.0, 4), "max_chunk_bytes"),
    ],
)
def test_bad_sizes_name_the_field(args: tuple[int, int, int], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        ShmRingBuffer(*args)
    assert info.value.field == field


def test_attach_by_handle_and_by_name() -> None:
    with ShmRingBuffer(2, 128, 4) as ring:
        ring.chunks[1][:5] = b"hello"
        with ShmRingBuffer.attach(ring.export_handle()) as other:
            assert not other.is_creator
            assert bytes(other.chunks[1][:5]) == b"hello"
        with ShmRingBuffer(2, 128, 4, name=ring.name) as by_name:
            assert bytes(by_name.chunks[1][:5]) == b"hello"
        assert _exists(ring.name), "attachers never unlink"
        with pytest.raises(HandleError, match="n_reader, max_chunk_bytes, max_chunks"):
            ShmRingBuffer(2, 256, 4, name=ring.name)


def test_pickling_a_ring_attaches() -> None:
    with ShmRingBuffer(1, 64, 2) as ring:
        clone = pickle.loads(pickle.dumps(ring))
        assert clone.name == ring.name and not clone.is_creator
        clone.close()


def test_wrong_handles_are_refused() -> None:
    with ShmRingBuffer(2, 128, 4) as ring:
        good = ring.export_handle()
        with pytest.raises(HandleError, match="token"):
            ShmRingBuffer.attach(replace(good, token=b"\0" * 16))
        with pytest.raises(HandleError, match="n_reader"):
            ShmRingBuffer.attach(replace(good, n_reader=3))
        with pytest.raises(HandleError, match="layout version 99"):
            ShmRingBuffer.attach(replace(good, version=99))
        with pytest.raises(HandleError, match="malformed"):
            ShmRingBuffer.attach(replace(good, max_chunks=0))
        with pytest.raises(HandleError, match="ShmRingHandle"):
            ShmRingBuffer.attach(("not", "a handle"))  # type: ignore[arg-type]
    with pytest.raises(HandleError, match="no shared-memory ring"):
        ShmRingBuffer.attach(good)


def test_segment_of_another_layout_version_is_refused() -> None:
    with ShmRingBuffer(1, 64, 2) as ring:
        ring.header[8:12] = (LAYOUT_VERSION + 1).to_bytes(4, "little")
        with pytest.raises(HandleError, match=f"layout version {LAYOUT_VERSION + 1}"):
            ShmRingBuffer.attach(ring.export_handle())
        ring.header[0:8] = b"NOTARING"
        with pytest.raises(HandleError, match="not an aiokvpipe ring"):
            ShmRingBuffer.attach(ring.export_handle())


def test_segment_of_layout_version_1_is_refused() -> None:
    # Version 1 descriptors have no publish stamp: a version 2 endpoint would
    # misread their table, so a ring left by an older release is refused.
    assert LAYOUT_VERSION == 2
    with ShmRingBuffer(1, 64, 2) as ring:
        with pytest.raises(HandleError, match="layout version 1"):
            ShmRingBuffer.attach(replace(ring.export_handle(), version=1))  # an old handle
        ring.header[8:12] = (1).to_bytes(4, "little")
        with pytest.raises(HandleError, match="layout version 1"):
            ShmRingBuffer.attach(ring.export_handle())  # an old segment


def test_close_is_idempotent_and_final() -> None:
    ring = ShmRingBuffer(1, 64, 2)
    ring.close()
    ring.close()
    assert ring.closed and not _exists(ring.name)
    with pytest.raises(PipeClosedError):
        ring.export_handle()


def test_garbage_collected_creator_unlinks() -> None:
    ring = ShmRingBuffer(1, 64, 2)
    name = ring.name
    del ring
    gc.collect()
    assert not _exists(name)


def test_creator_unlinks_at_interpreter_exit() -> None:
    with shm_workers.child(shm_workers.create_and_exit) as (proc, conn):
        name = conn.recv()
        assert _exists(name)
        conn.send("exit")
        proc.join(20)
        assert proc.exitcode == 0
    assert not _exists(name), "the exiting creator must unlink its segment"


def test_reader_process_never_unlinks() -> None:
    # multiprocessing's resource tracker would unlink a segment a child merely
    # attached to; the ring bypasses it, so the segment outlives the reader.
    with ShmRingBuffer(1, 256, 2) as ring, ShmRingBufferIO(ring, -1) as writer:
        writer.enqueue_sync(b"ping")
        handle = writer.export_handle()
        with shm_workers.child(shm_workers.attach_and_exit, handle, 0) as (proc, conn):
            assert conn.recv() == b"ping"
            proc.join(20)
            assert proc.exitcode == 0
        assert _exists(ring.name)
    assert not _exists(ring.name)


def test_unlink_stale_after_creator_crash() -> None:
    with shm_workers.child(shm_workers.create_and_hang) as (proc, conn):
        handle = conn.recv()
        with pytest.raises(HandleError, match=r"creator \(pid \d+\) is running"):
            ShmRingBuffer.unlink_stale(handle.name)
        proc.kill()
    assert _exists(handle.name), "a killed creator leaves its segment behind"
    assert ShmRingBuffer.unlink_stale(handle.name) is True
    assert not _exists(handle.name)
    assert ShmRingBuffer.unlink_stale(handle.name) is False


def test_unlink_stale_refuses_foreign_names() -> None:
    with pytest.raises(HandleError, match="not an aiokvpipe ring name"):
        ShmRingBuffer.unlink_stale("some_other_segment")
    with ShmRingBuffer(1, 64, 2) as ring:
        with pytest.raises(HandleError, match="is running"):
            ShmRingBuffer.unlink_stale(ring.name)
        assert ShmRingBuffer.unlink_stale(ring.name, force=True)
        assert not _exists(ring.name)
