"""Device allocations shared between processes: exporting them, mapping the peer's.

:class:`IpcMemory` is the driver seam (:class:`CudaIpcMemory` for real CUDA IPC,
:class:`InProcessMemory` when both ends share a process), :class:`Mappings` the
reference-counted cache of the peer's allocations mapped here, and :func:`view_of`
wraps a mapped address as a tensor. The ``cuda_ipc`` transport and the blocks' GPU
path both build on these; :mod:`aiokvpipe.transport.cuda_ipc` says why mappings are
cached as they are.
"""

from __future__ import annotations

import ctypes
import struct
from collections import OrderedDict
from typing import Any, Protocol

import torch

from ..cuda.runtime import cuda_errors
from ..errors import CudaTransferError, CudaUnavailableError, MalformedFrameError, ProtocolError

HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)


class IpcMemory(Protocol):
    """Exporting device allocations and mapping the peer's (CUDA IPC or a stand-in)."""

    def export(self, tensor: torch.Tensor) -> tuple[int, int, bytes]:
        """``(allocation base, allocation size, handle)`` of the memory holding ``tensor``."""

    def open(self, handle: bytes) -> tuple[int, int]:
        """Map the peer's allocation: ``(local base address, size)``."""

    def close(self, base: int) -> None:
        """Unmap an allocation returned by :meth:`open`."""


def _address_range(ptr: int) -> tuple[int, int]:
    """``(base, size)`` of the CUDA allocation containing ``ptr`` (driver API).

    IPC handles name whole ``cudaMalloc`` allocations; torch's caching
    allocator carves tensors out of larger ones, so the offset is needed.
    cupy does not wrap ``cuMemGetAddressRange``; libcuda is present wherever
    a driver is.
    """
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise CudaUnavailableError(f"CUDA IPC needs the CUDA driver library: {exc}") from exc
    fn = libcuda.cuMemGetAddressRange_v2
    fn.argtypes = [
        ctypes.POINTER(ctypes.c_uint64),
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.c_uint64,
    ]
    fn.restype = ctypes.c_int
    base = ctypes.c_uint64()
    size = ctypes.c_size_t()
    status = fn(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if status != 0:
        raise CudaTransferError(f"cuMemGetAddressRange({ptr:#x}) failed with CUresult {status}")
    return int(base.value), int(size.value)


class CudaIpcMemory:
    """Real CUDA IPC through cupy's runtime bindings, on one device."""

    def __init__(self, device: torch.device, cupy: Any) -> None:
        self._device = device
        self._cupy = cupy

    def _on_device(self) -> Any:
        return self._cupy.cuda.Device(self._device.index)

    def export(self, tensor: torch.Tensor) -> tuple[int, int, bytes]:
        with cuda_errors("exporting a CUDA IPC handle"), self._on_device():
            base, size = _address_range(tensor.data_ptr())
            try:
                handle = bytes(self._cupy.cuda.runtime.ipcGetMemHandle(base))
            except RuntimeError as exc:
                raise CudaTransferError(
                    f"cannot export {tensor.device} memory by CUDA IPC ({exc}); allocations from "
                    "expandable_segments or the cudaMallocAsync backend cannot be shared this way"
                ) from exc
        return base, size, handle

    def open(self, handle: bytes) -> tuple[int, int]:
        with cuda_errors("opening a CUDA IPC handle"), self._on_device():
            base = int(self._cupy.cuda.runtime.ipcOpenMemHandle(handle))
            return base, _address_range(base)[1]

    def close(self, base: int) -> None:
        with cuda_errors("closing a CUDA IPC mapping"), self._on_device():
            self._cupy.cuda.runtime.ipcCloseMemHandle(base)


class InProcessMemory:
    """Both ends in one process: the "handle" is the pointer itself.

    CUDA refuses to open a handle in the process that exported it; within a
    process the address is already valid. Also what the CPU test suite uses
    (with host memory), since the protocol around it is the same.
    """

    _HANDLE = struct.Struct("<QQ")

    def export(self, tensor: torch.Tensor) -> tuple[int, int, bytes]:
        ptr, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        return ptr, size, self._HANDLE.pack(ptr, size).ljust(HANDLE_BYTES, b"\0")

    def open(self, handle: bytes) -> tuple[int, int]:
        ptr, size = self._HANDLE.unpack_from(handle)
        return int(ptr), int(size)

    def close(self, base: int) -> None:
        pass


class _CudaArray:
    """The minimum ``__cuda_array_interface__`` for torch to wrap a raw device pointer."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        # Version 2: no "stream" key, so torch does not synchronize anything.
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "strides": None,
            "version": 2,
        }


def view_of(ptr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over memory this process does not own (valid while mapped)."""
    if device.type == "cuda":
        return torch.as_tensor(_CudaArray(ptr, nbytes))
    buffer = (ctypes.c_uint8 * nbytes).from_address(ptr)
    return torch.frombuffer(buffer, dtype=torch.uint8)


MAX_IDLE_MAPPINGS = 64


class Mappings:
    """Peer allocations mapped into this process, cached by the sender's base address.

    Entries are ``handle, local base, size, copies reading it``; the dict's
    order is least recently used first.
    """

    def __init__(self, memory: IpcMemory, *, max_idle: int = MAX_IDLE_MAPPINGS) -> None:
        self._memory = memory
        self._max_idle = max_idle
        self._open: OrderedDict[int, tuple[bytes, int, int, int]] = OrderedDict()

    def acquire(self, key: int, handle: bytes, offset: int, nbytes: int) -> int:
        """Local address of ``nbytes`` at ``offset`` in the peer allocation ``key``."""
        entry = self._open.get(key)
        if entry is not None and entry[0] != handle:
            if entry[3]:
                raise ProtocolError(f"two live allocations at sender address {key:#x}")
            # The sender freed that allocation and made another one there.
            del self._open[key]
            self._memory.close(entry[1])
            entry = None
        if entry is None:
            base, size = self._memory.open(handle)
            entry = (handle, base, size, 0)
        _, base, size, refs = entry
        if offset + nbytes > size:
            self._open.pop(key, None)
            if refs == 0:
                self._memory.close(base)
            raise MalformedFrameError(
                f"descriptor points {offset}+{nbytes} bytes into an allocation of {size}"
            )
        self._open[key] = (handle, base, size, refs + 1)
        self._open.move_to_end(key)
        return base + offset

    def release(self, key: int) -> None:
        handle, base, size, refs = self._open[key]
        self._open[key] = (handle, base, size, refs - 1)
        if refs == 1:
            self._evict()

    def _evict(self) -> None:
        idle = [key for key, entry in self._open.items() if entry[3] == 0]
        for key in idle[: max(0, len(idle) - self._max_idle)]:
            self._memory.close(self._open.pop(key)[1])

    @property
    def open_count(self) -> int:
        """Mappings open now, idle ones included."""
        return len(self._open)

    @property
    def busy_count(self) -> int:
        """Mappings that copies are reading now."""
        return sum(1 for entry in self._open.values() if entry[3])

    def close_all(self) -> None:
        for _, base, _, _ in self._open.values():
            self._memory.close(base)
        self._open.clear()
