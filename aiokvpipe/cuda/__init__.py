"""The GPU layer under the CUDA transports: awaiting CUDA work, staging, probing.

Nothing here imports cupy at import time; :mod:`.runtime` does so on demand
and turns its absence into :class:`~aiokvpipe.errors.CudaUnavailableError`.
"""

from .events import wait_event, wait_stream
from .runtime import cuda_available, require_cuda, require_usable_device
from .staging import to_device, to_host

__all__ = [
    "cuda_available",
    "require_cuda",
    "require_usable_device",
    "to_device",
    "to_host",
    "wait_event",
    "wait_stream",
]
