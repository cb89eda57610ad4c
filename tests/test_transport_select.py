"""Which transport a link gets, and loading it by name without CUDA present."""

from __future__ import annotations

import pytest

from aiokvpipe.errors import ConfigError
from aiokvpipe.transport import PeerInfo, Transport, choose_transport, load_transport
from aiokvpipe.transport.cuda_ipc import CudaIpcTransport
from aiokvpipe.transport.nccl import NcclTransport


def peer(
    rank: int, device: str = "cpu", transport: str = "auto", host: str = "host-a", pid: int = 100
) -> PeerInfo:
    return PeerInfo(
        rank=rank,
        address="10.0.0.1",
        port=5000 + rank,
        host_id=host,
        pid=pid + rank,
        device=device,
        transport=transport,
    )


@pytest.mark.parametrize(
    ("sender", "receiver", "expected"),
    [
        # auto: CPU on both ends of one host -> shared memory; across hosts -> tcp
        (peer(0), peer(1), "shm"),
        (peer(0, pid=7), peer(1, pid=7), "shm"),
        (peer(0, host="a"), peer(1, host="b"), "tcp"),
        # auto: GPU on both ends of one host -> CUDA IPC (any devices, any processes)
        (peer(0, "cuda:0"), peer(1, "cuda:1"), "cuda_ipc"),
        (peer(0, "cuda"), peer(1, "cuda:0"), "cuda_ipc"),
        (peer(0, "cuda:0", pid=7), peer(1, "cuda:0", pid=7), "cuda_ipc"),
        # auto: GPU on both ends, different hosts -> NCCL
        (peer(0, "cuda:0", host="a"), peer(1, "cuda:0", host="b"), "nccl"),
        # auto: GPU on one end only -> tcp, staging through pinned host memory
        (peer(0, "cuda:0"), peer(1, "cpu"), "tcp"),
        (peer(0, "cpu", host="a"), peer(1, "cuda:3", host="b"), "tcp"),
        # explicit names force a backend where it can work
        (peer(0, "cuda:0", "tcp"), peer(1, "cuda:0", "tcp"), "tcp"),
        (peer(0, "cuda:0", "nccl"), peer(1, "cuda:1", "nccl"), "nccl"),
        (peer(0, "cuda:0", "cuda_ipc"), peer(1, "cuda:0", "cuda_ipc"), "cuda_ipc"),
        (peer(0, "cpu", "shm"), peer(1, "cpu", "shm"), "shm"),
    ],
)
def test_choice(sender: PeerInfo, receiver: PeerInfo, expected: str) -> None:
    assert choose_transport(sender, receiver) == expected


@pytest.mark.parametrize(
    ("sender", "receiver", "field_text"),
    [
        (peer(0, "cuda:0", "nccl"), peer(1, "cuda:0", "auto"), "both ends of a link must agree"),
        (
            peer(0, "cuda:0", "cuda_ipc", host="a"),
            peer(1, "cuda:0", "cuda_ipc", host="b"),
            "needs both ranks on one host",
        ),
        (peer(0, "cpu", "nccl"), peer(1, "cuda:0", "nccl"), "moves GPU tensors"),
        (peer(0, "cuda:0", "cuda_ipc"), peer(1, "cpu", "cuda_ipc"), "moves GPU tensors"),
        (peer(0, "cpu", "shm", host="a"), peer(1, "cpu", "shm", host="b"), "one host"),
        (peer(0, "cuda:0", "shm"), peer(1, "cpu", "shm"), "moves CPU tensors"),
        (peer(0, "cpu", "shm"), peer(1, "cuda:1", "shm"), "moves CPU tensors"),
    ],
)
def test_impossible_choices_are_config_errors(
    sender: PeerInfo, receiver: PeerInfo, field_text: str
) -> None:
    with pytest.raises(ConfigError, match=field_text) as info:
        choose_transport(sender, receiver)
    assert info.value.field == "transport"


def test_gpu_transports_load_without_cupy() -> None:
    nccl = load_transport("nccl")
    ipc = load_transport("cuda_ipc")
    assert nccl is NcclTransport and nccl.name == "nccl"
    assert ipc is CudaIpcTransport and ipc.name == "cuda_ipc"
    assert issubclass(nccl, Transport) and issubclass(ipc, Transport)


def test_unknown_transport_name() -> None:
    with pytest.raises(ConfigError, match="unknown transport 'ucx'"):
        load_transport("ucx")
