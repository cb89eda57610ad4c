"""aiokvpipe: asyncio-native tensor pipes and shared-memory rings."""

from .config import PipeConfig
from .errors import (
    AiokvpipeError,
    AuthenticationError,
    ConfigError,
    CudaUnavailableError,
    FrameTooLargeError,
    KVBufferError,
    PeerClosedError,
    PipeClosedError,
    ProtocolError,
    SlowReaderError,
    TransferTimeout,
    UnsupportedTensorError,
)
from .kv_buffer import KVBufferStats, KVLookupBuffer
from .pipe import Pipe, Transfer
from .semaphore import ByteSemaphore

__version__ = "0.1.0"

__all__ = [
    "AiokvpipeError",
    "AuthenticationError",
    "ByteSemaphore",
    "ConfigError",
    "CudaUnavailableError",
    "FrameTooLargeError",
    "KVBufferError",
    "KVBufferStats",
    "KVLookupBuffer",
    "PeerClosedError",
    "Pipe",
    "PipeClosedError",
    "PipeConfig",
    "ProtocolError",
    "SlowReaderError",
    "Transfer",
    "TransferTimeout",
    "UnsupportedTensorError",
]
