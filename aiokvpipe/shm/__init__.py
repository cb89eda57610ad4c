"""Shared-memory broadcast ring: one writer, N readers, one host.

``ShmRingBuffer`` is the segment; ``ShmRingBufferIO`` is an async endpoint on
it. See docs/shm.md for the layout, the waiting scheme and memory ordering.
"""

from .io import ShmRingBufferIO
from .ring import ShmRingBuffer, ShmRingHandle

__all__ = ["ShmRingBuffer", "ShmRingBufferIO", "ShmRingHandle"]
