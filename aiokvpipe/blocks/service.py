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
GPU regions' writes keep one full exchange each (their paths need the
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
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch

from .._timeouts import deadline
from ..cuda.events import wait_event
from ..cuda.streams import fence
from ..errors import (
    AiokvpipeError,
    BlockError,
    ConfigError,
    CudaTransferError,
    LeaseCancelledError,
    MalformedFrameError,
    PeerClosedError,
    PipeClosedError,
    ProtocolError,
    TransferTimeout,
)
from ..tensors import byte_view
from . import ncclpath, protocol
from .gpu import (
    Export,
    GpuBackend,
    MappedRegion,
    PeerMaps,
    Reaper,
    TorchGpu,
    enqueue_copies,
    export_answer,
    export_region,
    parse_export_answer,
    plan_copies,
    stage_in,
    stage_out,
)
from .lease import Lease, LeaseKind, LeaseTable
from .ncclpath import (
    MAX_RUNS,
    OWNER_RANK,
    REQUESTER_RANK,
    NcclLink,
    run_counts,
    run_group,
    scratch_like,
    segments,
)
from .protocol import Kind
from .region import BlockRegion, RegionTable
from .runs import as_ids, check_ids, check_same_length
from .sgio import Segments, recv_segments, send_segments
from .shmpath import RING_BYTES, RingPath


class Dialled(NamedTuple):
    """What the ``dial`` hook returns (see the module doc)."""

    sock: socket.socket
    peer: str
    shared_memory: bool = False
    ipc: bool = False  # GPU regions may use CUDA IPC (gpu.may_map_device_memory)
    in_process: bool = False  # the peer is this process (raw pointers, not IPC handles)
    nccl: bool = False  # GPU regions may move by NCCL (ncclpath.may_use_nccl)


Dial = Callable[[str], Awaitable[Dialled]]
Path = Literal["tcp", "shm", "cuda_ipc", "nccl"]
_DEFAULT: Any = object()
_U32 = 1 << 32
_ACCEPTED_KEYS = 256


@dataclass
class _Conn:
    sock: socket.socket
    owner: str  # the address dialled
    peer: str  # the instance behind it, as the dialler named it
    path: RingPath  # its shared-memory rings, if any
    ipc: bool = False
    in_process: bool = False
    nccl_ok: bool = False  # GPU regions may move by NCCL on this connection
    nccl: NcclLink | None = None  # its communicator, once built
    #: (request, region) whose writes the owner accepted on this connection:
    #: later ones go pipelined (recent ones only; forgetting costs one REPLY wait).
    accepted: OrderedDict[tuple[str, str], None] = field(default_factory=OrderedDict)

    def accept_writes(self, key: tuple[str, str]) -> None:
        self.accepted[key] = None
        self.accepted.move_to_end(key)
        while len(self.accepted) > _ACCEPTED_KEYS:
            self.accepted.popitem(last=False)

    def close(self) -> None:
        self.sock.close()
        self.path.close()
        if self.nccl is not None:
            self.nccl.close()  # aborted once, on the NCCL thread
            self.nccl = None


@dataclass(frozen=True)
class _Inbound:
    """Who is on the other end of an inbound block connection, and what it may do."""

    peer: str  # the key peer_lost uses
    label: str  # how messages name it
    ipc: bool  # it may map our GPU regions (same host, no transport forced)
    in_process: bool  # it is this process
    nccl: bool = False  # it may move GPU regions by NCCL (another host, no transport forced)


@dataclass(eq=False)
class _Answer:
    """A pipelined write sent, waiting for the owner's STATUS."""

    op: _Outbound
    verdict: protocol.Status  # what we sent: commit or abort
    future: asyncio.Future[AiokvpipeError | None]  # None: landed / aborted; else the refusal


@dataclass(eq=False)
class _WritePipe:
    """Writes of one request and region to one owner (see the module doc).

    They take ``turn`` to send, in call order, on ``conn``, which the pipe
    holds while it has users. Once the owner accepted a write of theirs on
    ``conn`` (:attr:`_Conn.accepted`), the rest go pipelined; their answers
    are read in order by ``reader`` into ``pending``. ``broken``: why
    ``conn`` failed; every write still queued on the pipe fails with it.
    """

    owner: str
    key: tuple[str, str]  # (request id, region)
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # holding or waiting: the entry goes when none are left
    conn: _Conn | None = None
    pending: deque[_Answer] = field(default_factory=deque)
    reader: asyncio.Task[None] | None = None
    sending: _Outbound | None = None  # the write whose turn it is, once it is on ``conn``
    broken: BaseException | None = None


@dataclass
class _Outbound:
    """One read or write in flight on the requester's side."""

    op: LeaseKind
    owner: str
    request: tuple[dict[str, Any], tuple[int, ...]]
    nbytes: int
    segs: Segments
    region: str
    local: BlockRegion
    local_ids: tuple[int, ...]
    layers: tuple[int, ...]
    ready: Any = None  # GPU regions: the caller's stream when the call was made
    host: torch.Tensor | None = None  # GPU regions on the stream path: staged bytes
    conn: _Conn | None = None
    error: BaseException | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def describe(self) -> str:
        body = self.request[0]
        return (
            f"{self.op} of {len(self.request[1])} blocks x {len(body['layers'])} layers of "
            f"request {body['request_id']!r} region {self.region!r} with {self.owner}"
        )

    @property
    def gpu(self) -> bool:
        return self.local.on_device

    def stop(self, error: BaseException | None, close: bool) -> None:
        """Stop touching the blocks now; ``close``: also drop the connection (peer gone)."""
        if error is not None and self.error is None:
            self.error = error
        self.segs.redirect()
        if close and self.task is not None:
            self.task.cancel()


class BlockService:
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

    def __init__(
        self,
        dial: Dial,
        *,
        op_timeout: float | None = 30.0,
        abort_timeout: float = 10.0,
        max_idle_per_peer: int = 4,
        transport: Literal["auto", "tcp"] = "auto",
        shm_ring_bytes: int = RING_BYTES,
        gpu: GpuBackend | None = None,
    ) -> None:
        if transport not in ("auto", "tcp"):
            raise ConfigError("transport", f"must be 'auto' or 'tcp', not {transport!r}")
        self.regions = RegionTable()
        self.leases = LeaseTable()
        self._dial = dial
        self._op_timeout = op_timeout
        self._abort_timeout = abort_timeout
        self._max_idle = max_idle_per_peer
        self._shm = transport == "auto"
        self._ring_bytes = shm_ring_bytes
        self._idle: dict[str, list[_Conn]] = {}
        self._write_pipes: dict[tuple[str, str, str], _WritePipe] = {}
        self._ops: dict[asyncio.Task[None], _Outbound] = {}
        self._inbound: dict[asyncio.Task[None], tuple[str, socket.socket, RingPath]] = {}
        self._gpu: GpuBackend = gpu if gpu is not None else TorchGpu()
        self._maps: dict[str, PeerMaps] = {}  # requester: owners' regions mapped, by peer
        self._exports: dict[tuple[str, bool], Export] = {}  # owner: (region, in_process)
        self._reaper = Reaper(abort_timeout)
        self._nccl_refused: dict[str, str] = {}  # requester: peers we stage with, and why
        self._closed = False
        self._on_close: list[Callable[[], object]] = []
        #: Inbound connections cut off for a protocol violation, and the last reason.
        self.cut_off = 0
        self.last_cut_off: str = ""
        #: Payload bytes this service sent or received, by path (cuda_ipc: copied
        #: by this side, or counted by the owner when the copier reported done).
        self.payload_bytes: dict[Path, int] = {"tcp": 0, "shm": 0, "cuda_ipc": 0, "nccl": 0}
        #: Bytes of GPU regions staged through host memory (they count on tcp/shm too).
        self.staged_bytes = 0
        #: The last device failure that ended an inbound transfer.
        self.last_device_error: str = ""
        #: Writes this side sent pipelined (without waiting for the owner's REPLY).
        self.pipelined_writes = 0

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

    def _prepare(
        self,
        kind: LeaseKind,
        owner: str,
        request_id: str,
        name: str,
        remote_blocks: Any,
        local_blocks: Any,
        layers: Any,
    ) -> _Outbound:
        """Every local check, before a connection is touched."""
        self._check_open()
        if not isinstance(request_id, str) or not 0 < len(request_id) <= protocol.MAX_NAME:
            raise BlockError(f"request_id must be a str of 1..256 characters, not {request_id!r}")
        region = self.regions.get(name)
        local = region.check_blocks("local_blocks", local_blocks)
        remote = as_ids("remote_blocks", remote_blocks)
        check_ids("remote_blocks", remote, _U32, "a block id")
        check_same_length("local_blocks", local, "remote_blocks", remote)
        layer_ids = region.check_layers("layers", layers)
        nbytes = region.nbytes(len(local), layer_ids)
        request = protocol.request(
            kind,
            request_id,
            name,
            layer_ids,
            [region.layout(i) for i in layer_ids],
            nbytes,
            remote,
        )
        if region.placement is None:
            segs = Segments(region.segments(local, layer_ids), receive=kind == "read")
            ready = None
        else:
            # Bytes of a GPU region take a stream only staged (see _stream_segs).
            segs = Segments([], receive=kind == "read")
            ready = fence(self._gpu.ops(region.placement))  # the producer, at the call
        return _Outbound(
            kind,
            owner,
            (request[0], tuple(request[1])),
            nbytes,
            segs,
            name,
            region,
            local,
            layer_ids,
            ready,
        )

    async def _run(self, op: _Outbound, timeout: float | None) -> None:
        if timeout is _DEFAULT:
            timeout = self._op_timeout
        task = asyncio.get_running_loop().create_task(self._exchange(op))
        op.task = task
        self._ops[task] = op
        task.add_done_callback(self._op_done)
        try:
            async with deadline(timeout, op.describe):
                await asyncio.shield(task)
        except BaseException:
            if not task.done():
                # Cancelled or timed out: stop touching our blocks now and let
                # the task finish the framing with scratch memory, bounded.
                op.stop(None, close=False)
                timer = asyncio.get_running_loop().call_later(self._abort_timeout, task.cancel)
                task.add_done_callback(lambda _t: timer.cancel())
            raise

    def _op_done(self, task: asyncio.Task[None]) -> None:
        self._ops.pop(task, None)
        if not task.cancelled():
            task.exception()  # retrieved: an abandoned transfer's error is not news

    async def _exchange(self, op: _Outbound) -> None:
        """One transfer; writes of one request and region to one owner share a pipe."""
        if op.op != "write":
            await self._transfer(op)
            return
        # A layer-wise push issues a write per layer while the next layer
        # computes. Side by side, those writes would each take (or dial) a
        # connection and split the same bandwidth, so every layer lands late;
        # in call order on one connection each lands as early as it can, and
        # the lease's pieces land in the order they were produced.
        key = (op.owner, op.request[0]["request_id"], op.region)
        pipe = self._write_pipes.get(key)
        if pipe is None:
            pipe = self._write_pipes[key] = _WritePipe(op.owner, key[1:])
        pipe.users += 1
        try:
            answer = await self._send_in_turn(pipe, op)
            if answer is not None:
                refusal = await self._answer_of(pipe, op, answer)
                if op.error is not None:
                    raise op.error
                if refusal is not None:
                    raise refusal
        except asyncio.CancelledError:
            if op.error is not None:
                raise op.error from None
            raise
        finally:
            pipe.users -= 1
            if not pipe.users:
                self._retire(key, pipe)

    async def _send_in_turn(
        self, pipe: _WritePipe, op: _Outbound
    ) -> asyncio.Future[AiokvpipeError | None] | None:
        """Send ``op`` in its turn on the pipe's connection: the future of the owner's
        answer, or None when there is none to wait for (refusals raised)."""
        async with pipe.turn:
            if op.segs.redirected:  # cancelled, or its peer lost, while it queued
                if op.error is not None:
                    raise op.error
                return None
            if pipe.broken is not None:
                raise _broke(op, pipe.broken)
            if pipe.conn is None:
                pipe.conn = await self._acquire(op.owner)
            conn = op.conn = pipe.conn
            pipe.sending = op
            outcome: asyncio.Future[AiokvpipeError | None] | AiokvpipeError | None
            try:
                if op.gpu:  # GPU regions: one whole exchange each (their paths need the REPLY)
                    outcome = await self._transfer_on(conn, op)
                else:
                    outcome = await self._send_streamed(pipe, conn, op)
            except BaseException as exc:
                # Stopped mid-framing (or the connection failed): nobody can
                # tell where the next message starts. Every write on it fails.
                pipe.sending = None
                self._break(pipe, exc)
                raise
            finally:
                pipe.sending = None
        if isinstance(outcome, asyncio.Future):
            return outcome
        if op.error is not None:
            raise op.error
        if outcome is not None:
            raise outcome
        return None

    async def _send_streamed(
        self, pipe: _WritePipe, conn: _Conn, op: _Outbound
    ) -> asyncio.Future[AiokvpipeError | None] | AiokvpipeError | None:
        """REQUEST, payload and verdict; the future of the owner's answer.

        Pipelined when the owner already accepted a write of this request and
        region on ``conn``; else the REQUEST waits for its REPLY first (the
        owner's refusal is returned, before any payload byte moved), and only
        the final answer is left to the reader.
        """
        what = f"write to {conn.owner}"
        body, ids = op.request
        if pipe.key in conn.accepted:
            self.pipelined_writes += 1
            await protocol.send_message(
                conn.sock, Kind.REQUEST, {**body, "pipelined": True}, what, ids
            )
        else:
            assert not pipe.pending  # nothing is pipelined on a connection before this
            direction = conn.path.needs(op.op)
            if direction is not None and not op.segs.redirected:
                await conn.path.open(conn.sock, direction, what)
            if op.segs.redirected:  # stopped before a byte was sent
                return None
            await self._request(conn, op, None, None)
            refusal, _path = await self._agreed(conn, op, None, None, what)
            if refusal is not None:
                return refusal
            conn.accept_writes(pipe.key)
        await self._send_payload(conn.sock, conn.path, op.segs, what)
        verdict: protocol.Status = "abort" if op.segs.redirected else "commit"
        await protocol.send_message(conn.sock, Kind.STATUS, protocol.status(verdict), what)
        # No await from here to the append: the reader cannot see this
        # answer before its entry is queued.
        future: asyncio.Future[AiokvpipeError | None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        pipe.pending.append(_Answer(op, verdict, future))
        if pipe.reader is None:
            pipe.reader = asyncio.get_running_loop().create_task(self._read_answers(pipe, conn))
        return future

    async def _answer_of(
        self, pipe: _WritePipe, op: _Outbound, answer: asyncio.Future[AiokvpipeError | None]
    ) -> AiokvpipeError | None:
        try:
            return await answer
        except asyncio.CancelledError:
            # Only a hard stop (peer lost, closing, or a cancelled write's
            # framing outlived abort_timeout) cancels the task itself: the
            # owner's answers are not worth waiting for on this connection.
            if not answer.done() or answer.cancelled():
                self._break(pipe, op.error or PeerClosedError(f"{op.describe()}: stopped"))
            raise

    async def _read_answers(self, pipe: _WritePipe, conn: _Conn) -> None:
        """The owner's answers to the pipelined writes, in the order they were sent."""
        what = f"write to {conn.owner}"
        allowed = frozenset(("landed", "aborted", "error"))
        try:
            while pipe.pending:
                message = await protocol.expect_message(conn.sock, Kind.STATUS, what)
                entry = pipe.pending.popleft()
                try:
                    value = protocol.parse_status(message, allowed, what)
                    if (value == "aborted") != (entry.verdict == "abort") and value != "error":
                        raise MalformedFrameError(
                            f"{what}: owner answered {value!r} to {entry.verdict!r}"
                        )
                except ProtocolError as exc:
                    if not entry.future.done():
                        entry.future.set_exception(exc)
                    raise
                result = (
                    protocol.remote_error(message.body, f"owner {conn.owner}")
                    if value == "error"
                    else None
                )
                if not entry.future.done():
                    entry.future.set_result(result)
        except asyncio.CancelledError:
            pass  # _break stopped us; it fails what is pending
        except (AiokvpipeError, OSError) as exc:
            self._break(pipe, exc)
        finally:
            if pipe.reader is asyncio.current_task():
                pipe.reader = None

    def _break(self, pipe: _WritePipe, error: BaseException) -> None:
        """The pipe's connection is unusable: fail every answer still owed, stop
        the tasks using the connection, close it once they are off it."""
        if pipe.broken is None:
            pipe.broken = error
        owed = list(pipe.pending)
        pipe.pending.clear()
        for entry in owed:
            if not entry.future.done():
                entry.future.set_exception(_broke(entry.op, error))
        conn, pipe.conn = pipe.conn, None
        if conn is None:
            return
        me = asyncio.current_task()
        busy: list[asyncio.Task[Any]] = []
        reader, pipe.reader = pipe.reader, None
        if reader is not None and reader is not me and not reader.done():
            reader.cancel()
            busy.append(reader)
        sender = pipe.sending
        if sender is not None and sender.task is not None and sender.task is not me:
            if not sender.task.done():
                sender.stop(_broke(sender, error), close=True)
                busy.append(sender.task)
        # Wake whatever is parked on the socket now, but close it (and the
        # rings) only once those tasks left it: a parked task deregisters its
        # fd as it unwinds, and a closed fd's number may already be reused.
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
        if not busy:
            conn.close()
            return
        left = len(busy)

        def off(_task: asyncio.Task[Any]) -> None:
            nonlocal left
            left -= 1
            if not left:
                conn.close()

        for task in busy:
            task.add_done_callback(off)

    def _retire(self, key: tuple[str, str, str], pipe: _WritePipe) -> None:
        """The pipe's last user left: its connection back to the pool, the entry gone."""
        if self._write_pipes.get(key) is pipe:
            del self._write_pipes[key]
        if pipe.pending or pipe.reader is not None:  # answers nobody reads: not reusable
            self._break(pipe, PeerClosedError(f"write pipe to {pipe.owner} retired"))
        conn, pipe.conn = pipe.conn, None
        if conn is not None:
            self._release(conn)

    async def _transfer(self, op: _Outbound) -> None:
        """The requester's side of one transfer, on a pooled or new connection."""
        try:
            conn = await self._acquire(op.owner)
        except asyncio.CancelledError:
            if op.error is not None:
                raise op.error from None
            raise
        op.conn = conn
        healthy = False
        try:
            refusal = await self._transfer_on(conn, op)
            healthy = True
        except asyncio.CancelledError:
            if op.error is not None:
                raise op.error from None
            raise
        finally:
            if healthy:
                self._release(conn)
            else:
                conn.close()
        if op.error is not None:
            raise op.error
        if refusal is not None:
            raise refusal

    async def _transfer_on(self, conn: _Conn, op: _Outbound) -> AiokvpipeError | None:
        """One whole exchange on ``conn``: the owner's refusal, or None; raises if broken."""
        mapped = link = None
        if op.gpu and conn.ipc and not op.segs.redirected:
            mapped = await self._mapping(conn, op)
        elif op.gpu and conn.nccl_ok and not op.segs.redirected:
            link = await self._nccl_link(conn, op)
        if mapped is None and link is None:
            direction = conn.path.needs(op.op)
            if direction is not None and not op.segs.redirected:
                await conn.path.open(conn.sock, direction, f"{op.op} with {conn.owner}")
            if op.gpu and op.op == "write" and not op.segs.redirected:
                await self._stage_out(op)  # before the owner waits on us
        if op.segs.redirected:  # stopped before a byte was sent
            return None
        if op.op == "read":
            return await self._do_read(conn, op, mapped, link)
        return await self._do_write(conn, op, mapped, link)

    async def _request(
        self, conn: _Conn, op: _Outbound, mapped: MappedRegion | None, link: NcclLink | None
    ) -> None:
        body, ids = op.request
        if mapped is not None:
            body = {**body, "ipc": mapped.export_id}
        if link is not None:
            body = {**body, "nccl": run_counts(op.local_ids, ids)}
        await protocol.send_message(
            conn.sock, Kind.REQUEST, body, f"{op.op} with {conn.owner}", ids
        )

    async def _open_transfer(
        self,
        conn: _Conn,
        op: _Outbound,
        mapped: MappedRegion | None,
        link: NcclLink | None,
        what: str,
        verdict: protocol.Status,
        ack: str,
    ) -> tuple[bool, AiokvpipeError | None]:
        """Request, agree on the path, and carry a device path (NCCL, IPC) to its verdict.

        ``(True, result)`` when that settled the transfer (a refusal included);
        ``(False, None)`` when the payload is to stream over the connection.
        Reads and writes differ only in the words of the verdict and its ack.
        """
        await self._request(conn, op, mapped, link)
        refusal, path = await self._agreed(conn, op, mapped, link, what)
        if refusal is not None:
            return True, refusal
        if path == "nccl":
            assert link is not None
            pending = await self._nccl_transfer(conn, op, link, what)
            return True, await self._ipc_verdict(conn, op, verdict, ack, what, pending)
        if path == "ipc":
            assert mapped is not None
            await self._ipc_copy(conn, op, mapped, what)
            return True, await self._ipc_verdict(conn, op, verdict, ack, what)
        return False, None

    async def _do_read(
        self, conn: _Conn, op: _Outbound, mapped: MappedRegion | None, link: NcclLink | None
    ) -> AiokvpipeError | None:
        """The owner's refusal (the connection stays usable) or None; raises if broken."""
        sock, what = conn.sock, f"read from {conn.owner}"
        settled, result = await self._open_transfer(conn, op, mapped, link, what, "done", "ok")
        if settled:
            return result
        segs = self._stream_segs(op)
        await self._recv_payload(sock, conn.path, segs, what)
        trailer = await protocol.expect_message(sock, Kind.STATUS, what)
        value = protocol.parse_status(trailer, frozenset(("ok", "error")), what)
        if value == "ok" and op.gpu and not op.segs.redirected and op.host is not None:
            await self._stage_in(op)
        verdict: protocol.Status = "done" if value == "ok" and not op.segs.redirected else "abort"
        await protocol.send_message(sock, Kind.STATUS, protocol.status(verdict), what)
        if value == "error":
            return protocol.remote_error(trailer.body, f"owner {conn.owner}")
        return None

    async def _do_write(
        self, conn: _Conn, op: _Outbound, mapped: MappedRegion | None, link: NcclLink | None
    ) -> AiokvpipeError | None:
        sock, what = conn.sock, f"write to {conn.owner}"
        settled, result = await self._open_transfer(
            conn, op, mapped, link, what, "commit", "landed"
        )
        if settled:
            return result
        if op.gpu and op.host is None and not op.segs.redirected:
            await self._stage_out(op)  # we meant to copy by IPC; the owner said stream
        segs = self._stream_segs(op)
        await self._send_payload(sock, conn.path, segs, what)
        verdict: protocol.Status = "abort" if op.segs.redirected else "commit"
        await protocol.send_message(sock, Kind.STATUS, protocol.status(verdict), what)
        answer = await protocol.expect_message(sock, Kind.STATUS, what)
        value = protocol.parse_status(answer, frozenset(("landed", "aborted", "error")), what)
        if value == "error":
            return protocol.remote_error(answer.body, f"owner {conn.owner}")
        if (value == "aborted") != (verdict == "abort"):
            raise MalformedFrameError(f"{what}: owner answered {value!r} to {verdict!r}")
        return None

    async def _agreed(
        self,
        conn: _Conn,
        op: _Outbound,
        mapped: MappedRegion | None,
        link: NcclLink | None,
        what: str,
    ) -> tuple[AiokvpipeError | None, protocol.Path]:
        """The owner's REPLY: its refusal, or None and the path once it agreed to our size."""
        reply = await protocol.expect_message(conn.sock, Kind.REPLY, what)
        try:
            nbytes = protocol.parse_reply(reply, f"owner {conn.owner}", what)
        except BlockError as exc:
            return exc, "stream"
        if nbytes != op.nbytes:
            raise MalformedFrameError(
                f"{what}: owner announced {nbytes} payload bytes for blocks that hold {op.nbytes}"
            )
        path = protocol.reply_path(reply, what)
        if path == "ipc" and mapped is None:
            raise MalformedFrameError(f"{what}: owner chose CUDA IPC for a request without it")
        if path == "nccl" and link is None:
            raise MalformedFrameError(f"{what}: owner chose NCCL for a request without it")
        if path == "stream" and mapped is not None:
            # The owner registered the region anew since we mapped it: the
            # mapping holds memory it no longer uses. Map the new one next time.
            maps = self._maps.get(conn.peer)
            if maps is not None:
                maps.drop(op.region)
        return None, path

    # ------------------------------------------------------------ GPU regions
    async def _settle(self, event: Any, what: str, on_done: Callable[[], None]) -> None:
        """Await a device copy; if we stop waiting first, ``on_done`` runs when it completes."""
        try:
            await wait_event(event, timeout=self._op_timeout, what=what)
        except BaseException:
            self._reaper.later(event, on_done, what)
            raise
        on_done()

    def _stream_segs(self, op: _Outbound) -> Segments:
        """What the socket or ring moves for ``op``: its blocks, or a GPU region's staged bytes."""
        if not op.gpu:
            return op.segs
        receive = op.op == "read"
        if op.segs.redirected or (op.host is None and not receive):
            segs = Segments.scratch(op.nbytes, receive=receive)
        else:
            if op.host is None:
                assert op.local.placement is not None
                op.host = self._gpu.ops(op.local.placement).empty_pinned(op.nbytes)
            segs = Segments([byte_view(op.host)] if op.nbytes else [], receive=receive)
            self.staged_bytes += op.nbytes
        op.segs = segs  # stop() redirects what is moving now
        return segs

    async def _stage_out(self, op: _Outbound) -> None:
        assert op.local.placement is not None
        ops = self._gpu.ops(op.local.placement)
        what = f"staging {op.nbytes} bytes of region {op.region!r} to the host"
        op.host = await stage_out(
            ops, op.local, op.local_ids, op.layers, op.ready, self._settle, what
        )

    async def _stage_in(self, op: _Outbound) -> None:
        assert op.local.placement is not None and op.host is not None
        ops = self._gpu.ops(op.local.placement)
        what = f"copying {op.nbytes} staged bytes into region {op.region!r}"
        await stage_in(ops, op.local, op.local_ids, op.layers, op.host, None, self._settle, what)

    async def _mapping(self, conn: _Conn, op: _Outbound) -> MappedRegion | None:
        """The owner's region mapped here (mapped now if need be), or None: stage instead."""
        assert op.local.placement is not None
        key = op.local.placement
        maps = self._maps.get(conn.peer)
        if maps is None:
            try:
                memory = self._gpu.memory(key, conn.in_process)
            except AiokvpipeError:
                return None  # no cupy, say: staging needs none
            maps = self._maps[conn.peer] = PeerMaps(memory)
        mapped = maps.regions.get(op.region)
        if mapped is not None or op.region in maps.refused:
            return mapped
        what = f"mapping region {op.region!r} of {conn.owner}"
        first, tensors = 0, []
        ident: tuple[str, int, int] | None = None
        while True:
            body = {"ipc": 1, "region": op.region, "request_id": op.request[0]["request_id"]}
            await protocol.send_message(conn.sock, Kind.SETUP, {**body, "first": first}, what)
            answer = (await protocol.expect_message(conn.sock, Kind.SETUP, what)).body
            error = answer.get("error")
            if error is not None:
                if answer.get("retry") is not True:  # for good: stage from now on
                    maps.refused[op.region] = str(error)[:500]
                return None
            export_id, num_blocks, layers, part = parse_export_answer(answer, first, what)
            if ident is not None and ident != (export_id, num_blocks, layers):
                raise MalformedFrameError(f"{what}: the export changed between answers")
            ident = (export_id, num_blocks, layers)
            tensors.extend(part)
            first += len(part)
            if first >= layers:
                break
        try:
            return maps.map(
                op.region,
                export_id,
                num_blocks,
                tensors,
                lambda address, n: self._gpu.view(key, address, n),
            )
        except ProtocolError:
            raise
        except AiokvpipeError as exc:  # cannot map here (another GPU set, say): stage
            maps.refused[op.region] = str(exc)[:500]
            return None

    async def _ipc_copy(self, conn: _Conn, op: _Outbound, mapped: MappedRegion, what: str) -> None:
        """Copy the blocks through the mapping, every copy checked before the first is queued."""
        assert op.local.placement is not None
        remote = op.request[1]
        maps = self._maps[conn.peer]
        try:
            copies = plan_copies(op.op, op.local, op.local_ids, mapped, remote, op.layers, what)
        except ProtocolError:
            maps.drop(op.region)  # an export that lies is not kept for the next transfer
            raise
        if op.segs.redirected:
            return  # stopped before a copy was queued: nothing to undo
        mapped.busy += 1
        try:
            key = op.local.placement
            event = enqueue_copies(self._gpu.ops(key), self._gpu.stream(key), copies, op.ready)
        except BaseException:
            maps.copy_done(mapped)
            raise
        await self._settle(event, f"{what}: CUDA IPC copies", lambda: maps.copy_done(mapped))
        self.payload_bytes["cuda_ipc"] += op.nbytes

    async def _ipc_verdict(
        self,
        conn: _Conn,
        op: _Outbound,
        success: protocol.Status,
        counted: str,
        what: str,
        pending: asyncio.Future[protocol.Message] | None = None,
    ) -> AiokvpipeError | None:
        """Tell the owner the copies landed (or that we stopped); its answer.

        ``pending``: the read of that answer, already started (the NCCL path
        reads the socket while its transfer runs, to see the owner vanish).
        """
        verdict: protocol.Status = "abort" if op.segs.redirected else success
        try:
            await protocol.send_message(conn.sock, Kind.STATUS, protocol.status(verdict), what)
            if pending is not None:
                answer = await pending
            else:
                answer = await protocol.expect_message(conn.sock, Kind.STATUS, what)
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
        value = protocol.parse_status(answer, frozenset((counted, "aborted", "error")), what)
        if value == "error":
            return protocol.remote_error(answer.body, f"owner {conn.owner}")
        if (value == "aborted") != (verdict == "abort"):
            raise MalformedFrameError(f"{what}: owner answered {value!r} to {verdict!r}")
        return None

    # ------------------------------------------------------------ NCCL, requester side
    async def _nccl_link(self, conn: _Conn, op: _Outbound) -> NcclLink | None:
        """The connection's communicator (built now if need be), or None: stage instead."""
        assert op.local.placement is not None
        key = op.local.placement
        runs = len(run_counts(op.local_ids, op.request[1]))
        if not 0 < runs <= MAX_RUNS:
            return None  # no blocks, or too scattered for one REQUEST: this one stages
        link = conn.nccl
        if link is not None and not link.comm.aborted:
            return link if link.key == key else None  # built for another device: stage
        conn.nccl = None
        if conn.peer in self._nccl_refused:
            return None
        try:
            nccl, thread = self._gpu.nccl(key)
        except AiokvpipeError as exc:  # no cupy/NCCL here: stage from now on
            self._nccl_refused[conn.peer] = str(exc)[:500]
            return None
        link, why, retry = await ncclpath.connect(
            conn.sock,
            nccl,
            thread,
            self._gpu.ops(key),
            key,
            op.region,
            op.request[0]["request_id"],
            self._op_timeout,
            f"NCCL blocks with {conn.owner}",
        )
        if link is None and not retry:
            self._nccl_refused[conn.peer] = why
        conn.nccl = link
        return link

    async def _nccl_transfer(
        self, conn: _Conn, op: _Outbound, link: NcclLink, what: str
    ) -> asyncio.Future[protocol.Message]:
        """Post our half of the NCCL group, await it; the pending read of the owner's answer.

        Every segment is planned (and checked) before the group is queued.
        Stopped before that (cancelled, lease ended), the pair's framing still
        completes, through scratch memory, so the owner's half never hangs.
        """
        views = segments(
            op.local, op.local_ids, run_counts(op.local_ids, op.request[1]), op.layers, what
        )
        answer = asyncio.ensure_future(protocol.expect_message(conn.sock, Kind.STATUS, what))
        try:
            ops = self._gpu.ops(link.key)
            if op.segs.redirected:
                views = scratch_like(views)
                if views:  # freed on the current stream: not reused before the comm's use
                    ops.record_stream(views[0], link.comm.stream)
            ready = [e for e in (op.ready, fence(ops)) if e is not None]
            sends, recvs = (views, []) if op.op == "write" else ([], views)
            label = f"{what}: NCCL {op.op} of {op.nbytes} bytes in {len(views)} runs"
            await run_group(link, OWNER_RANK, sends, recvs, ready, answer, self._op_timeout, label)
        except BaseException:
            answer.cancel()
            link.close()  # queued work cannot be recalled: abort it (once)
            conn.nccl = None
            raise
        if not op.segs.redirected:
            self.payload_bytes["nccl"] += op.nbytes
        return answer

    # ------------------------------------------------------------ payloads
    async def _send_payload(
        self, sock: socket.socket, path: RingPath, segs: Segments, what: str
    ) -> None:
        """``segs`` to the peer: through our ring if this direction has one, else the socket."""
        if path.tx is not None:
            await path.send(segs, what)
            self.payload_bytes["shm"] += segs.total
        else:
            await send_segments(sock, segs, what)
            self.payload_bytes["tcp"] += segs.total

    async def _recv_payload(
        self, sock: socket.socket, path: RingPath, segs: Segments, what: str
    ) -> None:
        if path.rx is not None:
            await path.recv(segs, what)
            self.payload_bytes["shm"] += segs.total
        else:
            await recv_segments(sock, segs, what)
            self.payload_bytes["tcp"] += segs.total

    # ------------------------------------------------------------ connections
    async def _acquire(self, owner: str) -> _Conn:
        idle = self._idle.get(owner)
        while idle:
            conn = idle.pop()
            if _still_open(conn.sock):
                return conn
            conn.close()
        dialled = await self._dial(owner)
        sock = dialled.sock
        if self._closed:
            sock.close()
            raise PipeClosedError("block service closed while dialling")
        sock.setblocking(False)
        path = RingPath(self._shm and dialled.shared_memory, self._ring_bytes)
        ipc = self._shm and dialled.ipc  # transport="tcp" keeps GPU regions off IPC too
        nccl = self._shm and dialled.nccl  # ...and off NCCL
        return _Conn(sock, owner, dialled.peer, path, ipc, dialled.in_process, nccl)

    def _release(self, conn: _Conn) -> None:
        idle = self._idle.setdefault(conn.owner, [])
        if self._closed or len(idle) >= self._max_idle or conn.sock.fileno() < 0:
            conn.close()
        else:
            idle.append(conn)

    # ------------------------------------------------------------ inbound
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
                reply = protocol.reply_ok(segs.total)
                await protocol.send_message(sock, Kind.REPLY, reply, what)
                await self._send_payload(sock, path, segs, what)
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

    # ------------------------------------------------------------ CUDA IPC, owner side
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
            if lease.fence is not None:
                await self._lease_fence(lease, what)
            if lease.ended:
                body = protocol.error_body(lease.ended_error())
                await protocol.send_message(sock, Kind.REPLY, body, what)
                return
            reply = protocol.reply_ok(request.nbytes, "ipc")
            await protocol.send_message(sock, Kind.REPLY, reply, what)
            success: protocol.Status
            counted: protocol.Status
            success, counted = ("done", "ok") if request.op == "read" else ("commit", "landed")
            answer = await protocol.expect_message(sock, Kind.STATUS, what)
            value = protocol.parse_status(answer, frozenset((success, "abort")), what)
            if value == "abort":
                status = protocol.status("aborted")
            elif _ended(lease):  # the copies ran after the lease ended: they count for nothing
                status = protocol.status("error", lease.ended_error())
            else:
                lease.mark(request.blocks, request.layers)
                self.payload_bytes["cuda_ipc"] += request.nbytes
                status = protocol.status(counted)
            await protocol.send_message(sock, Kind.STATUS, status, what)
        except PeerClosedError as exc:
            lease.fail(
                PeerClosedError(f"{lease.describe}: {peer} was lost mid-{request.op}: {exc}")
            )
            raise

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
            if lease.fence is not None:
                await self._lease_fence(lease, what)
            if lease.ended:
                body = protocol.error_body(lease.ended_error())
                await protocol.send_message(sock, Kind.REPLY, body, what)
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
            success: protocol.Status
            counted: protocol.Status
            success, counted = ("done", "ok") if request.op == "read" else ("commit", "landed")
            value = protocol.parse_status(message, frozenset((success, "abort")), what)
            if value == "abort":
                status = protocol.status("aborted")
            elif _ended(lease):  # moved after the lease ended: counts for nothing
                status = protocol.status("error", lease.ended_error())
            else:
                lease.mark(request.blocks, request.layers)
                self.payload_bytes["nccl"] += request.nbytes
                status = protocol.status(counted)
            await protocol.send_message(sock, Kind.STATUS, status, what)
        except PeerClosedError as exc:
            lease.fail(
                PeerClosedError(f"{lease.describe}: {peer} was lost mid-{request.op}: {exc}")
            )
            raise
        except (CudaTransferError, TransferTimeout) as exc:
            lease.fail(exc)
            raise

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

    def _check_open(self) -> None:
        if self._closed:
            raise PipeClosedError("block service closed")

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


def _broke(op: _Outbound, error: BaseException) -> PeerClosedError:
    """Why a write queued or pending on a connection that broke fails (a fresh error each)."""
    fresh = PeerClosedError(
        f"{op.describe()}: the block connection to the owner broke with writes of this "
        f"request queued on it: {error}"
    )
    fresh.__cause__ = error
    return fresh


def _retrieve(future: asyncio.Future[Any]) -> None:
    """An answer nobody awaits (its writer was stopped) is not news for the loop."""
    if not future.cancelled():
        future.exception()


def _ended(lease: Lease) -> bool:
    """``lease.ended`` read afresh (after an await, where mypy would keep its old value)."""
    return lease.ended


def _still_open(sock: socket.socket) -> bool:
    """An idle pooled connection the owner has not closed (nor written to)."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
    return False  # EOF, or bytes nobody asked for: either way unusable
