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

They live in :mod:`.fake_device` (device, streams, events, ops),
:mod:`.fake_nccl` (NCCL) and :mod:`.fake_gpu` (the block service's GPU
backend and IPC); import them from here.

Links for the fakes to run over live one layer up, in
:mod:`aiokvpipe.transport.testing` (``cuda/`` never imports ``transport/``).
"""

from __future__ import annotations

from .fake_device import FakeDevice, FakeEvent, FakeOps, FakeStream
from .fake_gpu import FakeGpu, FakeIpc, FakeIpcMemory
from .fake_nccl import FakeComm, FakeNccl, FakeNcclError

__all__ = [
    "FakeDevice",
    "FakeEvent",
    "FakeStream",
    "FakeOps",
    "FakeNcclError",
    "FakeComm",
    "FakeNccl",
    "FakeIpc",
    "FakeIpcMemory",
    "FakeGpu",
]
