"""BlockService: registered regions, leases, and block transfers over authenticated sockets.

The service knows nothing about dialling, handshakes or liveness; whoever
owns the links (the Endpoint) plugs it in through three points:

* ``dial(address) -> Dialled(socket, peer, shared_memory)``: an
  authenticated, connected socket to the endpoint at ``address``, dialled
  for block traffic and owned by the service from then on; ``peer`` names
  that peer's instance (leases and operations are bound to it);
  ``shared_memory``: the two ends share a host and may move payloads
  through shared memory (:func:`aiokvpipe.blocks.shmpath.may_share_memory`);
* :meth:`BlockService.accept`: an inbound block connection from ``peer``;
* :meth:`BlockService.peer_lost`: ``peer`` was declared dead or replaced.

The requester dials the owner, so reads and writes need only the owner's
address; a connection carries one transfer at a time and returns to a small
idle pool after it (:mod:`aiokvpipe.blocks.protocol` has the message order).

Writes of one request and region to one owner share one connection and
send in call order: a layer-wise push's writes then land layer by layer,
each as early as the bandwidth allows, instead of splitting it. Once the
owner has accepted one of them on that connection, the following ones are
*pipelined*: each sends its REQUEST, payload and commit without waiting for
an answer, the next one's bytes follow at once, and the answers are read
back in order, each ``write`` returning when its own arrives ("landed", or
its typed refusal). A refused write does not disturb the ones after it (the
owner reads the refused payload into scratch memory and answers the next
one). A connection that breaks fails every write sent or queued on it with
:class:`PeerClosedError`; a write issued after those returned dials anew.
Writes from GPU regions keep one full exchange each (their paths need the
owner's REPLY).
Payloads take the socket (``sendmsg`` / ``recvmsg_into`` on the blocks) or,
on one host, a shared-memory ring per direction of the connection
(:mod:`aiokvpipe.blocks.shmpath`); control messages always take the socket.
Regions in GPU memory copy through CUDA IPC with a GPU peer on the same host
(:mod:`aiokvpipe.blocks.gpu`), move by NCCL with a GPU peer on another host
(:mod:`aiokvpipe.blocks.ncclpath`), and stage through page-locked host memory
onto the socket or ring otherwise.

Cancelling (or timing out) a read or write never breaks its connection in
the middle of a transfer: the remaining bytes move through scratch memory in
the background (:class:`aiokvpipe.blocks.sgio.Segments`), the owner is told
"abort" and counts nothing, and the connection goes back to the pool. The
destination blocks of a cancelled read, and the remote blocks of a cancelled
write, are undefined. A connection that does break mid-transfer means the
peer died: the owner fails the lease with :class:`PeerClosedError`.

The code: :mod:`.core` holds the shared state and records; the requester
side is :mod:`.requester` (reads, writes, write pipes) and
:mod:`.requester_gpu` (staging, CUDA IPC, NCCL); the owner side is
:mod:`.owner` (inbound connections, admission, serving) and
:mod:`.owner_gpu`; :class:`BlockService` mixes them and adds the public
calls, peer loss and closing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from ..cuda.streams import fence
from ..errors import (
    LeaseCancelledError,
    PeerClosedError,
    PipeClosedError,
)
from .core import (
    _DEFAULT,
    Dial,
    Dialled,
)
from .lease import Lease, LeaseKind
from .owner import Owner
from .region import BlockRegion
from .requester import Requester

__all__ = ["BlockService", "Dial", "Dialled"]


class BlockService(Requester, Owner):
    """Paged-block transfers for one endpoint; see the module doc for how it plugs in.

    ``op_timeout``: the default bound on a read or write (None: unbounded).
    ``abort_timeout``: how long a cancelled transfer may take to finish its
    framing in the background before its connection is dropped instead.
    ``transport``: ``"auto"`` moves payloads through shared memory with
    peers on this host (as the hooks report), ``"tcp"`` always over the
    socket (both ends must allow shared memory for it to be used).
    ``shm_ring_bytes``: the size of each shared-memory ring this side creates.
    ``gpu``: where GPU regions get device operations and CUDA IPC from
    (default: real CUDA; tests pass :class:`aiokvpipe.cuda.testing.FakeGpu`).
    """

    # ------------------------------------------------------------ owner side
    def register(self, name: str, tensors: Any, block_dim: int) -> BlockRegion:
        """Register ``tensors`` (one or a list) as paged memory named ``name``."""
        self._check_open()
        return self.regions.register(name, tensors, block_dim, self._gpu.placement)

    def unregister(self, name: str) -> None:
        """Forget a region: its leases end (LeaseCancelledError), its transfers stop."""
        self.regions.unregister(name)
        for in_process in (False, True):
            self._exports.pop((name, in_process), None)
        for maps in self._maps.values():
            maps.drop(name)  # our half of the transfers is gone: unmap the peers' halves
        self.leases.end_region(name, LeaseCancelledError(f"region {name!r} was unregistered"))
        for op in list(self._ops.values()):
            if op.region == name:
                op.stop(LeaseCancelledError(f"region {name!r} was unregistered"), close=False)

    def expose(
        self, request_id: str, name: str, blocks: Any, ttl: float, layers: Any = None
    ) -> Lease:
        """Grant read access to ``blocks`` (and ``layers``, None: all) for ``ttl`` seconds."""
        return self._grant("read", request_id, name, blocks, ttl, layers)

    def expect(
        self, request_id: str, name: str, blocks: Any, ttl: float, layers: Any = None
    ) -> Lease:
        """Grant write access; the lease completes when every layer of every block landed."""
        return self._grant("write", request_id, name, blocks, ttl, layers)

    def _grant(
        self, kind: LeaseKind, request_id: str, name: str, blocks: Any, ttl: float, layers: Any
    ) -> Lease:
        self._check_open()
        region = self.regions.get(name)
        ids = region.check_blocks("blocks", blocks)
        layer_ids = region.check_layers("layers", layers)
        lease = self.leases.grant(kind, request_id, name, ids, layer_ids, ttl)
        if region.placement is not None:
            # The owner's kernels queued so far (writing the KV a peer reads,
            # or still reading blocks a peer will overwrite) come first.
            lease.fence = fence(self._gpu.ops(region.placement))
        return lease

    # ------------------------------------------------------------ requester side
    async def read(
        self,
        owner: str,
        request_id: str,
        name: str,
        remote_blocks: Any,
        local_blocks: Any,
        layers: Any = None,
        timeout: float | None = _DEFAULT,
    ) -> None:
        """Pull the owner's ``remote_blocks`` into our ``local_blocks`` (same order)."""
        op = self._prepare("read", owner, request_id, name, remote_blocks, local_blocks, layers)
        await self._run(op, timeout)

    async def write(
        self,
        owner: str,
        request_id: str,
        name: str,
        local_blocks: Any,
        remote_blocks: Any,
        layers: Any = None,
        timeout: float | None = _DEFAULT,
    ) -> None:
        """Push our ``local_blocks`` into the owner's ``remote_blocks``; returns once landed."""
        op = self._prepare("write", owner, request_id, name, remote_blocks, local_blocks, layers)
        await self._run(op, timeout)

    # ------------------------------------------------------------ liveness, closing
    def peer_lost(self, peer: str, error: BaseException | None = None) -> None:
        """``peer`` died or was replaced: fail its leases, transfers and connections."""
        reason = f"peer {peer} was lost" + (f": {error}" if error is not None else "")
        lost = PeerClosedError(reason)
        lost.__cause__ = error
        self.leases.peer_lost(peer, lost)
        for task, (who, _sock, _path) in list(self._inbound.items()):
            if who == peer:
                task.cancel()
        self._nccl_refused.pop(peer, None)
        maps = self._maps.pop(peer, None)
        if maps is not None:
            maps.drop_all()  # each mapping closes once no copy uses it
        for op in list(self._ops.values()):
            if op.owner == peer or (op.conn is not None and op.conn.peer == peer):
                op.stop(PeerClosedError(f"{op.describe()}: {reason}"), close=True)
        for pipe in list(self._write_pipes.values()):
            if pipe.owner == peer or (pipe.conn is not None and pipe.conn.peer == peer):
                self._break(pipe, lost)
        for owner, idle in list(self._idle.items()):
            keep = [c for c in idle if c.peer != peer and c.owner != peer]
            for conn in idle:
                if conn not in keep:
                    conn.close()
            self._idle[owner] = keep

    def on_close(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` when the service closes (to unsubscribe from the links)."""
        self._on_close.append(callback)

    async def aclose(self) -> None:
        """End every lease and transfer, close every block connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        for callback in self._on_close:
            callback()
        closed = PipeClosedError("block service closed")
        for op in list(self._ops.values()):
            op.stop(closed, close=True)
        readers = [p.reader for p in self._write_pipes.values() if p.reader is not None]
        for pipe in list(self._write_pipes.values()):
            self._break(pipe, closed)
        for task in list(self._inbound):
            task.cancel()
        self.leases.close(LeaseCancelledError("the endpoint closed"))
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        for maps in self._maps.values():
            maps.drop_all()
        self._maps.clear()
        self._exports.clear()
        pending = [*self._ops, *self._inbound, *readers]
        if pending:
            with contextlib.suppress(BaseException):
                await asyncio.gather(*pending, return_exceptions=True)
        await self._reaper.aclose()  # copies nobody awaited: their mappings close now
