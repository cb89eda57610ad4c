"""Registered paged memory: which bytes are block ``i`` of layer ``l``.

A region is one tensor or a list of them (vLLM keeps one per layer), all
with the same number of blocks on ``block_dim``. With vLLM's CPU layout
``[2, num_blocks, block_size, kv_heads, head_dim]`` and ``block_dim=1``, a run
of adjacent blocks in one tensor is ``prod(shape[:block_dim])`` (= 2: K and
V) contiguous byte segments, which go to the kernel as they are: no gather.

The byte stream of a transfer is fixed by the id list, not by memory:
for each layer, for each outer index (K, V), the blocks in list order. Both
sides agree on it without agreeing on where their blocks sit, so each side
coalesces its own adjacent ids (:func:`aiokvpipe.blocks.runs.coalesce`).

Regions live in host memory or on one GPU (every tensor on the same device).
Host regions hand the socket or the shared-memory ring ``memoryview`` s of
their blocks; GPU regions are described by the same byte ranges
(:meth:`BlockRegion.ranges`) over a flat ``uint8`` view of each tensor, which
the GPU paths copy on a transport stream (:mod:`aiokvpipe.blocks.gpu`).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import (
    BlockIdError,
    BlockShapeError,
    RegionError,
    UnknownRegionError,
    UnsupportedTensorError,
)
from ..tensors import byte_view
from ..wire import CODE_DTYPES, dtype_code
from .runs import as_ids, check_ids, coalesce
from .sgio import ViewPlan

# Byte ranges of recent id lists kept per region (see BlockRegion._ranges_of),
# counted in ranges: a few MiB at most, whatever the requests' sizes.
_RANGE_CACHE_RANGES = 1 << 16


@dataclass(frozen=True)
class TensorLayout:
    """What both sides must agree on for one tensor of a region."""

    dtype: torch.dtype
    outer: tuple[int, ...]  # shape before block_dim
    inner: tuple[int, ...]  # shape of one block

    @property
    def block_bytes(self) -> int:
        return math.prod(self.inner) * self.dtype.itemsize

    def describe(self) -> str:
        dims = ", ".join(str(d) for d in (*self.outer, "N", *self.inner))
        return f"{str(self.dtype).removeprefix('torch.')}[{dims}]"

    def to_wire(self) -> list[Any]:
        return [dtype_code(self.dtype), list(self.outer), list(self.inner)]


#: Where a tensor's memory is: None for host memory, else a device key
#: (``"cuda:0"``) the service's GPU backend understands; RegionError if neither.
Placement = Callable[[torch.Tensor], "str | None"]


def host_or_cuda(tensor: torch.Tensor) -> str | None:
    """The default placement: CPU memory, or a CUDA device by its index."""
    if tensor.device.type == "cpu":
        return None
    if tensor.device.type == "cuda":
        return str(tensor.device)
    raise RegionError(f"is on {tensor.device}; only CPU or CUDA memory can be registered")


@dataclass(frozen=True)
class _BlockTensor:
    tensor: torch.Tensor  # held so ``view`` and ``flat`` stay valid
    view: memoryview  # every byte of the tensor (host regions; empty on a GPU)
    flat: torch.Tensor  # every byte of the tensor, as a 1-D uint8 view (any device)
    layout: TensorLayout
    outer_count: int  # prod(layout.outer)

    @property
    def nbytes(self) -> int:
        return int(self.flat.numel())


class BlockRegion:
    """One registered region; built only through :meth:`RegionTable.register`."""

    def __init__(
        self,
        name: str,
        tensors: Sequence[torch.Tensor],
        block_dim: int,
        placement: str | None = None,
    ) -> None:
        self.name = name
        self.block_dim = block_dim
        self.num_blocks = int(tensors[0].shape[block_dim])
        #: None: host memory; else the device every tensor lives on.
        self.placement = placement
        #: Names this registration; a peer's cached GPU mapping of an older
        #: registration under the same name is recognised as stale by it.
        self.export_id = secrets.token_hex(8)
        self._tensors = tuple(self._prepare(t) for t in tensors)
        self._range_cache: dict[tuple[tuple[int, ...], int, int], tuple[list[int], list[int]]] = {}
        self._range_cached = 0  # ranges held by _range_cache

    @property
    def on_device(self) -> bool:
        """The region lives in GPU memory (payloads need a GPU path or staging)."""
        return self.placement is not None

    @property
    def num_layers(self) -> int:
        """Tensors in the region; ``layers=`` indexes them."""
        return len(self._tensors)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t.tensor for t in self._tensors)

    def layout(self, layer: int) -> TensorLayout:
        return self._tensors[layer].layout

    def _prepare(self, tensor: torch.Tensor) -> _BlockTensor:
        dim = self.block_dim
        shape = tuple(int(d) for d in tensor.shape)
        layout = TensorLayout(tensor.dtype, shape[:dim], shape[dim + 1 :])
        view = byte_view(tensor) if self.placement is None else memoryview(b"")
        flat = tensor.reshape(-1).view(torch.uint8)
        return _BlockTensor(tensor, view, flat, layout, math.prod(layout.outer))

    def flat(self, layer: int) -> torch.Tensor:
        """Every byte of tensor ``layer`` as a 1-D uint8 view (on its device)."""
        return self._tensors[layer].flat

    def tensor_bytes(self, layer: int) -> int:
        return self._tensors[layer].nbytes

    def outer_count(self, layer: int) -> int:
        return self._tensors[layer].outer_count

    # -- checks ------------------------------------------------------------
    def check_blocks(self, argument: str, ids: Any) -> tuple[int, ...]:
        """``ids`` as a tuple, or :class:`BlockIdError` naming ``argument``."""
        out = as_ids(argument, ids)
        check_ids(argument, out, self.num_blocks, f"region {self.name!r}")
        return out

    def check_layers(self, argument: str, layers: Any) -> tuple[int, ...]:
        """``layers`` (None: all) as a tuple of valid tensor indexes."""
        if layers is None:
            return tuple(range(self.num_layers))
        out = as_ids(argument, layers)
        if not out:
            raise BlockIdError(argument, (), "an empty list of layers moves nothing")
        check_ids(
            argument, out, self.num_layers, f"region {self.name!r}'s tensor list", noun="layer"
        )
        return out

    def check_layouts(self, layers: Sequence[int], theirs: Sequence[TensorLayout]) -> None:
        """Refuse a peer whose blocks differ from ours in dtype or shape."""
        if len(theirs) != len(layers):
            raise BlockShapeError(
                f"region {self.name!r}: peer described {len(theirs)} layers for {len(layers)}"
            )
        for layer, other in zip(layers, theirs, strict=True):
            mine = self._tensors[layer].layout
            if mine != other:
                raise BlockShapeError(
                    f"region {self.name!r} layer {layer}: blocks here are {mine.describe()}, "
                    f"the peer's are {other.describe()}"
                )

    # -- the byte stream ---------------------------------------------------
    def nbytes(self, count: int, layers: Sequence[int]) -> int:
        """Bytes of ``count`` blocks on ``layers``."""
        return count * sum(
            self._tensors[i].outer_count * self._tensors[i].layout.block_bytes for i in layers
        )

    def _layer_runs(
        self, ids: Sequence[int], layers: Sequence[int]
    ) -> list[tuple[int, list[int], list[int]]]:
        """Per layer that holds bytes: ``(layer, first bytes, lengths)`` of its
        block runs, in stream order (outer index, then run)."""
        ids = ids if isinstance(ids, tuple) else tuple(ids)
        out: list[tuple[int, list[int], list[int]]] = []
        for layer in layers:
            t = self._tensors[layer]
            size = t.layout.block_bytes
            if size:
                out.append((layer, *self._ranges_of(ids, t.outer_count, size)))
        return out

    def _ranges_of(
        self, ids: tuple[int, ...], outer_count: int, size: int
    ) -> tuple[list[int], list[int]]:
        """``(first bytes, lengths)`` of ``ids``' runs in a tensor of this shape.

        Cached by id list: a layer-wise push sends the same ids once per
        layer, and the layers of a model share one shape, so the owner and
        the writer coalesce a request once, not once per write. Measured
        before: 100 us of each pipelined write's ~0.7 ms between payloads
        on the owner (256 scattered blocks, code run cold after a 16 MiB
        copy). The lists are shared: nothing may change them.
        """
        key = (ids, outer_count, size)
        cache = self._range_cache
        hit = cache.get(key)
        if hit is not None:
            return hit
        runs = coalesce(ids)
        stride = self.num_blocks * size
        starts: list[int] = []
        for o in range(outer_count):
            base = o * stride
            starts += [base + start * size for start, _ in runs]
        hit = (starts, [n * size for _, n in runs] * outer_count)
        if len(starts) <= _RANGE_CACHE_RANGES // 4:
            while cache and self._range_cached + len(starts) > _RANGE_CACHE_RANGES:
                self._range_cached -= len(cache.pop(next(iter(cache)))[0])  # the oldest
            cache[key] = hit
            self._range_cached += len(starts)
        return hit

    def ranges(self, ids: Sequence[int], layers: Sequence[int]) -> list[tuple[int, int, int]]:
        """``(layer, first byte, length)`` of the blocks in stream order (layer, outer, run)."""
        return [
            (layer, begin, n)
            for layer, starts, lengths in self._layer_runs(ids, layers)
            for begin, n in zip(starts, lengths, strict=True)
        ]

    def segments(self, ids: Sequence[int], layers: Sequence[int]) -> ViewPlan:
        """The blocks of a host region as byte ranges in stream order (see
        :meth:`ranges`), made into views only as the transfer reaches them."""
        if self.placement is not None:
            raise RegionError(f"region {self.name!r} is on {self.placement}, not in host memory")
        per_layer = self._layer_runs(ids, layers)
        bases = [self._tensors[layer].view for layer, _, _ in per_layer]
        if len(per_layer) == 1:  # one layer (a layer-wise write): the cached lists as they are
            _, starts, lengths = per_layer[0]
            return ViewPlan(bases, [0] * len(starts), starts, lengths)
        which: list[int] = []
        starts = []
        lengths = []
        for index, (_, layer_starts, layer_lengths) in enumerate(per_layer):
            which += [index] * len(layer_starts)
            starts += layer_starts
            lengths += layer_lengths
        return ViewPlan(bases, which, starts, lengths)


def layout_from_wire(obj: Any) -> TensorLayout:
    """A peer's layout description, validated (raises ValueError)."""
    if not (isinstance(obj, list) and len(obj) == 3):
        raise ValueError("layout must be [dtype code, outer dims, block dims]")
    code, outer, inner = obj
    if not isinstance(code, int) or isinstance(code, bool) or code not in CODE_DTYPES:
        raise ValueError(f"unknown dtype code {code!r}")
    dims = []
    for part in (outer, inner):
        if not isinstance(part, list) or len(part) > 14:
            raise ValueError("layout dims must be a list of at most 14 ints")
        for d in part:
            if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < 1 << 48:
                raise ValueError(f"bad dim {d!r}")
        dims.append(tuple(part))
    return TensorLayout(CODE_DTYPES[code], dims[0], dims[1])


def _check_tensor(
    name: str, index: int, tensor: Any, block_dim: int, placement: Placement
) -> str | None:
    """Refuse what cannot hold blocks; the tensor's placement (None: host memory)."""
    where = f"register({name!r}): tensor {index}"
    if not isinstance(tensor, torch.Tensor):
        raise RegionError(f"{where} is a {type(tensor).__name__}, not a torch.Tensor")
    try:
        where_it_is = placement(tensor)
    except RegionError as exc:
        raise RegionError(f"{where} {exc}") from None
    if tensor.layout is not torch.strided:
        raise RegionError(f"{where} has layout {tensor.layout}; only dense tensors hold blocks")
    if not tensor.is_contiguous():
        raise RegionError(
            f"{where} is not contiguous (strides {tuple(tensor.stride())}); blocks are "
            "moved as byte ranges, so register the tensor that owns the memory"
        )
    if tensor.is_conj() or tensor.is_neg():
        raise RegionError(f"{where} has a lazy conj/neg bit; its bytes are not its values")
    if not 0 <= block_dim < tensor.dim():
        raise RegionError(
            f"{where} has shape {tuple(tensor.shape)}: block_dim={block_dim} is not one of its dims"
        )
    try:
        dtype_code(tensor.dtype)
    except UnsupportedTensorError as exc:
        raise RegionError(f"{where}: {exc}") from exc
    return where_it_is


class RegionTable:
    """The regions of one endpoint, by name."""

    def __init__(self) -> None:
        self._regions: dict[str, BlockRegion] = {}

    def register(
        self, name: str, tensors: Any, block_dim: int, placement: Placement = host_or_cuda
    ) -> BlockRegion:
        """Validate and add a region; see :class:`BlockRegion` for the layout rules.

        ``placement`` says where each tensor's memory is; every tensor of a
        region must be in the same place (host memory, or one GPU)."""
        if not isinstance(name, str) or not name or len(name) > 256:
            raise RegionError(f"register: region name must be a non-empty str, not {name!r}")
        if name in self._regions:
            raise RegionError(f"register({name!r}): a region of this name is already registered")
        listed = list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]
        if not listed:
            raise RegionError(f"register({name!r}): no tensors given")
        if isinstance(block_dim, bool) or not isinstance(block_dim, int):
            raise RegionError(f"register({name!r}): block_dim must be an int, not {block_dim!r}")
        places = [_check_tensor(name, i, t, block_dim, placement) for i, t in enumerate(listed)]
        if len(set(places)) != 1:
            shown = ", ".join(p or "cpu" for p in places)
            raise RegionError(
                f"register({name!r}): every tensor of a region must be on one device, not {shown}"
            )
        counts = [int(t.shape[block_dim]) for t in listed]
        if len(set(counts)) != 1:
            raise RegionError(
                f"register({name!r}): tensors hold different numbers of blocks on "
                f"dim {block_dim}: {counts}"
            )
        region = BlockRegion(name, listed, block_dim, places[0])
        self._regions[name] = region
        return region

    def unregister(self, name: str) -> BlockRegion:
        try:
            return self._regions.pop(name)
        except KeyError:
            raise UnknownRegionError(name) from None

    def find(self, name: str) -> BlockRegion | None:
        return self._regions.get(name)

    def get(self, name: str, where: str = "") -> BlockRegion:
        region = self._regions.get(name)
        if region is None:
            raise UnknownRegionError(name, where)
        return region

    def __contains__(self, name: object) -> bool:
        return name in self._regions

    def largest_nbytes(self) -> int:
        """Bytes of every block on every layer of the largest region (0: none registered)."""
        return max(
            (r.nbytes(r.num_blocks, range(r.num_layers)) for r in self._regions.values()),
            default=0,
        )
