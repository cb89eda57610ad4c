"""An Endpoint's view of its peers: addresses, links per direction, the inbox.

Per peer *address* the Endpoint keeps a :class:`PeerState`: the peer's
current instance id, our sending link to it (:class:`OutLink`), the links
it opened to us (:class:`InLink`, one per session; an older one may still
be draining) and the counters behind ``ep.stats()``.

A link direction = a *session* connection (heartbeats, see
:mod:`aiokvpipe.links.heartbeat`) + a *data* connection (the transport).
The sender dials both; the session is bound to the peer instance its hello
named, so fencing an instance ends exactly its links.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import torch

from .errors import ConfigError, PipeClosedError
from .links.heartbeat import Heartbeat
from .outbound import Outbound
from .semaphore import ByteSemaphore
from .transport import RecvChannel
from .transport.base import PeerInfo

PeerEventKind = Literal["dead", "replaced", "closed"]
T = TypeVar("T")


def parse_address(address: Any) -> tuple[str, int, str]:
    """``(host, port, canonical "host:port")``; ConfigError("address") if malformed."""
    if not isinstance(address, str):
        raise ConfigError("address", f"must be a 'host:port' string, got {address!r}")
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError("address", f"{address!r}: write an IPv6 address as '[::1]:port'")
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
        raise ConfigError("address", f"{address!r} is not 'host:port'")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ConfigError("address", f"{address!r}: port {port} is not a TCP port")
    return host, port, (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


@dataclass(frozen=True)
class PeerEvent:
    """A peer instance ended: ``"dead"`` (silent or its process exited),
    ``"replaced"`` (a new instance showed up on its address) or ``"closed"``
    (it closed its endpoint). ``error`` is what its operations failed with."""

    address: str
    instance: str
    kind: PeerEventKind
    error: BaseException


@dataclass
class PeerStats:
    """One peer, as ``ep.stats()`` reports it (a snapshot)."""

    address: str
    name: str
    instance: str
    state: str  # "up", "connecting", "dead", "closed", "replaced", "idle"
    bytes_sent: int
    messages_sent: int
    bytes_received: int
    messages_received: int
    last_heard: float | None  # seconds ago, None if never
    send_transport: str | None
    recv_transport: str | None
    errors: int
    last_error: str | None
    pending_bytes: int


@dataclass
class OutLink:
    """Our sending direction to one peer instance."""

    host: str
    port: int
    address: str
    peer: PeerInfo | None = None
    outbound: Outbound | None = None
    heartbeat: Heartbeat | None = None
    transport: str | None = None
    connecting: asyncio.Future[None] | None = None
    dead: BaseException | None = None
    # The last sender still queued for the dial: senders enter the outbound
    # queue in call order, each after the one before it (None: nobody queued).
    # Without it, a send made after the dial ended but before the senders that
    # waited for it resumed (they wake two loop turns later) overtook them.
    turn: asyncio.Future[None] | None = None

    @property
    def ready(self) -> bool:
        return self.outbound is not None and self.dead is None and self.turn is None


class Interruptible(Generic[T]):
    """``await`` a coroutine in the calling task, stoppable from outside.

    Why: a receive channel parks its caller on futures of its own, and only
    the task parked there is woken in one loop turn. The Endpoint lets
    ``recv`` park on a link's channel itself (no pump task in between) and
    must be able to take it back off when another link needs serving,
    without cancelling the caller's task.

    :meth:`interrupt` does to the coroutine what ``Task.cancel`` does: the
    future it waits on is cancelled, and it gets a CancelledError at that
    suspension (or at the next one, if it was already woken) instead of
    resuming normally. The task is not cancelled (no cancel request is
    counted); the ``await`` raises CancelledError with :attr:`interrupted`
    True. A cancellation-safe coroutine (every ``RecvChannel.recv``) thus
    loses nothing: from the moment :meth:`interrupt` returns it will take no
    further message.
    """

    __slots__ = ("_coro", "_waiting", "interrupted")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._waiting: Any = None
        self.interrupted = False

    def interrupt(self) -> None:
        if self.interrupted:
            return
        self.interrupted = True
        waiting = self._waiting
        if isinstance(waiting, asyncio.Future):
            waiting.cancel()  # wakes the task now (a no-op if it was woken already)

    def __await__(self) -> Generator[Any, Any, T]:
        coro = self._coro
        value: Any = None
        error: BaseException | None = None
        while True:
            if self.interrupted and error is None:
                error = asyncio.CancelledError()  # never resume it normally again
            try:
                step = coro.send(value) if error is None else coro.throw(error)
            except StopIteration as stop:
                result: T = stop.value
                return result
            self._waiting = step
            try:
                value, error = (yield step), None
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # the task threw it in (a cancel): pass it on
                value, error = None, exc
            finally:
                self._waiting = None


@dataclass(eq=False)  # identity: kept in sets, compared with ``is``
class InLink:
    """One session a peer opened to send to us.

    Its messages reach ``Endpoint.recv`` one of two ways: the ``pump`` task
    moves them into the Inbox, or, while it is the only live link and the
    inbox is empty, ``recv`` reads the channel itself (the Endpoint's
    "direct" mode) while the pump waits on ``gate``. Exactly one of the two
    reads the channel at any time, so per-link order holds.
    """

    peer: PeerInfo
    session: str
    heartbeat: Heartbeat
    receiver: RecvChannel | None = None
    transport: str | None = None
    pump: asyncio.Task[None] | None = None
    after: InLink | None = None  # an older link of this address, delivered first
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    dead: BaseException | None = None
    reading: Interruptible[Any] | None = None  # the pump's parked channel recv
    holding: bool = False  # the pump took a message and has not queued it yet
    gate: asyncio.Future[None] | None = None  # set: recv reads directly, the pump waits
    direct_ok: bool = True  # False once a direct read met the end of the stream
    state: PeerState | None = field(default=None, repr=False)  # its peer's (for counters)
    address: str = field(init=False)  # ``peer.endpoint``, computed once: recv returns it

    def __post_init__(self) -> None:
        self.address = self.peer.endpoint

    @property
    def alive(self) -> bool:
        return self.dead is None


@dataclass
class PeerState:
    """Everything about one peer address."""

    address: str
    name: str = ""
    instance: str = ""
    out: OutLink | None = None
    inlinks: list[InLink] = field(default_factory=list)
    bytes_sent: int = 0
    messages_sent: int = 0
    bytes_received: int = 0
    messages_received: int = 0
    errors: int = 0
    last_error: str | None = None
    announced: set[str] = field(default_factory=set)  # instances reported gone
    gone: str | None = None  # how the last instance ended ("dead", "closed", "replaced")

    def last_heard(self) -> float | None:
        beats = [link.heartbeat for link in self.inlinks]
        if self.out is not None and self.out.heartbeat is not None:
            beats.append(self.out.heartbeat)
        heard = [hb.last_heard for hb in beats if hb is not None]
        return time.monotonic() - max(heard) if heard else None

    def snapshot(self) -> PeerStats:
        out = self.out
        live_in = [link for link in self.inlinks if link.dead is None]
        if out is not None and out.ready:
            state = "up"
        elif out is not None and out.connecting is not None and not out.connecting.done():
            state = "connecting"
        elif live_in:
            state = "up"
        elif self.gone is not None:
            state = self.gone
        elif (out is not None and out.dead is not None) or self.inlinks:
            state = "dead"
        else:
            state = "idle"
        return PeerStats(
            address=self.address,
            name=self.name,
            instance=self.instance,
            state=state,
            bytes_sent=self.bytes_sent,
            messages_sent=self.messages_sent,
            bytes_received=self.bytes_received,
            messages_received=self.messages_received,
            last_heard=self.last_heard(),
            send_transport=out.transport if out is not None else None,
            recv_transport=live_in[-1].transport if live_in else None,
            errors=self.errors,
            last_error=self.last_error,
            pending_bytes=out.outbound.pending_bytes if out and out.outbound else 0,
        )


Item = tuple[InLink, "torch.Tensor | None", int]


class Inbox:
    """Messages from every peer, in arrival order, bounded in bytes.

    Each InLink's pump takes window (``message_charge`` of the message)
    before :meth:`put`; :meth:`get` gives it back. Cancellation-safe: a
    message handed to a waiter that was cancelled goes back to the front.
    """

    def __init__(self, capacity: int) -> None:
        self.window = ByteSemaphore(capacity)
        self._items: deque[Item] = deque()
        self._waiters: deque[asyncio.Future[Item]] = deque()
        self._error: BaseException | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Item, front: bool = False) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(item)
                return
        if front:
            self._items.appendleft(item)
        else:
            self._items.append(item)

    async def get(self) -> Item:
        if self._items:
            return self._items.popleft()
        if self._error is not None:
            raise self._error
        waiter: asyncio.Future[Item] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.put(waiter.result(), front=True)  # handed over, then cancelled
            raise

    def drop(self, keep: Callable[[Item], bool]) -> None:
        """Forget queued messages ``keep`` rejects (their window is given back)."""
        kept: deque[Item] = deque()
        for item in self._items:
            if keep(item):
                kept.append(item)
            else:
                self.window.release(item[2])
        self._items = kept

    def close(self, error: PipeClosedError) -> None:
        self._error = error
        self.window.close(error)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
        for item in self._items:
            self.window.release(item[2])
        self._items.clear()
