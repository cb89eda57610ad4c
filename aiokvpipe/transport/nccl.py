"""GPU tensors over NCCL (cupy's bindings), headers over the link's socket.

Each link (one direction of the ring) gets its own two-rank communicator: the
sender is NCCL rank 0, the receiver rank 1. The sender creates the NCCL unique
id and sends its raw 128 bytes in the transport hello (no pickle, no store);
both ends then build the communicator in a daemon thread (``ncclCommInitRank``
blocks until both joined) and push one byte through it, also off the loop, so
that the lazy peer-connection set-up, which blocks the host until the peer
takes part, is over before the first real transfer.

Per message the sender writes the frame header on the socket, makes its NCCL
stream wait on the producer fence captured at submit time, queues
``ncclSend`` and records an event; the receiver reads the header, allocates
the tensor on its device, queues the matching ``ncclRecv`` and records an
event. Both await their events by polling (:mod:`aiokvpipe.cuda.events`),
passing ``check_async_error`` so a failed peer is reported rather than waited
on. The sent tensor is referenced until its event completes; only then is its
``done`` future (and so the pipe's byte window) released. On ``op_timeout``,
or any error, the communicator is aborted, which makes stuck NCCL kernels
exit, and the error (TransferTimeout, CudaTransferError) is raised.

Closing: the sender drains, writes CLOSE, and waits for the receiver to echo
it once every payload has landed (with network transports a finished send
kernel does not yet mean delivered data); then both ends *abort* rather than
destroy the communicator, because ``ncclCommDestroy`` may wait for the peer
to destroy too, and nothing is left in flight to abort.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .._timeouts import deadline
from ..cuda.blocking import run_blocking
from ..cuda.channel import Message, OrderedReceiver, OrderedSender, Received, empty_frame
from ..cuda.control import ControlSocket, HelloKind
from ..cuda.events import wait_event
from ..cuda.runtime import cuda_errors, nccl_or_raise, require_cuda
from ..cuda.streams import DeviceOps, TorchCudaOps, after, fence
from ..errors import CudaTransferError, CudaUnavailableError, MalformedFrameError, ProtocolError
from ..wire import HEADER_SIZE, FrameHeader, FrameKind, decode_header
from .base import Link, RecvChannel, SendChannel, Transport

UNIQUE_ID_BYTES = 128
SENDER_RANK = 0
RECEIVER_RANK = 1


def unique_id_bytes(uid: Any) -> bytes:
    """The raw bytes of an NCCL unique id.

    cupy >= 14 returns ``bytes``; older cupy a tuple of 128 (signed) chars.
    """
    if isinstance(uid, (bytes, bytearray)):
        raw = bytes(uid)
    else:
        raw = bytes(int(c) & 0xFF for c in uid)
    if len(raw) != UNIQUE_ID_BYTES:
        raise MalformedFrameError(
            f"NCCL unique id has {len(raw)} bytes, expected {UNIQUE_ID_BYTES}"
        )
    return raw


def new_communicator(nccl: Any, world_size: int, uid: bytes, rank: int) -> Any:
    """``NcclCommunicator`` from raw id bytes, for either cupy id convention. Blocks."""
    try:
        return nccl.NcclCommunicator(world_size, uid, rank)
    except TypeError:
        # cupy < 14 types the id as a tuple of C chars (-128..127).
        legacy = tuple(b - 256 if b > 127 else b for b in uid)
        return nccl.NcclCommunicator(world_size, legacy, rank)


class NcclEndpoint:
    """One communicator and the stream every one of its operations runs on.

    Queuing calls (``send``/``recv``/``exchange``) return at once; completion
    is awaited through events with :meth:`wait`.
    """

    def __init__(self, nccl: Any, comm: Any, stream: Any, ops: DeviceOps, what: str) -> None:
        self.nccl = nccl
        self.comm = comm
        self.stream = stream
        self.ops = ops
        self.what = what
        self._aborted = False

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        with cuda_errors(f"{self.what}: ncclSend of {_nbytes(tensor)} bytes"):
            self._queue(self.comm.send, tensor, peer)

    def recv(self, tensor: torch.Tensor, peer: int) -> None:
        with cuda_errors(f"{self.what}: ncclRecv of {_nbytes(tensor)} bytes"):
            self._queue(self.comm.recv, tensor, peer)

    def _queue(self, op: Callable[..., None], tensor: torch.Tensor, peer: int) -> None:
        # Whole tensors go as bytes: every dtype works, even ones NCCL lacks.
        op(tensor.data_ptr(), _nbytes(tensor), self.nccl.NCCL_UINT8, peer, self.stream.cuda_stream)

    def exchange(self, src: torch.Tensor, dst: torch.Tensor, peer: int) -> None:
        """Send ``src`` to and receive ``dst`` from ``peer`` as one NCCL group.

        Grouping lets both run concurrently; it is also the only way a rank can
        send to itself (a one-rank communicator) without deadlocking.
        """
        with cuda_errors(f"{self.what}: grouped send/recv of {_nbytes(src)} bytes"):
            self.nccl.groupStart()
            try:
                self._queue(self.comm.send, src, peer)
                self._queue(self.comm.recv, dst, peer)
            finally:
                self.nccl.groupEnd()

    def check(self) -> None:
        """Raise CudaTransferError if NCCL recorded an asynchronous error (peer lost...)."""
        with cuda_errors(f"{self.what}: NCCL reported an asynchronous error"):
            self.comm.check_async_error()

    async def wait(self, event: Any, *, timeout: float | None, what: str) -> None:
        await wait_event(event, timeout=timeout, check=self.check, what=f"{self.what}: {what}")

    async def abort(self, *, timeout: float | None) -> None:
        """Abort the communicator: stuck kernels exit, resources are freed. Idempotent."""
        if self._aborted:
            return
        self._aborted = True

        def abort() -> None:
            with cuda_errors(f"{self.what}: ncclCommAbort"):
                self.comm.abort()

        await run_blocking(abort, timeout=timeout, what="ncclCommAbort")


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _abort_quietly(comm: Any) -> None:
    try:
        comm.abort()
    except Exception:  # cleanup of a communicator nobody waits for any more
        pass


async def create_endpoint(
    nccl: Any,
    ops: DeviceOps,
    uid: bytes,
    *,
    world_size: int,
    rank: int,
    warmup: Callable[[NcclEndpoint], None] | None,
    timeout: float | None,
    what: str,
) -> NcclEndpoint:
    """Build the communicator (and run ``warmup`` on it) in a daemon thread.

    ``warmup`` queues a tiny transfer that the thread then synchronizes on:
    blocking there is fine, and afterwards queuing NCCL work no longer blocks
    the host on connection set-up.
    """
    stream = ops.new_stream()
    built: list[Any] = []  # the communicator, as soon as it exists

    def build() -> Any:
        if ops.device.type == "cuda":
            torch.cuda.set_device(ops.device)
        with cuda_errors(f"{what}: ncclCommInitRank (rank {rank} of {world_size})"):
            comm = new_communicator(nccl, world_size, uid, rank)
        built.append(comm)
        try:
            if warmup is not None:
                warmup(NcclEndpoint(nccl, comm, stream, ops, what))
                with cuda_errors(f"{what}: NCCL warm-up transfer"):
                    stream.synchronize()  # off the loop: this is a worker thread
        except BaseException:
            _abort_quietly(comm)
            raise
        return comm

    try:
        comm = await run_blocking(
            build, timeout=timeout, what="NCCL communicator set-up", on_abandoned=_abort_quietly
        )
    except BaseException:
        if built:
            # Abandoned while the warm-up waits on a peer that is gone: abort
            # now (from a thread: ncclCommAbort may block) so the set-up
            # thread's synchronize returns instead of parking forever.
            threading.Thread(
                target=_abort_quietly, args=(built[0],), name="aiokvpipe: abort set-up", daemon=True
            ).start()
        raise
    return NcclEndpoint(nccl, comm, stream, ops, what)


async def _establish(
    link: Link, control: ControlSocket, nccl: Any, ops: DeviceOps, uid: bytes, rank: int
) -> NcclEndpoint:
    """Both ends build the communicator; each tells the other how it went.

    The peer's status is read while our own set-up runs, so if the peer fails
    (or dies) we stop waiting at once instead of at ``connect_timeout``; our
    abandoned set-up thread then aborts whatever it eventually builds.
    """
    peer = RECEIVER_RANK if rank == SENDER_RANK else SENDER_RANK
    probe = torch.zeros(1, dtype=torch.uint8, device=ops.device)

    def warmup(endpoint: NcclEndpoint) -> None:
        if rank == SENDER_RANK:
            endpoint.send(probe, peer)
        else:
            endpoint.recv(probe, peer)

    peer_status = asyncio.ensure_future(control.recv_hello(HelloKind.NCCL))
    setup = asyncio.ensure_future(
        create_endpoint(
            nccl, ops, uid, world_size=2, rank=rank, warmup=warmup, timeout=None, what=link.describe
        )
    )
    try:
        done, _ = await asyncio.wait({setup, peer_status}, return_when=asyncio.FIRST_COMPLETED)
        if setup not in done:
            _peer_ok(peer_status, link)  # raises if the peer gave up
        endpoint = await setup
    except BaseException as exc:
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
        await endpoint.abort(timeout=link.config.close_timeout)
        raise
    return endpoint


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
    event: Any


class NcclSendChannel(OrderedSender[_Sending | None], SendChannel):
    """Sender end: rank 0 of the link's communicator."""

    def __init__(self, link: Link, *, nccl: Any, ops: DeviceOps) -> None:
        super().__init__(
            _control(link),
            ops,
            op_timeout=link.config.op_timeout,
            close_timeout=link.config.close_timeout,
        )
        self._link = link
        self._nccl = nccl
        self._endpoint: NcclEndpoint | None = None
        self._close_echo: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    def open(cls, link: Link, *, nccl: Any, ops: DeviceOps) -> NcclSendChannel:
        """The channel, at once; the NCCL set-up runs in the background."""
        channel = cls(link, nccl=nccl, ops=ops)
        channel.start()
        return channel

    async def _setup(self) -> None:
        link, control = self._link, self._control
        async with deadline(link.config.connect_timeout, lambda: f"{link.describe}: NCCL set-up"):
            uid = unique_id_bytes(
                await run_blocking(self._nccl.get_unique_id, timeout=None, what="ncclGetUniqueId")
            )
            await control.send_hello(HelloKind.NCCL, uid)
            await control.recv_hello(HelloKind.NCCL)
            self._endpoint = await _establish(
                link, control, self._nccl, self._ops, uid, SENDER_RANK
            )
        self._tasks.append(asyncio.ensure_future(self._watch_peer()))

    async def _start(self, message: Message, token: Any) -> _Sending | None:
        if token is None:
            await self._control.send(message.header.encode())
            return None
        assert self._endpoint is not None
        tensor, ready = await self.on_device(token)
        await self._control.send(message.header.encode())
        stream = self._endpoint.stream
        after(stream, ready)
        self._endpoint.send(tensor, RECEIVER_RANK)
        return _Sending(tensor, stream.record_event())

    async def _finish(self, message: Message, state: _Sending | None) -> None:
        if state is not None:
            assert self._endpoint is not None
            await self._endpoint.wait(
                state.event,
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

    def __init__(self, link: Link, *, nccl: Any, ops: DeviceOps) -> None:
        super().__init__(
            _control(link),
            device=ops.device,
            window_bytes=link.config.buffer_bytes,
            max_frame_bytes=link.config.max_frame_bytes,
        )
        self._link = link
        self._nccl = nccl
        self._ops = ops
        self._endpoint: NcclEndpoint | None = None
        self._op_timeout = link.config.op_timeout
        self._close_timeout = link.config.close_timeout

    @classmethod
    def open(cls, link: Link, *, nccl: Any, ops: DeviceOps) -> NcclRecvChannel:
        """The channel, at once; the NCCL set-up runs in the background."""
        channel = cls(link, nccl=nccl, ops=ops)
        channel.start()
        return channel

    async def _setup(self) -> None:
        link, control = self._link, self._control
        async with deadline(link.config.connect_timeout, lambda: f"{link.describe}: NCCL set-up"):
            uid = unique_id_bytes(await control.recv_hello(HelloKind.NCCL))
            await control.send_hello(HelloKind.NCCL)
            self._endpoint = await _establish(
                link, control, self._nccl, self._ops, uid, RECEIVER_RANK
            )

    async def _begin(self, header: FrameHeader) -> Received:
        assert self._endpoint is not None
        tensor, raw = empty_frame(header, self._ops.device)  # on the consumer's stream
        stream = self._endpoint.stream
        after(stream, fence(self._ops))
        self._endpoint.recv(raw, SENDER_RANK)
        self._ops.record_stream(raw, stream)
        return Received(tensor, nbytes=header.nbytes, state=stream.record_event(), seq=header.seq)

    async def _finish_item(self, item: Received) -> None:
        assert self._endpoint is not None
        what = f"ncclRecv of {item.nbytes} bytes (seq {item.seq})"
        await self._endpoint.wait(item.state, timeout=self._op_timeout, what=what)

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
