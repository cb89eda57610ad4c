"""CUDA IPC of block regions: what an owner exports and how a requester holds the mapping.

These records outlive any one transfer: an export lasts as long as the
owner's registration, a mapping as long as the peer instance and its region,
and both cross the block socket in SETUP answers that must be checked field
by field before anything is mapped. Keeping them apart from the per-transfer
copies and staging (:mod:`aiokvpipe.blocks.gpu`) keeps the trust boundary (an
owner's description of its allocations) in one place; the trust argument
itself is in that module's docstring.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MalformedFrameError
from ..transport.cuda_ipc import HANDLE_BYTES, IpcMemory, Mappings
from .region import BlockRegion

_U64 = 1 << 64
#: Tensors described per SETUP answer: 32 x ~200 bytes of JSON, well under MAX_JSON.
TENSORS_PER_MESSAGE = 32


# ------------------------------------------------------------------ the owner's export


@dataclass(frozen=True)
class ExportedTensor:
    """One registered tensor as a peer maps it: its allocation, and where it sits in it."""

    base: int  # the allocation's base address in the owner's process
    size: int  # the allocation's size
    offset: int  # the tensor's first byte in the allocation
    nbytes: int  # the tensor's bytes
    handle: bytes

    def to_wire(self) -> list[Any]:
        return [self.base, self.size, self.offset, self.nbytes, self.handle.hex()]


@dataclass(frozen=True)
class Export:
    """A region's tensors, exported once per registration (and process kind of peer)."""

    export_id: str
    num_blocks: int
    tensors: tuple[ExportedTensor, ...]


def export_region(region: BlockRegion, memory: IpcMemory) -> Export:
    """Export the allocation of every tensor of ``region`` (CudaTransferError if one cannot be)."""
    out = []
    for layer, tensor in enumerate(region.tensors):
        base, size, handle = memory.export(tensor)
        offset = tensor.data_ptr() - base
        out.append(ExportedTensor(base, size, offset, region.tensor_bytes(layer), handle))
    return Export(region.export_id, region.num_blocks, tuple(out))


def export_answer(export: Export, first: int) -> dict[str, Any]:
    """The SETUP answer carrying tensors ``first..first+TENSORS_PER_MESSAGE``."""
    part = export.tensors[first : first + TENSORS_PER_MESSAGE]
    return {
        "export": export.export_id,
        "num_blocks": export.num_blocks,
        "layers": len(export.tensors),
        "first": first,
        "tensors": [t.to_wire() for t in part],
    }


def _u64(value: Any, what: str, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _U64:
        raise MalformedFrameError(f"{what}: {name} {value!r} is not a 64-bit address or size")
    return value


def parse_export_answer(
    body: dict[str, Any], first: int, what: str
) -> tuple[str, int, int, list[ExportedTensor]]:
    """``(export id, num_blocks, layers, tensors)`` of one SETUP answer, every field checked."""
    export_id, num_blocks, layers = body.get("export"), body.get("num_blocks"), body.get("layers")
    if not isinstance(export_id, str) or not 0 < len(export_id) <= 64:
        raise MalformedFrameError(f"{what}: IPC export without an id")
    if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 0:
        raise MalformedFrameError(f"{what}: IPC export of {num_blocks!r} blocks")
    if not isinstance(layers, int) or isinstance(layers, bool) or not 0 < layers <= 4096:
        raise MalformedFrameError(f"{what}: IPC export of {layers!r} tensors")
    tensors = body.get("tensors")
    if body.get("first") != first or not isinstance(tensors, list):
        raise MalformedFrameError(f"{what}: IPC export answer out of order")
    if len(tensors) != min(TENSORS_PER_MESSAGE, layers - first) or first >= layers:
        raise MalformedFrameError(f"{what}: IPC export answer of {len(tensors)} tensors")
    out = []
    for entry in tensors:
        if not isinstance(entry, list) or len(entry) != 5 or not isinstance(entry[4], str):
            raise MalformedFrameError(f"{what}: malformed IPC tensor description")
        names = ("base", "size", "offset", "nbytes")
        base, size, offset, nbytes = (
            _u64(v, what, n) for v, n in zip(entry[:4], names, strict=True)
        )
        try:
            handle = binascii.unhexlify(entry[4])
        except (binascii.Error, ValueError):
            raise MalformedFrameError(f"{what}: IPC handle is not hex") from None
        if len(handle) != HANDLE_BYTES:
            raise MalformedFrameError(f"{what}: IPC handle of {len(handle)} bytes")
        if offset + nbytes > size:
            raise MalformedFrameError(
                f"{what}: tensor at {offset}+{nbytes} bytes outside its allocation of {size}"
            )
        out.append(ExportedTensor(base, size, offset, nbytes, handle))
    return export_id, num_blocks, layers, out


# ------------------------------------------------------------------ the requester's mappings


@dataclass
class MappedRegion:
    """An owner's region mapped into this process (one per peer instance and region)."""

    export_id: str
    num_blocks: int
    keys: list[int]  # the owner's allocation base per tensor: the Mappings reference
    views: list[torch.Tensor]  # uint8 views of the owner's tensors, valid while mapped
    busy: int = 0  # copies in flight reading or writing the mapping
    dropped: bool = False  # to be unmapped once no copy uses it


@dataclass
class PeerMaps:
    """One peer instance's regions mapped here, over one reference-counted Mappings.

    A mapping is opened when a region is first mapped and closed when the
    region is dropped (a stale export, our region unregistered, the peer lost,
    the service closed) and no copy uses it any more: never under a copy.
    """

    memory: IpcMemory
    mappings: Mappings = field(init=False)
    regions: dict[str, MappedRegion] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # region -> why it stages

    def __post_init__(self) -> None:
        # max_idle=0: an allocation no mapped region references is closed at once.
        self.mappings = Mappings(self.memory, max_idle=0)

    def map(
        self,
        name: str,
        export_id: str,
        num_blocks: int,
        tensors: Sequence[ExportedTensor],
        view: Callable[[int, int], torch.Tensor],
    ) -> MappedRegion:
        """Map every tensor of the owner's region (MalformedFrameError if one lies about sizes)."""
        keys: list[int] = []
        views: list[torch.Tensor] = []
        try:
            for t in tensors:
                address = self.mappings.acquire(t.base, t.handle, t.offset, t.nbytes)
                keys.append(t.base)
                views.append(view(address, t.nbytes))
        except BaseException:
            for key in keys:
                self.mappings.release(key)
            raise
        mapped = MappedRegion(export_id, num_blocks, keys, views)
        self.regions[name] = mapped
        return mapped

    def drop(self, name: str) -> None:
        """Forget ``name``'s mapping; unmapped now, or when its last copy completes."""
        mapped = self.regions.pop(name, None)
        if mapped is not None:
            mapped.dropped = True
            if not mapped.busy:
                self._unmap(mapped)

    def drop_all(self) -> None:
        for name in list(self.regions):
            self.drop(name)

    def copy_done(self, mapped: MappedRegion) -> None:
        """A copy using ``mapped`` completed (its event did, or was given up on)."""
        mapped.busy -= 1
        if mapped.dropped and not mapped.busy:
            self._unmap(mapped)

    def _unmap(self, mapped: MappedRegion) -> None:
        mapped.views.clear()  # no view outlives its mapping
        for key in mapped.keys:
            self.mappings.release(key)
        mapped.keys.clear()

    @property
    def idle(self) -> bool:
        """Nothing mapped any more (the entry can go)."""
        return self.mappings.open_count == 0 and not self.regions
