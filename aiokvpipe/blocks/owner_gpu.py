"""The owner side's GPU paths: CUDA IPC exports and NCCL communicators for peers.

A peer may map a GPU region, or get a communicator, only while it holds a
live lease on it; the owner counts a device transfer only once the
requester reported it done and the lease still stands.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from ..cuda.events import wait_event
from ..errors import (
    AiokvpipeError,
    CudaTransferError,
    LeaseCancelledError,
    MalformedFrameError,
    PeerClosedError,
    TransferTimeout,
)
from . import ncclpath, protocol
from .core import (
    Path,
    ServiceCore,
    _ended,
    _Inbound,
)
from .gpu import (
    Export,
    export_answer,
    export_region,
)
from .lease import Lease
from .ncclpath import (
    REQUESTER_RANK,
    NcclLink,
    run_group,
    segments,
)
from .protocol import Kind
from .region import BlockRegion


class OwnerGpu(ServiceCore):
    """GPU regions, owner side; mixed into BlockService."""

    def _export(self, region: BlockRegion, in_process: bool) -> Export:
        """``region``'s export for peers of this kind, made once per registration."""
        assert region.placement is not None
        key = (region.name, in_process)
        export = self._exports.get(key)
        if export is None or export.export_id != region.export_id:
            memory = self._gpu.memory(region.placement, in_process)
            export = self._exports[key] = export_region(region, memory)
        return export

    async def _answer_ipc(
        self, sock: socket.socket, inbound: _Inbound, body: dict[str, Any], what: str
    ) -> None:
        """A peer asks to map one of our GPU regions: its export, or why not."""
        name, request_id, first = body.get("region"), body.get("request_id"), body.get("first")
        if not (
            isinstance(name, str)
            and isinstance(request_id, str)
            and isinstance(first, int)
            and not isinstance(first, bool)
            and first >= 0
        ):
            raise MalformedFrameError(f"{what}: malformed CUDA IPC set-up {body!r:.200}")

        async def refuse(reason: str, retry: bool = False) -> None:
            answer = {"ipc": 1, "error": reason[:500], "retry": retry}
            await protocol.send_message(sock, Kind.SETUP, answer, what)

        if not inbound.ipc:
            await refuse("not on one host, or another transport forced")
            return
        region = self.regions.find(name)
        if region is None:
            await refuse(f"no region {name!r}", retry=True)
            return
        if region.placement is None:
            await refuse(f"region {name!r} is in host memory")
            return
        # Only a peer with business in the region may map it (the mapping
        # reaches the whole allocation; see aiokvpipe.blocks.gpu).
        if not self.leases.holds(request_id, name):
            await refuse(f"no live lease for request {request_id!r} on {name!r}", retry=True)
            return
        try:
            export = self._export(region, inbound.in_process)
        except AiokvpipeError as exc:
            await refuse(f"cannot export region {name!r}: {exc}")
            return
        if first >= len(export.tensors):
            raise MalformedFrameError(f"{what}: CUDA IPC set-up from tensor {first}")
        answer = {"ipc": 1, **export_answer(export, first)}
        await protocol.send_message(sock, Kind.SETUP, answer, what)

    def _ipc_agreed(
        self, request: protocol.Request, region: BlockRegion, inbound: _Inbound
    ) -> bool:
        """The requester copies through its mapping of our current export."""
        if request.ipc is None or not inbound.ipc or region.placement is None:
            return False
        export = self._exports.get((region.name, inbound.in_process))
        return export is not None and export.export_id == region.export_id == request.ipc

    async def _serve_ipc(
        self,
        sock: socket.socket,
        peer: str,
        request: protocol.Request,
        lease: Lease,
        what: str,
    ) -> None:
        """The requester copies; we wait for its word and count it if the lease still stands."""
        try:
            if await self._refused_as_ended(sock, lease, what):
                return
            reply = protocol.reply_ok(request.nbytes, "ipc")
            await protocol.send_message(sock, Kind.REPLY, reply, what)
            answer = await protocol.expect_message(sock, Kind.STATUS, what)
            status = self._device_verdict(lease, request, answer, "cuda_ipc", what)
            await protocol.send_message(sock, Kind.STATUS, status, what)
        except PeerClosedError as exc:
            lease.fail(
                PeerClosedError(f"{lease.describe}: {peer} was lost mid-{request.op}: {exc}")
            )
            raise

    def _device_verdict(
        self, lease: Lease, request: Any, message: Any, path: Path, what: str
    ) -> dict[str, Any]:
        """The owner's answer once the requester judged a device-path transfer.

        Aborted, too late (the copies ran after the lease ended: they count for
        nothing), or counted toward the lease.
        """
        success: protocol.Status
        counted: protocol.Status
        success, counted = ("done", "ok") if request.op == "read" else ("commit", "landed")
        value = protocol.parse_status(message, frozenset((success, "abort")), what)
        if value == "abort":
            return protocol.status("aborted")
        if _ended(lease):
            return protocol.status("error", lease.ended_error())
        lease.mark(request.blocks, request.layers)
        self.payload_bytes[path] += request.nbytes
        return protocol.status(counted)

    async def _refused_as_ended(self, sock: socket.socket, lease: Lease, what: str) -> bool:
        """Wait out the lease's fence; if the lease ended meanwhile, say so and refuse."""
        if lease.fence is not None:
            await self._lease_fence(lease, what)
        if not lease.ended:
            return False
        body = protocol.error_body(lease.ended_error())
        await protocol.send_message(sock, Kind.REPLY, body, what)
        return True

    async def _lease_fence(self, lease: Lease, what: str) -> None:
        """Until the owner's work queued before the grant is done (or the lease ends)."""

        def ended() -> None:
            if lease.ended:
                raise LeaseCancelledError("ended")

        try:
            await wait_event(lease.fence, check=ended, what=f"{what}: the owner's queued work")
        except LeaseCancelledError:
            pass  # the caller sees lease.ended
        except CudaTransferError as exc:
            lease.fail(exc)

    # ------------------------------------------------------------ NCCL, owner side
    async def _accept_nccl(
        self, sock: socket.socket, inbound: _Inbound, body: dict[str, Any], what: str
    ) -> NcclLink | None:
        """A peer asks for a communicator on this connection: build our end, or say why not."""
        name, request_id = body.get("region"), body.get("request_id")
        fields_ok = isinstance(name, str) and isinstance(request_id, str)
        if body.get("step") != "uid" or not fields_ok:
            raise MalformedFrameError(f"{what}: malformed NCCL set-up {body!r:.200}")
        if not inbound.nccl:
            reason = "not on two hosts, or another transport forced"
            await ncclpath.refuse(sock, reason, False, what)
            return None
        assert isinstance(name, str) and isinstance(request_id, str)
        region = self.regions.find(name)
        if region is None or region.placement is None:
            await ncclpath.refuse(sock, f"no GPU region {name!r}", True, what)
            return None
        # Only a peer with business here gets a communicator (it costs the
        # NCCL thread a set-up and the device a stream).
        if not self.leases.holds(request_id, name):
            await ncclpath.refuse(sock, f"no live lease for {request_id!r} on {name!r}", True, what)
            return None
        try:
            nccl, thread = self._gpu.nccl(region.placement)
        except AiokvpipeError as exc:
            await ncclpath.refuse(sock, f"no NCCL here: {exc}", False, what)
            return None
        ops = self._gpu.ops(region.placement)
        return await ncclpath.accept(
            sock, body, nccl, thread, ops, region.placement, self._op_timeout, what
        )

    async def _serve_nccl(
        self,
        sock: socket.socket,
        peer: str,
        request: protocol.Request,
        region: BlockRegion,
        lease: Lease,
        link: NcclLink,
        what: str,
    ) -> None:
        """Our half of an NCCL transfer; counted once our event completed and the peer agreed."""
        assert request.nccl is not None
        try:
            if await self._refused_as_ended(sock, lease, what):
                return
            # Checked before anything is queued: a lying requester is cut off here.
            views = segments(region, request.blocks, request.nccl, request.layers, what)
            reply = protocol.reply_ok(request.nbytes, "nccl")
            await protocol.send_message(sock, Kind.REPLY, reply, what)
            answer = asyncio.ensure_future(protocol.expect_message(sock, Kind.STATUS, what))
            try:
                sends, recvs = (views, []) if request.op == "read" else ([], views)
                ready = [lease.fence] if lease.fence is not None else []
                label = f"{what}: NCCL {request.op} of {request.nbytes} bytes"
                await run_group(
                    link, REQUESTER_RANK, sends, recvs, ready, answer, self._op_timeout, label
                )
                message = await answer
            except BaseException:
                answer.cancel()
                link.close()
                raise
            status = self._device_verdict(lease, request, message, "nccl", what)
            await protocol.send_message(sock, Kind.STATUS, status, what)
        except PeerClosedError as exc:
            lease.fail(
                PeerClosedError(f"{lease.describe}: {peer} was lost mid-{request.op}: {exc}")
            )
            raise
        except (CudaTransferError, TransferTimeout) as exc:
            lease.fail(exc)
            raise
