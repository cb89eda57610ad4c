"""Stand-ins for a GPU, so the GPU transports' logic runs (and is tested) on CPU.

Like ``trio.testing``: shipped with the package, used by its tests, never by
the library itself. The fakes model exactly what the transports rely on and
nothing more:

* :class:`FakeDevice` runs the work queued on its streams *in stream order*,
  lazily, whenever someone asks an event or stream whether it is done — much
  like a GPU that has finished by the time you look. ``paused`` freezes it, to
  observe code that must wait. Every enqueue is logged, so tests can assert
  ordering decisions ("the NCCL stream waited for the producer's fence before
  the send").
* :class:`FakeEvent` / :class:`FakeStream` expose torch's surface
  (``query``, ``record_event``, ``wait_event``, ``cuda_stream``) and refuse
  ``synchronize()`` on a thread that runs an event loop.
* :class:`FakeOps` is a :class:`~aiokvpipe.cuda.streams.DeviceOps` over CPU
  tensors; :class:`FakeNccl` stands in for ``cupy.cuda.nccl``: communicators
  that really move bytes between CPU tensors by pointer, in NCCL's order,
  with knobs to hang them, fail them asynchronously, or reject the id type.
  Like NCCL, a communicator's construction blocks until every rank joined
  (inside a group: until ``groupEnd``), every call is logged with the thread
  that made it, and two concurrent aborts of one communicator are caught.
  :meth:`FakeNccl.other_process` gives a second "process" on the same fabric.
* :class:`FakeGpu` is what a :class:`~aiokvpipe.blocks.BlockService` takes
  as its GPU backend: CPU tensors it was told about (:meth:`FakeGpu.tensor`)
  count as device memory, copies run on fake streams, and its IPC memory is
  a :class:`FakeIpc` "driver" shared by fake processes: exporting names a
  tensor's storage as the allocation, opening maps it (the same address: one
  address space), a second open of one allocation in one process fails as
  CUDA's does, and every export/open/close is logged.

Links for the fakes to run over live one layer up, in
:mod:`aiokvpipe.transport.testing` (``cuda/`` never imports ``transport/``).
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CudaTransferError, CudaUnavailableError, RegionError

_ids = itertools.count(1)


def _on_loop_thread() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@dataclass
class _Op:
    label: str
    run: Callable[[], None] = lambda: None
    runnable: Callable[[], bool] = lambda: True


class FakeDevice:
    """A pretend GPU: queued work runs in stream order when progress is polled."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.streams: dict[int, FakeStream] = {}
        self.log: list[tuple[str, str, str]] = []
        self.paused = False
        self.polls = 0

    def stream(self, name: str) -> FakeStream:
        return FakeStream(self, name)

    def record(self, stream: str, action: str, what: str = "") -> None:
        with self.lock:
            self.log.append((stream, action, what))

    def actions(self, stream: str | None = None) -> list[str]:
        """Logged actions (``"wait producer-1"``...), of one stream or all."""
        with self.lock:
            return [
                f"{action} {what}".strip()
                for name, action, what in self.log
                if stream is None or name == stream
            ]

    def advance(self) -> None:
        """Run every op whose turn has come (in each stream's order)."""
        with self.lock:
            self.polls += 1
            if self.paused:
                return
            progress = True
            while progress:
                progress = False
                for stream in list(self.streams.values()):
                    while stream.ops and stream.ops[0].runnable():
                        stream.ops.popleft().run()
                        progress = True

    def drain(self, idle: Callable[[], bool], timeout: float = 10.0) -> None:
        """Blocking wait (worker threads only) until ``idle()``; what synchronize() does."""
        if _on_loop_thread():
            raise AssertionError("synchronize() called on the event loop thread")
        limit = time.monotonic() + timeout
        while True:
            self.advance()
            with self.lock:
                if idle():
                    return
            if time.monotonic() > limit:
                raise RuntimeError("fake device: work never completed")
            time.sleep(0.0005)


class FakeEvent:
    """torch.cuda.Event's polling surface."""

    def __init__(self, device: FakeDevice, name: str) -> None:
        self.device = device
        self.name = name
        self.complete = False
        self.queries = 0

    def query(self) -> bool:
        self.queries += 1
        self.device.advance()
        return self.complete

    def synchronize(self) -> None:
        self.device.drain(lambda: self.complete)

    def __repr__(self) -> str:
        return f"FakeEvent({self.name}, complete={self.complete})"


class FakeStream:
    """torch.cuda.Stream's surface; ``cuda_stream`` is the handle NCCL calls get."""

    def __init__(self, device: FakeDevice, name: str) -> None:
        self.device = device
        self.name = name
        self.ops: deque[_Op] = deque()
        self.cuda_stream = next(_ids)
        self._events = itertools.count(1)
        with device.lock:
            device.streams[self.cuda_stream] = self

    def enqueue(self, op: _Op, what: str = "") -> None:
        with self.device.lock:
            self.ops.append(op)
            self.device.record(self.name, op.label, what)

    def record_event(self, event: Any = None) -> FakeEvent:
        recorded = FakeEvent(self.device, f"{self.name}-{next(self._events)}")

        def mark() -> None:
            recorded.complete = True

        self.enqueue(_Op("record", mark), recorded.name)
        return recorded

    def wait_event(self, event: FakeEvent) -> None:
        self.enqueue(_Op("wait", runnable=lambda: event.complete), event.name)

    def wait_stream(self, other: FakeStream) -> None:
        self.wait_event(other.record_event())

    def query(self) -> bool:
        self.device.advance()
        with self.device.lock:
            return not self.ops

    def synchronize(self) -> None:
        self.device.drain(lambda: not self.ops)


class FakeOps:
    """:class:`~aiokvpipe.cuda.streams.DeviceOps` over CPU tensors and fake streams."""

    def __init__(self, device: FakeDevice | None = None, name: str = "") -> None:
        self.fake = device if device is not None else FakeDevice()
        prefix = f"{name}." if name else ""
        self._prefix = prefix
        self.current = self.fake.stream(f"{prefix}current")
        self._streams = itertools.count(1)
        self._staging: FakeStream | None = None
        self.new_streams = 0  # how many dedicated streams were asked for

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def current_stream(self) -> FakeStream:
        return self.current

    def new_stream(self) -> FakeStream:
        self.new_streams += 1
        return self.fake.stream(f"{self._prefix}side{next(self._streams)}")

    def staging_stream(self) -> FakeStream:
        if self._staging is None:
            self._staging = self.fake.stream(f"{self._prefix}staging")
        return self._staging

    def copy(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        def run() -> None:
            dst.copy_(src)

        stream.enqueue(_Op("copy", run), f"{src.numel()}x{src.dtype}")

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        self.fake.record(stream.name, "record_stream")

    def empty_pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)


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


# ------------------------------------------------------------------ paged blocks on a fake GPU

_FAKE_ATTR = "_aiokvpipe_fake_gpu"
_FAKE_HANDLE = struct.Struct("<QQ")


class FakeIpc:
    """CUDA IPC's driver side for fake processes on one host.

    ``log`` holds ``(process, action, allocation base)`` for every export,
    open and close. ``fail_open``: every open raises CudaTransferError with
    this text (a peer that sees another set of GPUs, say).
    """

    def __init__(self) -> None:
        self.exports: dict[bytes, tuple[int, int, str]] = {}
        self.log: list[tuple[str, str, int]] = []
        self.fail_open: str | None = None
        self.lock = threading.Lock()

    def process(self, name: str) -> FakeIpcMemory:
        return FakeIpcMemory(self, name)

    def actions(self, process: str | None = None, action: str | None = None) -> list[int]:
        """Allocation bases of the logged actions (of one process / kind of action)."""
        with self.lock:
            return [
                base
                for who, what, base in self.log
                if (process is None or who == process) and (action is None or what == action)
            ]


class FakeIpcMemory:
    """One fake process's :class:`~aiokvpipe.transport.cuda_ipc.IpcMemory`."""

    def __init__(self, ipc: FakeIpc, name: str) -> None:
        self.ipc = ipc
        self.name = name
        self.mapped: dict[int, bytes] = {}  # allocation base -> handle opened

    def export(self, tensor: torch.Tensor) -> tuple[int, int, bytes]:
        storage = tensor.untyped_storage()
        base, size = int(storage.data_ptr()), int(storage.nbytes())
        handle = _FAKE_HANDLE.pack(base, size).ljust(64, b"\xfa")
        with self.ipc.lock:
            self.ipc.exports[handle] = (base, size, self.name)
            self.ipc.log.append((self.name, "export", base))
        return base, size, handle

    def open(self, handle: bytes) -> tuple[int, int]:
        with self.ipc.lock:
            if self.ipc.fail_open is not None:
                raise CudaTransferError(f"opening a CUDA IPC handle: {self.ipc.fail_open}")
            entry = self.ipc.exports.get(handle)
            if entry is None:
                raise CudaTransferError("opening a CUDA IPC handle: invalid handle")
            base, size, _owner = entry
            if base in self.mapped:
                raise CudaTransferError(
                    "opening a CUDA IPC handle: already mapped (one mapping per allocation "
                    "and process)"
                )
            self.mapped[base] = handle
            self.ipc.log.append((self.name, "open", base))
        return base, size

    def close(self, base: int) -> None:
        with self.ipc.lock:
            if self.mapped.pop(base, None) is None:
                raise CudaTransferError(f"closing a CUDA IPC mapping {base:#x} never opened")
            self.ipc.log.append((self.name, "close", base))


class FakeGpu:
    """A :class:`~aiokvpipe.blocks.gpu.GpuBackend` over CPU tensors and fake streams.

    ``gpu.tensor(t)`` marks a CPU tensor as this fake device's memory; the
    block service then treats a region of such tensors as a GPU region.
    ``fake`` is the device (pause it to hold copies in flight), ``ops`` its
    stream operations (name-prefixed streams: ``"<name>.current"``, the
    blocks stream ``"<name>.side1"``, ``"<name>.staging"``), ``ipc`` the
    shared driver, ``memory`` this process's IPC memory.
    """

    def __init__(
        self, name: str = "gpu", ipc: FakeIpc | None = None, nccl: FakeNccl | None = None
    ) -> None:
        self.name = name
        self.key = f"fake:{name}"
        self.fake = FakeDevice()
        self.ops_ = FakeOps(self.fake, name)
        self.ipc = ipc if ipc is not None else FakeIpc()
        self.memory_ = self.ipc.process(name)
        self.asked_in_process: list[bool] = []
        self._stream: FakeStream | None = None
        #: This fake process's NCCL (None: "no cupy", GPU regions on two hosts
        #: stage), on this device and ``nccl``'s wires, with its own NCCL thread.
        self.nccl_: FakeNccl | None = nccl.on(self.fake) if nccl is not None else None
        self.nccl_thread: Any = None
        if nccl is not None:
            from .nccl_thread import NcclThread

            self.nccl_thread = NcclThread(name=f"aiokvpipe: nccl ({name})", idle_exit=0.05)

    def tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mark ``tensor`` (CPU) as memory of this fake device; returns it."""
        setattr(tensor, _FAKE_ATTR, self.key)
        return tensor

    def placement(self, tensor: torch.Tensor) -> str | None:
        key = getattr(tensor, _FAKE_ATTR, None)
        if isinstance(key, str):
            return key
        if tensor.device.type == "cpu":
            return None
        raise RegionError(f"is on {tensor.device}; only CPU or fake-GPU memory here")

    def _check(self, key: str) -> None:
        if key != self.key:
            raise AssertionError(f"{self.key} asked about another device, {key}")

    def ops(self, key: str) -> FakeOps:
        self._check(key)
        return self.ops_

    def stream(self, key: str) -> FakeStream:
        self._check(key)
        if self._stream is None:
            self._stream = self.ops_.new_stream()
        return self._stream

    def memory(self, key: str, in_process: bool) -> FakeIpcMemory:
        self._check(key)
        self.asked_in_process.append(in_process)
        return self.memory_

    def view(self, key: str, address: int, nbytes: int) -> torch.Tensor:
        self._check(key)
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        buffer = (ctypes.c_uint8 * nbytes).from_address(address)
        return torch.frombuffer(buffer, dtype=torch.uint8)

    def nccl(self, key: str) -> tuple[FakeNccl, Any]:
        self._check(key)
        if self.nccl_ is None:
            raise CudaUnavailableError(f"fake GPU {self.name} has no NCCL")
        return self.nccl_, self.nccl_thread

    def nccl_ops(self) -> list[str]:
        """NCCL operations queued on this device so far (``"nccl_send 96B"``...)."""
        return [a for a in self.fake.actions() if a.startswith("nccl_")]

    def copies(self) -> int:
        """Copies enqueued on this device so far."""
        return sum(1 for action in self.fake.actions() if action.startswith("copy"))
