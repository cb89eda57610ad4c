"""GPU tensors over NCCL (cupy's bindings), headers over the link's socket.

Each link (one direction of the ring) gets its own two-rank communicator: the
sender is NCCL rank 0, the receiver rank 1. The sender creates the NCCL unique
id and sends its raw 128 bytes in the transport hello (no pickle, no store).
Every NCCL call runs on the process's NCCL thread
(:mod:`aiokvpipe.cuda.nccl_thread`): each end *reserves* its communicator
set-up and is *armed* once the peer has reserved too. The hellos carry that:
the sender reserves, sends the id; the receiver reserves, answers; the sender
arms and says so; the receiver arms. The thread then builds the communicator
and pushes one byte through it, so that the lazy peer-connection set-up is
over before the first real transfer. A build cannot be interrupted: one whose
peer vanished mid-way holds the NCCL thread, and with it every other NCCL
set-up of the process, until NCCL gives up.

Per message the sender writes the frame header on the socket and queues, on
the NCCL thread, "the NCCL stream waits for the producer fence captured at
submit time, ``ncclSend``, record an event"; the receiver reads the header,
allocates the tensor on its device and queues the matching ``ncclRecv`` the
same way. Both await their events by polling (:mod:`aiokvpipe.cuda.events`),
checking the communicator's asynchronous error (read by the NCCL thread) so
a failed peer is reported rather than waited on. The sent tensor is
referenced until its event completes; only then is its ``done`` future (and
so the pipe's byte window) released. At most ``max_inflight`` messages per
channel are queued on the device at once (:mod:`aiokvpipe.cuda.channel`). On
``op_timeout``, or any error, the communicator is aborted, which makes stuck
NCCL kernels exit, and the error (TransferTimeout, CudaTransferError) is
raised.

Closing: the sender drains, writes CLOSE, and waits for the receiver to echo
it once every payload has landed (with network transports a finished send
kernel does not yet mean delivered data); then both ends *abort* rather than
destroy the communicator, because ``ncclCommDestroy`` may wait for the peer
to destroy too, and nothing is left in flight to abort.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import torch

from .._timeouts import deadline
from ..cuda.channel import Message, OrderedReceiver, OrderedSender, Received, empty_frame
from ..cuda.communicator import Communicator, nbytes_of
from ..cuda.control import ControlSocket, HelloKind
from ..cuda.nccl_thread import InitTicket, NcclThread, nccl_thread
from ..cuda.runtime import nccl_or_raise, require_cuda
from ..cuda.streams import DeviceOps, TorchCudaOps, fence
from ..errors import CudaTransferError, CudaUnavailableError, ProtocolError
from ..wire import HEADER_SIZE, FrameHeader, FrameKind, decode_header
from ._nccl_comm import (
    RECEIVER_RANK,
    SENDER_RANK,
    UNIQUE_ID_BYTES,
    _abort_pair,
    create_endpoint,
    new_communicator,
    reserve_communicator,
    unique_id_bytes,
)
from .base import Link, RecvChannel, SendChannel, Transport


async def _establish(link: Link, control: ControlSocket, ticket: InitTicket) -> Communicator:
    """Wait for the armed set-up and its warm-up; each end tells the other how it went.

    The peer's status is read while our own set-up runs, so if the peer fails
    (or dies) we stop waiting at once instead of at ``connect_timeout``; a
    set-up that finishes after that is aborted on the NCCL thread.
    """
    thread = ticket._thread
    assert thread is not None

    async def build() -> Communicator:
        communicator, warm = await thread.wait(
            ticket.future,
            timeout=None,
            what=f"{link.describe}: NCCL set-up",
            on_abandoned=_abort_pair,
        )
        try:
            await communicator.wait(warm, timeout=None, what="NCCL warm-up transfer")
        except BaseException:
            await asyncio.shield(communicator.abort(timeout=link.config.close_timeout))
            raise
        return communicator

    peer_status = asyncio.ensure_future(control.recv_hello(HelloKind.NCCL))
    setup = asyncio.ensure_future(build())
    try:
        done, _ = await asyncio.wait({setup, peer_status}, return_when=asyncio.FIRST_COMPLETED)
        if setup not in done:
            _peer_ok(peer_status, link)  # raises if the peer gave up
        communicator = await setup
    except BaseException as exc:
        ticket.cancel()
        setup.cancel()
        if isinstance(exc, Exception) and not peer_status.done():
            reason = f"communicator set-up failed: {exc}"
            await control.refuse(HelloKind.NCCL, reason, timeout=1.0)
        await _reap(setup, peer_status)
        raise
    try:
        await control.send_hello(HelloKind.NCCL)
        await asyncio.wait({peer_status})
        _peer_ok(peer_status, link)
    except BaseException:
        await _reap(peer_status)
        await asyncio.shield(communicator.abort(timeout=link.config.close_timeout))
        raise
    return communicator


async def _peer_hello(control: ControlSocket, link: Link) -> bytes:
    try:
        return await control.recv_hello(HelloKind.NCCL)
    except CudaUnavailableError as exc:
        raise CudaTransferError(f"{link.describe}: the peer could not set up NCCL: {exc}") from exc


def _peer_ok(peer_status: asyncio.Future[bytes], link: Link) -> None:
    try:
        peer_status.result()
    except CudaUnavailableError as exc:
        raise CudaTransferError(f"{link.describe}: the peer could not set up NCCL: {exc}") from exc


async def _reap(*futures: asyncio.Future[Any]) -> None:
    for future in futures:
        future.cancel()
    for future in futures:
        try:
            await future
        except BaseException:  # only collecting what was cancelled
            pass


@dataclass
class _Sending:
    tensor: torch.Tensor  # referenced until the event completes
    queued: Any  # concurrent future of the event recorded after ncclSend


class NcclSendChannel(OrderedSender[_Sending | None], SendChannel):
    """Sender end: rank 0 of the link's communicator."""

    def __init__(
        self, link: Link, *, nccl: Any, ops: DeviceOps, thread: NcclThread | None = None
    ) -> None:
        super().__init__(
            _control(link),
            ops,
            op_timeout=link.config.op_timeout,
            close_timeout=link.config.close_timeout,
        )
        self._link = link
        self._nccl = nccl
        self._thread = thread if thread is not None else nccl_thread()
        self._endpoint: Communicator | None = None
        self._close_echo: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    def open(
        cls, link: Link, *, nccl: Any, ops: DeviceOps, thread: NcclThread | None = None
    ) -> NcclSendChannel:
        """The channel, at once; the NCCL set-up runs in the background."""
        channel = cls(link, nccl=nccl, ops=ops, thread=thread)
        channel.start()
        return channel

    @property
    def communicator(self) -> Communicator | None:
        return self._endpoint

    async def _setup(self) -> None:
        link, control, thread = self._link, self._control, self._thread
        async with deadline(link.config.connect_timeout, lambda: f"{link.describe}: NCCL set-up"):
            uid = unique_id_bytes(
                await thread.call(self._nccl.get_unique_id, timeout=None, what="ncclGetUniqueId")
            )
            # Reserved before the peer hears of it: the peer's answer then
            # means both ends have reserved, and this end may arm.
            ticket = reserve_communicator(
                thread,
                self._nccl,
                self._ops,
                uid,
                world_size=2,
                rank=SENDER_RANK,
                warmup_peer=RECEIVER_RANK,
                what=link.describe,
            )
            try:
                await control.send_hello(HelloKind.NCCL, uid)
                await control.recv_hello(HelloKind.NCCL)  # the receiver has reserved
                ticket.arm()
                await control.send_hello(HelloKind.NCCL)  # ...and may arm in turn
                self._endpoint = await _establish(link, control, ticket)
            except BaseException:
                ticket.cancel()
                raise
        self._tasks.append(asyncio.ensure_future(self._watch_peer()))

    async def _start(self, message: Message, token: Any) -> _Sending | None:
        if token is None:
            await self._control.send(message.header.encode())
            return None
        assert self._endpoint is not None
        tensor, ready = await self.on_device(token)
        await self._control.send(message.header.encode())
        return _Sending(tensor, self._endpoint.queue_send(tensor, RECEIVER_RANK, ready))

    async def _finish(self, message: Message, state: _Sending | None) -> None:
        if state is not None:
            assert self._endpoint is not None
            event = await self._endpoint.queued(state.queued, timeout=self._op_timeout)
            await self._endpoint.wait(
                event,
                timeout=self._op_timeout,
                what=f"ncclSend of {message.header.nbytes} bytes (seq {message.header.seq})",
            )

    async def _after_close_frame(self) -> None:
        await self._close_echo  # bounded by aclose's close_timeout

    async def _watch_peer(self) -> None:
        """Fail fast if the receiver goes away.

        The receiver writes one thing only, the echo of our CLOSE; anything
        else, or EOF before it, means it is gone: failing aborts the
        communicator, so sends stuck in NCCL return instead of hanging.
        """
        where = self._link.describe
        try:
            data = await self._control.recv_exact(HEADER_SIZE, idle_ok=True)
            echo = decode_header(data, expected_seq=self._next_seq, max_frame_bytes=0)
            if echo.kind is not FrameKind.CLOSE or not self._closed:
                raise ProtocolError(f"{where}: unexpected {echo.kind.name} frame from the receiver")
            self._close_echo.set_result(None)
        except Exception as exc:
            if not self._close_echo.done():
                self._close_echo.set_exception(exc)
                self._close_echo.exception()  # retrieved: aclose may not be waiting
            if not self._closed:
                await self._fail(exc)

    async def _release(self) -> None:
        if self._endpoint is not None:
            await self._endpoint.abort(timeout=self._close_timeout)


class NcclRecvChannel(OrderedReceiver, RecvChannel):
    """Receiver end: rank 1 of the link's communicator."""

    def __init__(
        self, link: Link, *, nccl: Any, ops: DeviceOps, thread: NcclThread | None = None
    ) -> None:
        super().__init__(
            _control(link),
            device=ops.device,
            window_bytes=link.config.buffer_bytes,
            max_frame_bytes=link.config.max_frame_bytes,
        )
        self._link = link
        self._nccl = nccl
        self._ops = ops
        self._thread = thread if thread is not None else nccl_thread()
        self._endpoint: Communicator | None = None
        self._op_timeout = link.config.op_timeout
        self._close_timeout = link.config.close_timeout

    @classmethod
    def open(
        cls, link: Link, *, nccl: Any, ops: DeviceOps, thread: NcclThread | None = None
    ) -> NcclRecvChannel:
        """The channel, at once; the NCCL set-up runs in the background."""
        channel = cls(link, nccl=nccl, ops=ops, thread=thread)
        channel.start()
        return channel

    @property
    def communicator(self) -> Communicator | None:
        return self._endpoint

    async def _setup(self) -> None:
        link, control = self._link, self._control
        async with deadline(link.config.connect_timeout, lambda: f"{link.describe}: NCCL set-up"):
            uid = unique_id_bytes(await control.recv_hello(HelloKind.NCCL))
            ticket = reserve_communicator(
                self._thread,
                self._nccl,
                self._ops,
                uid,
                world_size=2,
                rank=RECEIVER_RANK,
                warmup_peer=SENDER_RANK,
                what=link.describe,
            )
            try:
                await control.send_hello(HelloKind.NCCL)  # this end has reserved
                # Armed only once the sender armed: a sender that gave up
                # before that never leaves this end's set-up waiting for it.
                await _peer_hello(control, link)
                ticket.arm()
                self._endpoint = await _establish(link, control, ticket)
            except BaseException:
                ticket.cancel()
                raise

    async def _begin(self, header: FrameHeader) -> Received:
        assert self._endpoint is not None
        tensor, raw = empty_frame(header, self._ops.device)  # on the consumer's stream
        # The fence is recorded here, on the loop thread, whose current stream
        # is the consumer's; the NCCL stream waits for it on the NCCL thread.
        queued = self._endpoint.queue_recv(raw, SENDER_RANK, fence(self._ops))
        self._ops.record_stream(raw, self._endpoint.stream)
        return Received(tensor, nbytes=header.nbytes, state=queued, seq=header.seq)

    async def _finish_item(self, item: Received) -> None:
        assert self._endpoint is not None
        event = await self._endpoint.queued(item.state, timeout=self._op_timeout)
        what = f"ncclRecv of {item.nbytes} bytes (seq {item.seq})"
        await self._endpoint.wait(event, timeout=self._op_timeout, what=what)

    async def _on_close_frame(self, close: FrameHeader) -> None:
        await self._control.send(close.encode())  # every payload has landed: tell the sender

    async def _release(self, pending: list[Received]) -> None:
        if self._endpoint is not None:
            await self._endpoint.abort(timeout=self._close_timeout)


def _control(link: Link) -> ControlSocket:
    return ControlSocket(link.sock, describe=link.describe, op_timeout=link.config.op_timeout)


async def _runtime(link: Link) -> tuple[Any, DeviceOps]:
    """cupy's NCCL and the link's device, or tell the peer why not and raise."""
    what = f"{link.describe}: transport 'nccl'"
    try:
        ops = TorchCudaOps(require_cuda(what, link.config.device))
        return nccl_or_raise(what), ops
    except CudaUnavailableError as exc:
        timeout = link.config.connect_timeout
        await _control(link).refuse_and_close(HelloKind.NCCL, str(exc), timeout=timeout)
        raise


class NcclTransport(Transport):
    """GPU tensors over NCCL between ranks on any hosts."""

    name = "nccl"

    @classmethod
    async def open_sender(cls, link: Link) -> SendChannel:
        nccl, ops = await _runtime(link)
        return NcclSendChannel.open(link, nccl=nccl, ops=ops)

    @classmethod
    async def open_receiver(cls, link: Link) -> RecvChannel:
        nccl, ops = await _runtime(link)
        return NcclRecvChannel.open(link, nccl=nccl, ops=ops)


__all__ = [
    "NcclRecvChannel",
    "NcclSendChannel",
    "NcclTransport",
    "UNIQUE_ID_BYTES",
    "create_endpoint",
    "nbytes_of",
    "new_communicator",
    "reserve_communicator",
    "unique_id_bytes",
]
