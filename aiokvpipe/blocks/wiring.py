"""Plugging a BlockService into whatever owns the links (the Endpoint).

The owner of the links needs three hooks, which the Endpoint has as
``serve(purpose, handler)``, ``dial(address, purpose)`` and
``on_peer_event(callback)`` (see :class:`LinkHost`). Block connections are
dialled with purpose ``"blocks"``; leases and transfers are bound to the
peer's *instance* id, so a restarted peer on the same address is a
different peer, and a ``PeerEvent`` for the old instance fails exactly what
the old one held. Payloads move through shared memory when both ends are
on one host and allow it (:func:`~aiokvpipe.blocks.shmpath.may_share_memory`
on the two PeerInfos, and ``transport="auto"``, the default); GPU regions
copy through CUDA IPC under the same host rule
(:func:`~aiokvpipe.blocks.gpu.may_map_device_memory`), and move by NCCL
between hosts (:func:`~aiokvpipe.blocks.ncclpath.may_use_nccl`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..links.accept import Handler, Incoming
from ..links.dial import Dialed
from ..transport.base import PeerInfo
from .gpu import may_map_device_memory
from .ncclpath import may_use_nccl
from .service import BlockService, Dialled
from .shmpath import may_share_memory

PURPOSE = "blocks"


class PeerEventLike(Protocol):
    @property
    def instance(self) -> str: ...
    @property
    def error(self) -> BaseException: ...


class LinkHost(Protocol):
    """What :func:`attach` needs from the owner of the links (an Endpoint)."""

    @property
    def local(self) -> PeerInfo: ...

    def serve(self, purpose: str, handler: Handler) -> None: ...

    async def dial(
        self,
        address: str,
        purpose: str,
        *,
        extra: dict[str, Any] | None = None,
        retry_refused: bool = True,
    ) -> Dialed: ...

    def on_peer_event(self, callback: Callable[[Any], None]) -> Callable[[], None]: ...


def peer_key(peer: PeerInfo | None, address: str) -> str:
    """What leases and transfers are bound to: the instance, else the address."""
    return peer.instance if peer is not None and peer.instance else address


def _same_process(local: PeerInfo, peer: PeerInfo | None) -> bool:
    return peer is not None and peer.process_id == local.process_id


def attach(host: LinkHost, **options: Any) -> BlockService:
    """A BlockService serving and dialling block connections over ``host``'s links.

    ``options`` go to :class:`BlockService` (``op_timeout``, ``transport``,
    ...). Close the service (``await service.aclose()``) before the host.
    """

    async def dial(address: str) -> Dialled:
        # Leases live and die with the owner's instance: if nothing listens
        # at its address, no instance there holds ours, and waiting out
        # connect_timeout for a restart would only stall the reader.
        dialed = await host.dial(address, PURPOSE, retry_refused=False)
        peer = dialed.peer
        return Dialled(
            dialed.sock,
            peer_key(peer, address),
            may_share_memory(host.local, peer),
            may_map_device_memory(host.local, peer),
            _same_process(host.local, peer),
            may_use_nccl(host.local, peer),
        )

    service = BlockService(dial, **options)

    async def on_blocks(incoming: Incoming) -> None:
        await incoming.accept(host.local)
        peer = incoming.peer
        service.accept(
            incoming.sock,
            peer_key(peer, peer.endpoint),
            peer.label,
            shared_memory=may_share_memory(host.local, peer),
            ipc=may_map_device_memory(host.local, peer),
            in_process=_same_process(host.local, peer),
            nccl=may_use_nccl(host.local, peer),
        )

    def on_event(event: PeerEventLike) -> None:
        service.peer_lost(event.instance, event.error)

    host.serve(PURPOSE, on_blocks)
    service.on_close(host.on_peer_event(on_event))
    return service
