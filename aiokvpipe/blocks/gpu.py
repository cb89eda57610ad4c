"""Block transfers for regions in GPU memory: CUDA IPC on one host, staging elsewhere.

Two paths move the blocks of a GPU region (the service picks per transfer):

* **CUDA IPC** (both regions on GPUs, one host, neither end forcing another
  transport): the owner exports the CUDA allocation of each registered
  tensor once per registration (:class:`~aiokvpipe.blocks.gpu_ipc.Export`,
  through :mod:`aiokvpipe.transport.cuda_ipc`'s handle export), and the
  requester maps the owner's region once per (peer instance, region)
  (:class:`~aiokvpipe.blocks.gpu_ipc.PeerMaps`, holding the mappings in that
  transport's reference-counted :class:`~aiokvpipe.transport.cuda_ipc.Mappings`;
  both records live in :mod:`aiokvpipe.blocks.gpu_ipc`). Each transfer is then a
  set of device-to-device copies of block runs on the requester's dedicated
  block stream: a pull copies out of the owner's mapped blocks into local
  ones, a push into the owner's mapped blocks. Every copy is planned and
  bounds-checked (:func:`plan_copies`) before the first is enqueued, and the
  loop awaits the copies' event by polling (never ``synchronize()``). The
  control messages (request, lease checks, done/abort) stay on the block
  socket, so the owner counts a transfer only after the copier's event
  completed and it said so.
* **Staging** (a CPU region on the other side, IPC refused, or a GPU peer on
  another host where NCCL is unavailable: :mod:`aiokvpipe.blocks.ncclpath`
  moves GPU regions between hosts otherwise): the GPU side copies its block runs into (or
  out of) one page-locked host buffer on the device's staging stream, and the
  bytes take the CPU path (socket or shared-memory ring) as any other
  payload. One extra copy on each GPU end; nothing else changes.

What IPC means for trust: a mapping covers the whole CUDA allocation, not
just the granted blocks, so the owner relies on the requester's own checks
(it is on the same host and proved the endpoint token); the owner exports
only to a peer on its host that holds a live lease on that region, and only
counts what its leases grant. Device copies cannot be recalled: once a copy
is enqueued it finishes, so "stops touching the blocks" means no further copy
is enqueued after a lease ends or a transfer is cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import torch

from ..cuda.events import wait_event
from ..cuda.nccl_thread import NcclThread, nccl_thread
from ..cuda.runtime import cupy_or_raise, nccl_or_raise, require_cuda
from ..cuda.streams import DeviceOps, TorchCudaOps, after, fence
from ..errors import MalformedFrameError
from ..transport.base import PeerInfo
from ..transport.cuda_ipc import CudaIpcMemory, InProcessMemory, IpcMemory, view_of
from .gpu_ipc import (
    TENSORS_PER_MESSAGE,
    Export,
    ExportedTensor,
    MappedRegion,
    PeerMaps,
    export_answer,
    export_region,
    parse_export_answer,
)
from .region import BlockRegion, host_or_cuda
from .runs import pair_runs

# The IPC records moved to gpu_ipc stay importable from here.
__all__ = [
    "TENSORS_PER_MESSAGE",
    "Copy",
    "Export",
    "ExportedTensor",
    "GpuBackend",
    "MappedRegion",
    "PeerMaps",
    "Reaper",
    "Settle",
    "TorchGpu",
    "enqueue_copies",
    "export_answer",
    "export_region",
    "may_map_device_memory",
    "parse_export_answer",
    "plan_copies",
    "stage_in",
    "stage_out",
]


class GpuBackend(Protocol):
    """Where the service gets device operations and IPC memory from.

    Production: :class:`TorchGpu`. The CPU test suite passes
    :class:`aiokvpipe.cuda.testing.FakeGpu`, whose "device" tensors are CPU
    tensors it was told about and whose streams are fakes that log order.
    """

    def placement(self, tensor: torch.Tensor) -> str | None:
        """None for host memory, a device key for GPU memory; RegionError otherwise."""

    def ops(self, key: str) -> DeviceOps:
        """Stream operations on the device ``key``."""

    def stream(self, key: str) -> Any:
        """The dedicated stream block copies run on, one per device and service."""

    def memory(self, key: str, in_process: bool) -> IpcMemory:
        """Exporting and mapping allocations on ``key`` (``in_process``: the peer is us)."""

    def view(self, key: str, address: int, nbytes: int) -> torch.Tensor:
        """A uint8 tensor over ``nbytes`` of mapped memory at ``address``."""

    def nccl(self, key: str) -> tuple[Any, NcclThread]:
        """NCCL's bindings and the thread that makes every NCCL call, for ``key``.

        CudaUnavailableError (an AiokvpipeError) where there is no NCCL: GPU
        regions on two hosts then stage through host memory.
        """


class TorchGpu:
    """:class:`GpuBackend` on real CUDA devices (cupy for IPC, imported on first use)."""

    def __init__(self) -> None:
        self._ops: dict[str, DeviceOps] = {}
        self._streams: dict[str, Any] = {}
        self._memory: dict[tuple[str, bool], IpcMemory] = {}

    def placement(self, tensor: torch.Tensor) -> str | None:
        return host_or_cuda(tensor)

    def ops(self, key: str) -> DeviceOps:
        ops = self._ops.get(key)
        if ops is None:
            ops = self._ops[key] = TorchCudaOps(require_cuda(f"paged blocks on {key}", key))
        return ops

    def stream(self, key: str) -> Any:
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = self.ops(key).new_stream()
        return stream

    def memory(self, key: str, in_process: bool) -> IpcMemory:
        memory = self._memory.get((key, in_process))
        if memory is None:
            if in_process:  # CUDA refuses to open a handle in the process that made it
                memory = InProcessMemory()
            else:
                memory = CudaIpcMemory(self.ops(key).device, cupy_or_raise("CUDA IPC of blocks"))
            self._memory[(key, in_process)] = memory
        return memory

    def view(self, key: str, address: int, nbytes: int) -> torch.Tensor:
        return view_of(address, nbytes, self.ops(key).device)

    def nccl(self, key: str) -> tuple[Any, NcclThread]:
        self.ops(key)  # CUDA itself first
        return nccl_or_raise(f"NCCL block transfers on {key}"), nccl_thread()


def may_map_device_memory(local: PeerInfo, peer: PeerInfo | None) -> bool:
    """Whether GPU regions of ``local`` and ``peer`` may use CUDA IPC (this side's rule).

    One host (the boot id and namespaces :func:`~aiokvpipe.links.host_identity`
    reports), and neither end forced onto another transport. The regions
    themselves decide the rest: both must be on GPUs, and the owner must be
    able to export and the requester to map (else they stage).
    """
    if peer is None or not local.host_id or local.host_id != peer.host_id:
        return False
    return local.transport in ("auto", "cuda_ipc") and peer.transport in ("auto", "cuda_ipc")


# ------------------------------------------------------------------ copies


Copy = tuple[torch.Tensor, torch.Tensor]  # (destination, source), same length, uint8


def plan_copies(
    op: str,
    region: BlockRegion,
    local: Sequence[int],
    mapped: MappedRegion,
    remote: Sequence[int],
    layers: Sequence[int],
    what: str,
) -> list[Copy]:
    """Every device copy of one IPC transfer, each checked before any is enqueued.

    The owner granted ``remote`` (its REPLY said so), so every remote byte
    range must lie in those blocks of the mapped tensor, and the mapped
    tensor must be exactly the size our layout and its block count imply: an
    owner whose export says otherwise is cut off with MalformedFrameError
    before a byte moves. ``op`` "read" copies remote -> local, "write" local
    -> remote.
    """
    bad = sorted({r for r in remote if not 0 <= r < mapped.num_blocks})
    if bad:
        raise MalformedFrameError(
            f"{what}: the owner granted blocks {bad[:8]} of a region it exported with "
            f"{mapped.num_blocks} blocks"
        )
    if max(layers, default=0) >= len(mapped.views):
        raise MalformedFrameError(
            f"{what}: the owner exported {len(mapped.views)} tensors, layers {list(layers)} asked"
        )
    runs = pair_runs(local, remote)
    out: list[Copy] = []
    for layer in layers:
        layout = region.layout(layer)
        size = layout.block_bytes
        outer = region.outer_count(layer)
        theirs = mapped.views[layer]
        expect = outer * mapped.num_blocks * size
        if int(theirs.numel()) != expect:
            raise MalformedFrameError(
                f"{what}: the owner's tensor {layer} is {theirs.numel()} bytes; "
                f"{layout.describe()} with {mapped.num_blocks} blocks is {expect}"
            )
        if size == 0:
            continue
        mine = region.flat(layer)
        my_stride, their_stride = region.num_blocks * size, mapped.num_blocks * size
        for o in range(outer):
            for dst_first, src_first, count in runs:
                n = count * size
                lb = o * my_stride + dst_first * size
                rb = o * their_stride + src_first * size
                # Inside the granted blocks of tensor `layer` (checked above:
                # src_first + count <= num_blocks), and inside the mapping.
                if not (src_first + count <= mapped.num_blocks and rb + n <= expect):
                    raise MalformedFrameError(f"{what}: copy {rb}+{n} outside the owner's tensor")
                a, b = mine[lb : lb + n], theirs[rb : rb + n]
                out.append((a, b) if op == "read" else (b, a))
    return out


Settle = Callable[[Any, str, Callable[[], None]], Awaitable[None]]


def enqueue_copies(ops: DeviceOps, stream: Any, copies: Sequence[Copy], ready: Any | None) -> Any:
    """Queue ``copies`` on ``stream`` after ``ready`` and the current stream; their event."""
    after(stream, ready)
    after(stream, fence(ops))  # kernels queued on the local blocks go first
    for dst, src in copies:
        ops.copy(stream, dst, src)
    return stream.record_event()


async def stage_out(
    ops: DeviceOps,
    region: BlockRegion,
    ids: Sequence[int],
    layers: Sequence[int],
    ready: Any | None,
    settle: Settle,
    what: str,
) -> torch.Tensor:
    """The blocks' bytes, in stream order, in one page-locked host buffer."""
    host = ops.empty_pinned(region.nbytes(len(ids), layers))
    side = ops.staging_stream()
    after(side, ready)
    offset = 0
    for layer, begin, n in region.ranges(ids, layers):
        ops.copy(side, host[offset : offset + n], region.flat(layer)[begin : begin + n])
        offset += n
    await settle(side.record_event(), what, lambda: _keep(host))
    return host


async def stage_in(
    ops: DeviceOps,
    region: BlockRegion,
    ids: Sequence[int],
    layers: Sequence[int],
    host: torch.Tensor,
    ready: Any | None,
    settle: Settle,
    what: str,
) -> None:
    """Copy a host buffer of stream-ordered bytes into the blocks (after ``ready``)."""
    side = ops.staging_stream()
    after(side, ready)
    after(side, fence(ops))  # kernels still reading the destination blocks go first
    offset = 0
    for layer, begin, n in region.ranges(ids, layers):
        ops.copy(side, region.flat(layer)[begin : begin + n], host[offset : offset + n])
        offset += n
    await settle(side.record_event(), what, lambda: _keep(host))


def _keep(_obj: object) -> None:
    """Referenced by a callback so ``_obj`` outlives the copy that uses it."""


class Reaper:
    """Runs a callback once device work nobody awaits any more has completed.

    A transfer cancelled (or timed out) while its copies run cannot recall
    them; whatever they use (a mapping, a host buffer) must stay until they
    finish. The reaper polls their event in the background, bounded by
    ``timeout``; a copy that never finishes keeps its resources for good,
    which beats unmapping under it.
    """

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()

    def later(self, event: Any, callback: Callable[[], None], what: str) -> None:
        task = asyncio.get_running_loop().create_task(self._run(event, callback, what))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, event: Any, callback: Callable[[], None], what: str) -> None:
        try:
            await wait_event(event, timeout=self._timeout, what=what)
        except Exception:
            return
        callback()

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def aclose(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
