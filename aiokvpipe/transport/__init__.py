"""Transport backends and the rule that picks one for a link.

Backends are imported lazily by name (as anyio loads its backends), so a
CPU-only install never imports cupy or NCCL.
"""

from __future__ import annotations

from importlib import import_module

from ..errors import ConfigError
from .base import (
    PROCESS_ID,
    Link,
    LinkConfig,
    OutgoingMessage,
    PeerInfo,
    RecvChannel,
    SendChannel,
    Transport,
)

__all__ = [
    "PROCESS_ID",
    "Link",
    "LinkConfig",
    "OutgoingMessage",
    "PeerInfo",
    "RecvChannel",
    "SendChannel",
    "Transport",
    "choose_transport",
    "load_transport",
]

_MODULES = {
    "tcp": ("aiokvpipe.transport.tcp", "TcpTransport"),
    "shm": ("aiokvpipe.transport.shm", "ShmTransport"),
    "nccl": ("aiokvpipe.transport.nccl", "NcclTransport"),
    "cuda_ipc": ("aiokvpipe.transport.cuda_ipc", "CudaIpcTransport"),
}


def load_transport(name: str) -> type[Transport]:
    try:
        module_name, class_name = _MODULES[name]
    except KeyError:
        raise ConfigError("transport", f"unknown transport {name!r}") from None
    cls: type[Transport] = getattr(import_module(module_name), class_name)
    return cls


def _is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def choose_transport(sender: PeerInfo, receiver: PeerInfo) -> str:
    """The transport for the link ``sender -> receiver``.

    Pure and symmetric in what it reads, so both ends agree without talking.
    """
    if sender.transport != receiver.transport:
        raise ConfigError(
            "transport",
            f"{sender.label} asks for {sender.transport!r} but {receiver.label} "
            f"asks for {receiver.transport!r}; both ends of a link must agree",
        )
    same_host = sender.host_id == receiver.host_id
    both_cuda = _is_cuda(sender.device) and _is_cuda(receiver.device)
    both_cpu = sender.device == receiver.device == "cpu"
    wanted = sender.transport
    if wanted == "auto":
        if both_cuda:
            return "cuda_ipc" if same_host else "nccl"
        # One host, CPU on both ends: shared memory (~3x loopback TCP).
        return "shm" if same_host and both_cpu else "tcp"
    if wanted in ("shm", "cuda_ipc") and not same_host:
        raise ConfigError(
            "transport",
            f"{wanted!r} needs both ranks on one host, but {sender.label} and "
            f"{receiver.label} are on different hosts",
        )
    if wanted == "shm" and not both_cpu:
        raise ConfigError(
            "transport",
            f"'shm' moves CPU tensors: both ranks need device='cpu' ({sender.label}: "
            f"{sender.device}, {receiver.label}: {receiver.device}); on GPUs use 'cuda_ipc'",
        )
    if wanted in ("nccl", "cuda_ipc") and not both_cuda:
        raise ConfigError(
            "transport",
            f"{wanted!r} moves GPU tensors: both ranks need device='cuda[:N]' "
            f"({sender.label}: {sender.device}, {receiver.label}: {receiver.device})",
        )
    return wanted
