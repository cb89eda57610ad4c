"""Objects <-> ring messages, with array payloads kept out of the pickle.

Message kinds (the kind byte travels in each chunk's descriptor):

* ``RAW``: a chunk filled through ``acquire_write``; read back as bytes.
* ``BYTES``: bytes, bytearray or memoryview, written as-is.
* ``PICKLE``: anything else with no large buffers: one pickle stream.
* ``OOB``: pickle protocol 5 with out-of-band buffers (numpy arrays, CPU
  torch tensors). The buffers are copied straight from the caller's memory
  into the ring and, on receipt, copied once into one aligned allocation that
  the returned arrays/tensors view: no extra copies on either side.

OOB message layout (offsets from the start of the message)::

    [nbufs u32][pad u32][pickle_len u64][len_0 u64 .. len_{n-1} u64]
    [pickle bytes][pad to 64][buffer 0][pad to 64][buffer 1] ...

Security: unpickling runs code chosen by the writer. Rings are same-host,
same-user (segments are mode 0600); do not attach to a ring whose writer you
would not let run code as you.
"""

from __future__ import annotations

import io
import pickle
import struct
import sys
from typing import Any, cast

import numpy as np

__all__ = ["BYTES", "OOB", "PICKLE", "RAW", "Encoded", "aligned_empty", "decode", "encode"]

RAW = 0
BYTES = 1
PICKLE = 2
OOB = 3
KINDS = (RAW, BYTES, PICKLE, OOB)

_ALIGN = 64
_OOB_HEAD = struct.Struct("<IIQ")
_LEN = struct.Struct("<Q")

Part = tuple[int, memoryview]


def _align(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


class Encoded:
    """A message ready to copy: kind, total length, and (offset, bytes) parts."""

    __slots__ = ("kind", "parts", "total")

    def __init__(self, kind: int, total: int, parts: list[Part]) -> None:
        self.kind = kind
        self.total = total
        self.parts = parts


def _byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.format != "B" or not view.c_contiguous:
        view = memoryview(view.tobytes()) if not view.c_contiguous else view.cast("B")
    return view


def _rebuild_tensor(buffer: Any, dtype: Any, shape: tuple[int, ...], requires_grad: bool) -> Any:
    """Unpickle hook for a CPU tensor whose bytes travelled out of band."""
    import torch

    raw = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, dtype=np.uint8)
    if raw.size == 0:
        tensor = torch.empty(shape, dtype=dtype)
    else:
        tensor = torch.from_numpy(raw).view(dtype).reshape(shape)
    if requires_grad:
        tensor.requires_grad_(True)
    return tensor


class _OutOfBandPickler(pickle.Pickler):
    """Sends dense CPU tensors as (dtype, shape, out-of-band bytes).

    torch's own reduction goes through ``torch.save`` into an in-band byte
    string (several copies); this one exposes the tensor's memory directly.
    """

    def __init__(
        self, file: io.BytesIO, buffers: list[pickle.PickleBuffer], tensor_type: type
    ) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffers.append)
        self._tensor_type = tensor_type

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, self._tensor_type):
            return NotImplemented
        import torch

        t = cast(torch.Tensor, obj)
        if t.device.type != "cpu" or t.layout is not torch.strided or t.is_quantized:
            return NotImplemented
        d = t.detach().resolve_conj().resolve_neg().contiguous()
        grad = bool(t.requires_grad and t.is_leaf)
        return (
            _rebuild_tensor,
            (pickle.PickleBuffer(_tensor_bytes(d)), d.dtype, tuple(d.shape), grad),
        )


def _tensor_bytes(tensor: Any) -> memoryview:
    """The bytes of a dense CPU tensor; the view keeps the tensor's memory alive."""
    import torch

    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def encode(obj: Any) -> Encoded:
    """Turn ``obj`` into parts that can be copied into ring chunks."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        view = _byte_view(obj)
        return Encoded(BYTES, view.nbytes, [(0, view)])
    buffers: list[pickle.PickleBuffer] = []
    torch = sys.modules.get("torch")
    if torch is not None:
        stream = io.BytesIO()
        _OutOfBandPickler(stream, buffers, torch.Tensor).dump(obj)
        data = stream.getbuffer()
    else:
        data = memoryview(pickle.dumps(obj, protocol=5, buffer_callback=buffers.append))
    if not buffers:
        return Encoded(PICKLE, data.nbytes, [(0, data)])
    views = [b.raw() for b in buffers]
    head = bytearray(_OOB_HEAD.pack(len(views), 0, data.nbytes))
    for v in views:
        head += _LEN.pack(v.nbytes)
    parts: list[Part] = [(0, memoryview(head)), (len(head), data)]
    offset = end = _align(len(head) + data.nbytes)
    for v in views:
        parts.append((offset, v))
        end = offset + v.nbytes
        offset = _align(end)
    return Encoded(OOB, end, parts)


def aligned_empty(nbytes: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """A writable uint8 array of ``nbytes`` whose data starts on a 64-byte boundary."""
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + nbytes]


def decode(kind: int, view: memoryview, owned: np.ndarray[Any, Any] | None = None) -> Any:
    """Rebuild an object from its message bytes.

    ``view`` may be ring memory that is reused as soon as this returns, so
    everything kept is copied out of it. ``owned`` is the same bytes in a
    private array (a message assembled from several chunks): buffers then
    view it directly instead of being copied again.
    """
    if kind in (BYTES, RAW):
        return bytes(view)
    if kind == PICKLE:
        return pickle.loads(view)
    if kind != OOB:
        raise ValueError(f"unknown message kind {kind}")
    nbufs, _, pickle_len = _OOB_HEAD.unpack_from(view, 0)
    lengths = [_LEN.unpack_from(view, _OOB_HEAD.size + 8 * i)[0] for i in range(nbufs)]
    pickle_at = _OOB_HEAD.size + 8 * nbufs
    first = _align(pickle_at + pickle_len)
    if owned is None:
        # One copy of every buffer, in one allocation, keeping relative alignment.
        store = aligned_empty(max(view.nbytes - first, 0))
        if store.size:
            store[:] = np.frombuffer(view, dtype=np.uint8, offset=first)
        base = -first
    else:
        store, base = owned, 0
    buffers: list[np.ndarray[Any, Any]] = []
    offset = first
    for n in lengths:
        buffers.append(store[base + offset : base + offset + n])
        offset = _align(offset + n)
    return pickle.loads(view[pickle_at : pickle_at + pickle_len], buffers=buffers)
