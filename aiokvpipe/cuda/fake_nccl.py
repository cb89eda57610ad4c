"""A fake ``cupy.cuda.nccl``: communicators that move bytes between CPU tensors.

Their sends and receives run as ops on :mod:`.fake_device` streams, in
NCCL's order; :class:`FakeNccl` has the knobs to hang, fail or hold them.
Import them from :mod:`aiokvpipe.cuda.testing`, which describes all the fakes.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .fake_device import FakeDevice, _Op


class FakeNcclError(RuntimeError):
    """What cupy's ``NcclError`` is to the real bindings."""


@dataclass
class _Group:
    ops: list[tuple[FakeComm, str, int, int, int, int]] = field(default_factory=list)
    joining: list[FakeComm] = field(default_factory=list)


class FakeComm:
    """A communicator that moves bytes between CPU tensors by address."""

    def __init__(self, nccl: FakeNccl, key: bytes, world_size: int, rank: int) -> None:
        self.nccl = nccl
        self.key = key
        self.world_size = world_size
        self.rank = rank
        self.aborted = False
        self.destroyed = False
        self.abort_calls = 0
        self.concurrent_aborts = 0  # an abort entered while another was running
        self._aborting = False
        self._abort_lock = threading.Lock()

    def send(self, ptr: int, count: int, dtype: int, peer: int, stream: int) -> None:
        with self.nccl.calling("send"):
            self._call("send", ptr, count, dtype, peer, stream)

    def recv(self, ptr: int, count: int, dtype: int, peer: int, stream: int) -> None:
        with self.nccl.calling("recv"):
            self._call("recv", ptr, count, dtype, peer, stream)

    def _call(self, kind: str, ptr: int, count: int, dtype: int, peer: int, stream: int) -> None:
        if self.aborted or self.destroyed:
            raise FakeNcclError("communicator was aborted")
        if dtype != self.nccl.NCCL_UINT8:
            raise FakeNcclError(f"unexpected NCCL datatype {dtype}")
        if not 0 <= peer < self.world_size:
            raise FakeNcclError(f"peer {peer} out of range")
        group = self.nccl.group
        if group is not None:
            group.ops.append((self, kind, ptr, count, peer, stream))
        else:
            self._enqueue(kind, ptr, count, peer, stream)

    def _enqueue(self, kind: str, ptr: int, count: int, peer: int, stream: int) -> None:
        nccl = self.nccl
        target = nccl.device.streams[stream]
        if kind == "send":
            box = nccl.mailbox(self.key, self.rank, peer)

            def send() -> None:
                if not self.aborted:
                    box.append(ctypes.string_at(ptr, count) if count else b"")

            target.enqueue(
                _Op("nccl_send", send, lambda: self.aborted or not nccl.hang), f"{count}B"
            )
        else:
            box = nccl.mailbox(self.key, peer, self.rank)

            def recv() -> None:
                if self.aborted:
                    return
                data = box.popleft()
                if len(data) != count:
                    raise FakeNcclError(f"recv of {count} bytes matched a send of {len(data)}")
                if count:
                    ctypes.memmove(ptr, data, count)

            target.enqueue(
                _Op("nccl_recv", recv, lambda: self.aborted or (bool(box) and not nccl.hang)),
                f"{count}B",
            )

    def check_async_error(self) -> None:
        with self.nccl.calling("check_async_error"):
            self.nccl.checks += 1
            if self.nccl.async_error is not None:
                raise self.nccl.async_error

    def abort(self) -> None:
        """Like cupy's: not atomic, so a second abort while one runs is a double free."""
        with self.nccl.calling("abort"):
            self._abort()

    def _abort(self) -> None:
        with self._abort_lock:
            self.abort_calls += 1
            if self._aborting:
                self.concurrent_aborts += 1
                raise FakeNcclError("ncclCommAbort called while another abort runs: double free")
            self._aborting = True
        try:
            self.aborted = True
            self.nccl.device.advance()  # stuck kernels exit
            if self.nccl.abort_seconds:
                time.sleep(self.nccl.abort_seconds)  # the window where cupy still holds _comm
        finally:
            with self._abort_lock:
                self._aborting = False

    def destroy(self) -> None:
        with self.nccl.calling("destroy"):
            self.destroyed = True


class FakeNccl:
    """Stands in for the ``cupy.cuda.nccl`` module.

    ``legacy_ids``: ids are tuples of signed chars and communicators reject
    bytes (cupy < 14). ``hang``: NCCL kernels make no progress until aborted.
    ``async_error``: raised by ``check_async_error``. ``fail_init``: raised by
    the communicator constructor (of ``fail_rank`` only, if set).
    ``hold_rank``: that rank's constructor blocks until ``release_init`` is
    set, like ``ncclCommInitRank`` waiting for a peer that never comes.
    ``abort_seconds``: how long an abort takes (the window for a second one).
    ``calls`` logs ``(call, thread ident, thread name)`` for every NCCL call.
    Construction blocks until every rank of the id has joined (for up to
    ``init_timeout`` seconds, then fails); inside a group it returns at once
    and ``groupEnd`` waits for all of the group's communicators.
    """

    NCCL_UINT8 = 1
    NcclError = FakeNcclError
    available = True

    def __init__(
        self, device: FakeDevice, *, legacy_ids: bool = False, _fabric: _Fabric | None = None
    ) -> None:
        self.device = device
        self.legacy_ids = legacy_ids
        self.hang = False
        self.async_error: BaseException | None = None
        self.fail_init: BaseException | None = None
        self.fail_rank: int | None = None
        self.hold_rank: int | None = None
        self.release_init = threading.Event()
        self.abort_seconds = 0.0
        self.init_timeout = 10.0
        self.comms: list[FakeComm] = []
        self.checks = 0
        self.calls: list[tuple[str, int, str]] = []
        self.overlaps: list[str] = []  # calls made while another thread was inside one
        self._inside: list[int] = []
        self._fabric = _fabric if _fabric is not None else _Fabric()
        self._local = threading.local()  # NCCL's group state is per thread

    def on(self, device: FakeDevice) -> FakeNccl:
        """The NCCL of another process with its own device, on the same wires."""
        return FakeNccl(device, legacy_ids=self.legacy_ids, _fabric=self._fabric)

    def other_process(self) -> FakeNccl:
        """The NCCL of another process: same device and wires, its own comms and log."""
        other = FakeNccl(self.device, legacy_ids=self.legacy_ids, _fabric=self._fabric)
        return other

    @contextmanager
    def calling(self, name: str) -> Iterator[None]:
        """Log an NCCL call and its thread; count calls that overlap one on another thread."""
        me = threading.get_ident()
        with self.device.lock:
            self.calls.append((name, me, threading.current_thread().name))
            if any(ident != me for ident in self._inside):
                self.overlaps.append(name)
            self._inside.append(me)
        try:
            yield
        finally:
            with self.device.lock:
                self._inside.remove(me)

    def threads(self) -> set[int]:
        """Idents of the threads that made NCCL calls."""
        with self.device.lock:
            return {ident for _, ident, _ in self.calls}

    def thread_names(self) -> set[str]:
        """Names of the threads that made NCCL calls."""
        with self.device.lock:
            return {name for _, _, name in self.calls}

    @property
    def group(self) -> _Group | None:
        group: _Group | None = getattr(self._local, "group", None)
        return group

    def mailbox(self, key: bytes, src: int, dst: int) -> deque[bytes]:
        with self.device.lock:
            return self._fabric.boxes.setdefault((key, src, dst), deque())

    def get_unique_id(self) -> Any:
        with self.calling("get_unique_id"):
            raw = os.urandom(128)
        if self.legacy_ids:
            return tuple(b - 256 if b > 127 else b for b in raw)
        return raw

    def NcclCommunicator(self, world_size: int, uid: Any, rank: int) -> FakeComm:
        with self.calling("NcclCommunicator"):
            return self._communicator(world_size, uid, rank)

    def _communicator(self, world_size: int, uid: Any, rank: int) -> FakeComm:
        if self.legacy_ids:
            if not isinstance(uid, tuple):
                raise TypeError("commId must be a tuple (cupy < 14)")
            key = bytes(c & 0xFF for c in uid)
        else:
            if not isinstance(uid, bytes):
                raise TypeError("commId must be bytes (cupy >= 14)")
            key = uid
        if len(key) != 128:
            raise FakeNcclError("invalid unique id")
        if rank == self.hold_rank:
            self.release_init.wait(10)
        if self.fail_init is not None and self.fail_rank in (None, rank):
            raise self.fail_init
        comm = FakeComm(self, key, world_size, rank)
        group = self.group
        if group is not None:
            group.joining.append(comm)  # joins at groupEnd, like a grouped ncclCommInitRank
            return comm
        self._fabric.join([comm], self.init_timeout)
        with self.device.lock:
            self.comms.append(comm)
        return comm

    def groupStart(self) -> None:
        with self.calling("groupStart"):
            self._local.group = _Group()

    def groupEnd(self) -> None:
        with self.calling("groupEnd"):
            self._group_end()

    def _group_end(self) -> None:
        group, self._local.group = self.group, None
        assert group is not None, "groupEnd without groupStart"
        if group.joining:
            self._fabric.join(group.joining, self.init_timeout)
            with self.device.lock:
                self.comms.extend(group.joining)
        # Within a group NCCL runs sends and receives concurrently; queuing
        # the sends first is the in-order equivalent.
        ordered = sorted(group.ops, key=lambda op: op[1] != "send")
        for comm, kind, ptr, count, peer, stream in ordered:
            comm._enqueue(kind, ptr, count, peer, stream)


class _Fabric:
    """What fake processes share: message boxes and who joined which communicator."""

    def __init__(self) -> None:
        self.boxes: dict[tuple[bytes, int, int], deque[bytes]] = {}
        self._joined: dict[bytes, set[int]] = {}
        self._cond = threading.Condition()

    def join(self, comms: list[FakeComm], timeout: float) -> None:
        """Every comm's rank joins; returns once all their peers did (or raises)."""
        with self._cond:
            for comm in comms:
                self._joined.setdefault(comm.key, set()).add(comm.rank)
            self._cond.notify_all()
            complete = self._cond.wait_for(
                lambda: all(len(self._joined[c.key]) >= c.world_size for c in comms), timeout
            )
        if not complete:
            raise FakeNcclError("ncclCommInitRank: timed out waiting for the other ranks")
