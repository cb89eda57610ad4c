"""aiokvpipe: asyncio-native tensor pipes and shared-memory rings.

The torch-backed names (Pipe, Transfer, KVLookupBuffer, KVBufferStats) load
on first use (PEP 562), so ``import aiokvpipe.shm`` in a spawned worker does
not pay for importing torch unless it needs it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .config import EndpointConfig, PipeConfig
from .errors import (
    AiokvpipeError,
    AuthenticationError,
    ConfigError,
    CudaUnavailableError,
    FrameTooLargeError,
    KVBufferError,
    PeerClosedError,
    PeerUnreachableError,
    PipeClosedError,
    ProtocolError,
    ReaderGoneError,
    SlowReaderError,
    TransferTimeout,
    UnsupportedTensorError,
    WriterGoneError,
)
from .ports import free_port
from .semaphore import ByteSemaphore

if TYPE_CHECKING:
    from .blocks import Lease
    from .endpoint import Endpoint
    from .kv_buffer import KVBufferStats, KVLookupBuffer
    from .pipe import Pipe, Transfer

_LAZY = {
    "Endpoint": ".endpoint",
    "Lease": ".blocks",
    "Pipe": ".pipe",
    "Transfer": ".pipe",
    "KVLookupBuffer": ".kv_buffer",
    "KVBufferStats": ".kv_buffer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aiokvpipe' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "AiokvpipeError",
    "AuthenticationError",
    "ByteSemaphore",
    "ConfigError",
    "CudaUnavailableError",
    "Endpoint",
    "EndpointConfig",
    "FrameTooLargeError",
    "KVBufferError",
    "KVBufferStats",
    "KVLookupBuffer",
    "Lease",
    "PeerClosedError",
    "PeerUnreachableError",
    "Pipe",
    "PipeClosedError",
    "PipeConfig",
    "ProtocolError",
    "ReaderGoneError",
    "SlowReaderError",
    "Transfer",
    "TransferTimeout",
    "UnsupportedTensorError",
    "WriterGoneError",
    "free_port",
]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
