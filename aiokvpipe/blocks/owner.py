"""The owner side of a BlockService: inbound block connections and what they may do.

Every REQUEST is admitted against the region and a live lease before a
payload byte moves (:meth:`Owner._admit`); a refused one is answered and the
connection stays usable, a lying one is cut off. Pipelined writes are
bounded before their payload is read (:meth:`Owner._serve_pipelined`). GPU
regions' device paths are in :mod:`.owner_gpu`.
"""

from __future__ import annotations

import asyncio
import socket

import torch

from ..errors import (
    BlockError,
    CudaTransferError,
    MalformedFrameError,
    PeerClosedError,
    ProtocolError,
    TransferTimeout,
)
from ..tensors import byte_view
from . import protocol
from .core import (
    _Inbound,
)
from .gpu import (
    stage_in,
    stage_out,
)
from .lease import Lease
from .ncclpath import (
    NcclLink,
)
from .owner_gpu import OwnerGpu
from .protocol import Kind
from .region import BlockRegion
from .runs import check_ids
from .sgio import Segments
from .shmpath import RingPath


class Owner(OwnerGpu):
    """Inbound connections, admission, reads and writes served; mixed into BlockService."""

    def accept(
        self,
        sock: socket.socket,
        peer: str,
        label: str = "",
        shared_memory: bool = False,
        ipc: bool = False,
        in_process: bool = False,
        nccl: bool = False,
    ) -> None:
        """Serve an inbound, authenticated block connection from ``peer`` (the
        key :meth:`peer_lost` uses; ``label`` names it in messages); owns ``sock``.
        ``shared_memory``: the peer shares our host (it may set up rings);
        ``ipc``: it may map our GPU regions (``in_process``: it is this process);
        ``nccl``: it may move GPU regions by NCCL (another host)."""
        if self._closed:
            sock.close()
            return
        sock.setblocking(False)
        path = RingPath(self._shm and shared_memory, self._ring_bytes)
        inbound = _Inbound(peer, label or peer, self._shm and ipc, in_process, self._shm and nccl)
        task = asyncio.get_running_loop().create_task(self._serve(sock, path, inbound))
        self._inbound[task] = (peer, sock, path)
        task.add_done_callback(self._inbound_done)

    def _inbound_done(self, task: asyncio.Task[None]) -> None:
        # A failure _serve did not expect is left unretrieved on purpose: it
        # is a bug, and the loop's exception handler reports it.
        entry = self._inbound.pop(task, None)
        if entry is not None:
            entry[1].close()
            entry[2].close()

    async def _serve(self, sock: socket.socket, path: RingPath, inbound: _Inbound) -> None:
        peer, label = inbound.peer, inbound.label
        what = f"blocks from {label}"
        link: NcclLink | None = None  # this connection's communicator, once built
        try:
            while True:
                message = await protocol.read_message(sock, what, eof_ok=True)
                if message is None:
                    return
                if message.kind == Kind.SETUP:
                    if message.body.get("nccl") == 1:
                        if link is not None:
                            link.close()
                        link = await self._accept_nccl(sock, inbound, message.body, what)
                    elif message.body.get("ipc") == 1:
                        await self._answer_ipc(sock, inbound, message.body, what)
                    else:
                        await path.answer(sock, message, what)
                    continue
                request = protocol.parse_request(message, what)
                if request.pipelined:
                    await self._serve_pipelined(sock, path, inbound, request, what)
                    continue
                try:
                    region, lease = self._admit(request, what)
                except BlockError as exc:
                    await protocol.send_message(sock, Kind.REPLY, protocol.error_body(exc), what)
                    continue
                lease.peers.add(peer)
                ipc = self._ipc_agreed(request, region, inbound)
                if ipc:
                    await self._serve_ipc(sock, label, request, lease, what)
                elif (
                    request.nccl is not None
                    and link is not None
                    and not link.comm.aborted
                    and region.placement == link.key
                ):
                    await self._serve_nccl(sock, label, request, region, lease, link, what)
                elif request.op == "read":
                    await self._serve_read(sock, path, label, request, region, lease, what)
                else:
                    await self._serve_write(sock, path, label, request, region, lease, what)
        except ProtocolError as exc:
            self.cut_off += 1
            self.last_cut_off = str(exc)
        except PeerClosedError:
            pass  # gone; a transfer it was in already failed its lease
        except (CudaTransferError, TransferTimeout) as exc:
            self.last_device_error = str(exc)  # the transfer's lease failed with it
        finally:
            sock.close()
            path.close()
            if link is not None:
                link.close()  # aborted once; a new connection builds a fresh one

    def _admit(self, request: protocol.Request, what: str) -> tuple[BlockRegion, Lease]:
        """Everything a request must pass before a byte of payload moves."""
        region = self.regions.get(request.region, where=f"{what}")
        check_ids("remote_blocks", request.blocks, region.num_blocks, f"region {region.name!r}")
        if not request.layers:
            raise MalformedFrameError(f"{what}: a request for no layers")
        check_ids(
            "layers", request.layers, region.num_layers, f"region {region.name!r}", noun="layer"
        )
        lease = self.leases.find(request.op, request.request_id, request.region)
        lease.check(request.op, request.blocks, request.layers)
        region.check_layouts(request.layers, request.layouts)
        nbytes = region.nbytes(len(request.blocks), request.layers)
        if request.nbytes != nbytes:
            # Same layouts, different size: not a mistake an honest peer makes.
            raise MalformedFrameError(
                f"{what}: claims {request.nbytes} bytes for {len(request.blocks)} blocks x "
                f"{len(request.layers)} layers that hold {nbytes}"
            )
        return region, lease

    async def _serve_pipelined(
        self,
        sock: socket.socket,
        path: RingPath,
        inbound: _Inbound,
        request: protocol.Request,
        what: str,
    ) -> None:
        """A write whose payload already follows its REQUEST: land it, or read it into scratch.

        Either way the payload is consumed, so the writes pipelined after it
        stay in step. Only a payload we can bound is consumed at all: what
        the REQUEST's own layouts say its blocks hold, and at most our
        largest region; any other claim is cut off before a byte is read.
        """
        honest = request.layouts_nbytes()
        if request.nbytes != honest:
            raise MalformedFrameError(
                f"{what}: a pipelined write claims {request.nbytes} bytes for "
                f"{len(request.blocks)} blocks whose layouts hold {honest}"
            )
        largest = self.regions.largest_nbytes()
        if request.nbytes > largest:
            raise MalformedFrameError(
                f"{what}: a pipelined write of {request.nbytes} bytes, more than any region "
                f"here holds ({largest})"
            )
        try:
            region, lease = self._admit(request, what)
        except BlockError as exc:
            segs = Segments.scratch(request.nbytes, receive=True)
            await self._recv_payload(sock, path, segs, what)
            answer = await protocol.expect_message(sock, Kind.STATUS, what)
            protocol.parse_status(answer, frozenset(("commit", "abort")), what)
            await protocol.send_message(sock, Kind.STATUS, protocol.status("error", exc), what)
            return
        lease.peers.add(inbound.peer)
        await self._serve_write(
            sock, path, inbound.label, request, region, lease, what, agree=False
        )

    async def _serve_read(
        self,
        sock: socket.socket,
        path: RingPath,
        peer: str,
        request: protocol.Request,
        region: BlockRegion,
        lease: Lease,
        what: str,
    ) -> None:
        try:
            host = None
            if region.placement is None:
                segs = Segments(region.segments(request.blocks, request.layers), receive=False)
            else:
                host = await self._owner_stage_out(region, request, lease, what)
                segs = Segments([byte_view(host)] if request.nbytes else [], receive=False)
            lease.attach(segs)
            try:
                reply = protocol.encode(Kind.REPLY, protocol.reply_ok(segs.total))
                await self._send_payload(sock, path, segs, what, prefix=reply)
                trailer = (
                    protocol.status("error", lease.ended_error())
                    if segs.redirected
                    else protocol.status("ok")
                )
                await protocol.send_message(sock, Kind.STATUS, trailer, what)
                answer = await protocol.expect_message(sock, Kind.STATUS, what)
                value = protocol.parse_status(answer, frozenset(("done", "abort")), what)
                if value == "done" and not segs.redirected:
                    lease.mark(request.blocks, request.layers)
            finally:
                lease.detach(segs)
        except PeerClosedError as exc:
            lease.fail(PeerClosedError(f"{lease.describe}: {peer} was lost mid-read: {exc}"))
            raise
        except (CudaTransferError, TransferTimeout) as exc:
            lease.fail(exc)
            raise

    async def _serve_write(
        self,
        sock: socket.socket,
        path: RingPath,
        peer: str,
        request: protocol.Request,
        region: BlockRegion,
        lease: Lease,
        what: str,
        agree: bool = True,
    ) -> None:
        """Land one write; ``agree``: REPLY to its REQUEST first (else it is pipelined)."""
        host = None
        if region.placement is None:
            segs = Segments(region.segments(request.blocks, request.layers), receive=True)
        else:
            # Staged: the payload lands in host memory; the blocks are written
            # only once the writer committed, and only if the lease still stands.
            host = self._gpu.ops(region.placement).empty_pinned(request.nbytes)
            segs = Segments([byte_view(host)] if request.nbytes else [], receive=True)
            self.staged_bytes += request.nbytes
        lease.attach(segs)
        try:
            if agree:
                await protocol.send_message(sock, Kind.REPLY, protocol.reply_ok(segs.total), what)
            await self._recv_payload(sock, path, segs, what)
            answer = await protocol.expect_message(sock, Kind.STATUS, what)
            value = protocol.parse_status(answer, frozenset(("commit", "abort")), what)
            if value == "commit" and host is not None and not segs.redirected:
                assert region.placement is not None
                await stage_in(
                    self._gpu.ops(region.placement),
                    region,
                    request.blocks,
                    request.layers,
                    host,
                    lease.fence,
                    self._settle,
                    f"{what}: copying {request.nbytes} staged bytes into region {region.name!r}",
                )
            if segs.redirected or (value == "commit" and lease.ended):
                reply = protocol.status("error", lease.ended_error())
            elif value == "commit":
                lease.mark(request.blocks, request.layers)
                reply = protocol.status("landed")
            else:
                reply = protocol.status("aborted")
            await protocol.send_message(sock, Kind.STATUS, reply, what)
        except PeerClosedError as exc:
            lease.fail(PeerClosedError(f"{lease.describe}: {peer} was lost mid-write: {exc}"))
            raise
        except (CudaTransferError, TransferTimeout) as exc:
            lease.fail(exc)
            raise
        finally:
            lease.detach(segs)

    async def _owner_stage_out(
        self, region: BlockRegion, request: protocol.Request, lease: Lease, what: str
    ) -> torch.Tensor:
        assert region.placement is not None
        self.staged_bytes += request.nbytes
        return await stage_out(
            self._gpu.ops(region.placement),
            region,
            request.blocks,
            request.layers,
            lease.fence,
            self._settle,
            f"{what}: staging {request.nbytes} bytes of region {region.name!r}",
        )
