"""GPU tensors between processes on one host, through CUDA IPC memory handles.

Nothing is copied on the sender's side. For each tensor the sender waits
(polling, on the host) until the producer's queued kernels have written it,
exports the CUDA allocation that holds it (``cudaIpcGetMemHandle`` on the
allocation's base, plus the tensor's offset in it) and writes the frame
header and that 88-byte descriptor on the link's socket. The receiver maps
the allocation (``cudaIpcOpenMemHandle``, once per allocation: mappings are
cached), copies the bytes into a tensor of its own on its own stream, awaits
the copy's event, and only then acknowledges; the sender holds the tensor
until that acknowledgement, and resolves the message's ``done`` (releasing
the pipe's byte window) then.

Why these choices:

* The host waits for the producer instead of passing an IPC *event* for the
  receiver's stream to wait on: the copy could not start earlier anyway, and
  there are no event handles to pool, open, cache and leak.
* Copy rather than hand out a view of the sender's memory: the received
  tensor's lifetime is then the consumer's business alone, and the sender's
  memory is free again as soon as the copy lands.
* Mappings are cached per sender allocation, as torch caches them: opening
  one costs a driver call that maps the whole allocation (tens of
  microseconds to milliseconds), and torch's caching allocator hands the
  same few allocations out again and again. CUDA allows one mapping per
  allocation and process; several tensors of one allocation may be in
  flight at once, so mappings are reference counted while copies read them.
  An idle mapping stays open until the sender's address shows up with
  another handle (the allocation was freed and a new one made there: the
  stale mapping is closed, the new one opened), until more than
  ``MAX_IDLE_MAPPINGS`` are idle (the least recently used goes), or until
  the channel closes. A mapping keeps the exporter's memory alive in the
  driver, so a sender that frees an allocation (``empty_cache``) leaves it
  resident until then.
* torch's own ``_share_cuda_`` machinery is not used: its receiving side
  synchronizes the current stream when a shared storage is freed, on
  whichever thread frees it — here, the event loop.

Both ends in one process (two ranks of a test, say) cannot open their own
handles; they exchange raw device pointers instead (:class:`InProcessMemory`).
Not supported: allocations that legacy CUDA IPC cannot export (torch's
``expandable_segments`` and the ``cudaMallocAsync`` allocator backend);
exporting them fails with a CudaTransferError that says so.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import torch

from .._timeouts import deadline
from ..cuda.channel import Message, OrderedReceiver, OrderedSender, Received, empty_frame
from ..cuda.control import ControlSocket, HelloKind
from ..cuda.events import wait_event
from ..cuda.runtime import cupy_or_raise, require_cuda
from ..cuda.streams import DeviceOps, TorchCudaOps, after, fence
from ..errors import CudaUnavailableError, ProtocolError
from ..wire import FrameHeader
from ._ipc_memory import (
    HANDLE_BYTES,
    CudaIpcMemory,
    InProcessMemory,
    IpcMemory,
    Mappings,
    view_of,
)
from .base import Link, RecvChannel, SendChannel, Transport

# sender allocation base, allocation size, tensor offset in it, handle
DESCRIPTOR = struct.Struct(f"<QQQ{HANDLE_BYTES}s")
# acknowledgement: magic, sequence number of the frame whose copy landed
ACK = struct.Struct("<4sQ")
ACK_MAGIC = b"AKVA"
_IN_PROCESS = b"\x01"
_CROSS_PROCESS = b"\x00"


def _in_process(link: Link) -> bool:
    # A random per-process id, not the pid: two containers of one pod share
    # boot id and namespaces and can both be pid 1.
    return link.peer.process_id == link.local.process_id


def _control(link: Link) -> ControlSocket:
    return ControlSocket(link.sock, describe=link.describe, op_timeout=link.config.op_timeout)


@dataclass
class _Shared:
    tensor: torch.Tensor  # held until the receiver acknowledges its copy


class CudaIpcSendChannel(OrderedSender[_Shared | None], SendChannel):
    """Exports each tensor's memory and holds it until the receiver's copy landed."""

    def __init__(self, link: Link, *, memory: IpcMemory, ops: DeviceOps) -> None:
        super().__init__(
            _control(link),
            ops,
            op_timeout=link.config.op_timeout,
            close_timeout=link.config.close_timeout,
        )
        self._link = link
        self._memory = memory
        self._mode = _IN_PROCESS if _in_process(link) else _CROSS_PROCESS

    @classmethod
    def open(cls, link: Link, *, memory: IpcMemory, ops: DeviceOps) -> CudaIpcSendChannel:
        """The channel, at once; the hello exchange runs in the background."""
        channel = cls(link, memory=memory, ops=ops)
        channel.start()
        return channel

    async def _setup(self) -> None:
        what = f"{self._link.describe}: CUDA IPC set-up"
        async with deadline(self._link.config.connect_timeout, lambda: what):
            await self._control.send_hello(HelloKind.CUDA_IPC, self._mode)
            await self._control.recv_hello(HelloKind.CUDA_IPC)

    async def _start(self, message: Message, token: Any) -> _Shared | None:
        header = message.header.encode()
        if token is None:
            await self._control.send(header)
            return None
        tensor, ready = await self.on_device(token)
        if ready is not None:
            what = f"{self._link.describe}: producer of seq {message.header.seq}"
            await wait_event(ready, timeout=self._op_timeout, what=what)
        base, size, handle = self._memory.export(tensor)
        descriptor = DESCRIPTOR.pack(base, size, tensor.data_ptr() - base, handle)
        await self._control.send(header + descriptor)
        return _Shared(tensor)

    async def _finish(self, message: Message, state: _Shared | None) -> None:
        if state is None:
            return
        data = await self._control.recv_exact(ACK.size)
        magic, seq = ACK.unpack(data)
        if magic != ACK_MAGIC or seq != message.header.seq:
            raise ProtocolError(
                f"{self._link.describe}: expected the acknowledgement of seq "
                f"{message.header.seq}, got {magic!r} seq {seq}"
            )

    async def _after_close_frame(self) -> None:
        return None  # every copy was acknowledged before the CLOSE went out

    async def _release(self) -> None:
        return None  # nothing on the device; held tensors go with the failed messages


@dataclass
class _Copying:
    key: int  # the sender's allocation base (the mapping's reference)
    source: torch.Tensor | None  # view of the mapped memory, dropped before unmapping
    event: Any


class CudaIpcRecvChannel(OrderedReceiver, RecvChannel):
    """Maps each descriptor, copies on its own stream, unmaps, acknowledges."""

    def __init__(self, link: Link, *, memory: IpcMemory, ops: DeviceOps) -> None:
        super().__init__(
            _control(link),
            device=ops.device,
            window_bytes=link.config.buffer_bytes,
            max_frame_bytes=link.config.max_frame_bytes,
        )
        self._link = link
        self._ops = ops
        self._mappings = Mappings(memory)
        self._stream = ops.new_stream()
        self._op_timeout = link.config.op_timeout
        self._close_timeout = link.config.close_timeout
        self._mode = _IN_PROCESS if _in_process(link) else _CROSS_PROCESS

    @classmethod
    def open(cls, link: Link, *, memory: IpcMemory, ops: DeviceOps) -> CudaIpcRecvChannel:
        """The channel, at once; the hello exchange runs in the background."""
        channel = cls(link, memory=memory, ops=ops)
        channel.start()
        return channel

    @property
    def mappings(self) -> Mappings:
        return self._mappings

    async def _setup(self) -> None:
        what = f"{self._link.describe}: CUDA IPC set-up"
        async with deadline(self._link.config.connect_timeout, lambda: what):
            mode = await self._control.recv_hello(HelloKind.CUDA_IPC)
            if mode != self._mode:
                raise ProtocolError(
                    f"{self._link.describe}: the peer thinks it is "
                    f"{'in' if mode == _IN_PROCESS else 'out of'} this process, and it is not"
                )
            await self._control.send_hello(HelloKind.CUDA_IPC)

    async def _begin(self, header: FrameHeader) -> Received:
        # The sender's idea of the allocation size is not trusted: Mappings
        # checks the offset against the size of what was actually mapped.
        base, _size, offset, handle = DESCRIPTOR.unpack(
            await self._control.recv_exact(DESCRIPTOR.size)
        )
        address = self._mappings.acquire(base, handle, offset, header.nbytes)
        try:
            source = view_of(address, header.nbytes, self._ops.device)
            tensor, raw = empty_frame(header, self._ops.device)  # on the consumer's stream
            after(self._stream, fence(self._ops))
            self._ops.copy(self._stream, raw, source)
            self._ops.record_stream(raw, self._stream)
            event = self._stream.record_event()
        except BaseException:
            self._mappings.release(base)
            raise
        return Received(tensor, header.nbytes, _Copying(base, source, event), header.seq)

    async def _finish_item(self, item: Received) -> None:
        copying: _Copying = item.state
        what = f"{self._link.describe}: IPC copy of {item.nbytes} bytes (seq {item.seq})"
        await wait_event(copying.event, timeout=self._op_timeout, what=what)
        copying.source = None  # no view outlives the mapping
        self._mappings.release(copying.key)
        await self._control.send(ACK.pack(ACK_MAGIC, item.seq))

    async def _on_close_frame(self, close: FrameHeader) -> None:
        return None  # every copy was acknowledged as it landed

    async def _release(self, pending: list[Received]) -> None:
        """Unmap, but never under a copy still reading: wait for those first."""
        try:
            async with deadline(self._close_timeout, lambda: "copies in flight at close"):
                for item in pending:
                    await wait_event(item.state.event, what="an IPC copy in flight at close")
        except Exception:
            return  # a stuck copy: leaving the mappings open beats unmapping under it
        self._mappings.close_all()


async def _runtime(link: Link) -> tuple[IpcMemory, DeviceOps]:
    """IPC memory and the link's device, or tell the peer why not and raise."""
    what = f"{link.describe}: transport 'cuda_ipc'"
    try:
        ops = TorchCudaOps(require_cuda(what, link.config.device))
        if _in_process(link):
            return InProcessMemory(), ops
        return CudaIpcMemory(ops.device, cupy_or_raise(what)), ops
    except CudaUnavailableError as exc:
        timeout = link.config.connect_timeout
        await _control(link).refuse_and_close(HelloKind.CUDA_IPC, str(exc), timeout=timeout)
        raise


class CudaIpcTransport(Transport):
    """GPU tensors between processes (or ranks) on one host, without NCCL."""

    name = "cuda_ipc"

    @classmethod
    async def open_sender(cls, link: Link) -> SendChannel:
        memory, ops = await _runtime(link)
        return CudaIpcSendChannel.open(link, memory=memory, ops=ops)

    @classmethod
    async def open_receiver(cls, link: Link) -> RecvChannel:
        memory, ops = await _runtime(link)
        return CudaIpcRecvChannel.open(link, memory=memory, ops=ops)


__all__ = [
    "CudaIpcMemory",
    "CudaIpcRecvChannel",
    "CudaIpcSendChannel",
    "CudaIpcTransport",
    "HANDLE_BYTES",
    "InProcessMemory",
    "IpcMemory",
    "Mappings",
    "view_of",
]
