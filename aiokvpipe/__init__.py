"""aiokvpipe: asyncio-native tensor pipes and shared-memory rings."""

from .config import PipeConfig
from .errors import (
    AiokvpipeError,
    AuthenticationError,
    ConfigError,
    CudaUnavailableError,
    FrameTooLargeError,
    PeerClosedError,
    PipeClosedError,
    ProtocolError,
    SlowReaderError,
    TransferTimeout,
    UnsupportedTensorError,
)
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
