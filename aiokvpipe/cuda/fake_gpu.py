"""A fake GPU backend for the block service, with a fake CUDA IPC driver.

:class:`FakeGpu` is what a :class:`~aiokvpipe.blocks.BlockService` takes as
its GPU backend (CPU tensors marked as device memory, copies on
:mod:`.fake_device` streams, optionally NCCL from :mod:`.fake_nccl`);
:class:`FakeIpc` / :class:`FakeIpcMemory` are the IPC driver fake processes
share. Import them from :mod:`aiokvpipe.cuda.testing`, which describes all
the fakes.
"""

from __future__ import annotations

import ctypes
import struct
import threading
from typing import Any

import torch

from ..errors import CudaTransferError, CudaUnavailableError, RegionError
from .fake_device import FakeDevice, FakeOps, FakeStream
from .fake_nccl import FakeNccl

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
