"""Link pairs for tests of the transports (the GPU ones run them over the fakes).

Like :mod:`aiokvpipe.cuda.testing`: shipped with the package, used by its
tests, never by the library itself.
"""

from __future__ import annotations

import os
import socket

from ..config import PipeConfig
from .base import PROCESS_ID, Link, PeerInfo


def peer_info(
    rank: int,
    *,
    pid: int | None = None,
    host_id: str = "test-host",
    device: str = "cpu",
    transport: str = "auto",
) -> PeerInfo:
    return PeerInfo(
        rank=rank,
        address="127.0.0.1",
        port=1,
        host_id=host_id,
        pid=os.getpid() if pid is None else pid,
        device=device,
        transport=transport,
        # another pid stands for another process: give it another process id
        process_id=PROCESS_ID if pid in (None, os.getpid()) else f"process-{pid}",
    )


def link_pair(
    config: PipeConfig | None = None,
    *,
    sender_pid: int | None = None,
    receiver_pid: int | None = None,
) -> tuple[Link, Link]:
    """``(send_link, recv_link)`` joined by a non-blocking socketpair (rank 0 -> rank 1)."""
    cfg = config if config is not None else PipeConfig(rank=0, connect_timeout=10.0)
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    sender = peer_info(0, pid=sender_pid, device=cfg.device)
    receiver = peer_info(1, pid=receiver_pid, device=cfg.device)
    return (
        Link(cfg, a, "send", sender, receiver),
        Link(cfg.with_changes(rank=1), b, "recv", receiver, sender),
    )
