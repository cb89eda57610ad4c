"""The state every part of a :class:`~aiokvpipe.blocks.service.BlockService` shares.

:class:`ServiceCore` holds the regions, leases, connection pool, transfers
in flight and counters, and the few helpers both sides use (payloads on the
socket or ring, settling device copies, the pool). The requester side
(:mod:`.requester`, :mod:`.requester_gpu`) and the owner side (:mod:`.owner`,
:mod:`.owner_gpu`) are mixins over it; :mod:`.service` puts them together.
The connection and transfer records below are shared by all of them.
"""

from __future__ import annotations

import asyncio
import socket
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch

from ..cuda.events import wait_event
from ..errors import (
    AiokvpipeError,
    ConfigError,
    PipeClosedError,
)
from . import protocol
from .gpu import (
    Export,
    GpuBackend,
    PeerMaps,
    Reaper,
    TorchGpu,
)
from .lease import Lease, LeaseKind, LeaseTable
from .ncclpath import (
    NcclLink,
)
from .region import BlockRegion, RegionTable
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


class ServiceCore:
    """State and shared helpers; see the module doc (and BlockService for the options)."""

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

    async def _settle(self, event: Any, what: str, on_done: Callable[[], None]) -> None:
        """Await a device copy; if we stop waiting first, ``on_done`` runs when it completes."""
        try:
            await wait_event(event, timeout=self._op_timeout, what=what)
        except BaseException:
            self._reaper.later(event, on_done, what)
            raise
        on_done()

    # ------------------------------------------------------------ payloads
    async def _send_payload(
        self, sock: socket.socket, path: RingPath, segs: Segments, what: str, prefix: bytes = b""
    ) -> None:
        """``segs`` to the peer: through our ring if this direction has one, else the socket.

        ``prefix``: the encoded message announcing the payload (a read's
        REPLY); on the socket it leaves with the payload's first bytes (see
        :func:`~aiokvpipe.blocks.sgio.send_segments`), on a ring path first.
        """
        if path.tx is not None:
            if prefix:
                await send_segments(sock, Segments([], receive=False), what, prefix)
            await path.send(segs, what)
            self.payload_bytes["shm"] += segs.total
        else:
            await send_segments(sock, segs, what, prefix)
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

    def _check_open(self) -> None:
        if self._closed:
            raise PipeClosedError("block service closed")


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
