"""Endpoint: named, elastic, many-to-many links between instances.

A Pipe is a fixed ring of ranks that start and die together; a serving
fleet is many prefill and decode instances that come, go, crash and restart
while the rest keep serving. An Endpoint listens on one address and links
to any other endpoint by address::

    async with await Endpoint.start(EndpointConfig(name="prefill-0", token=T)) as ep:
        await ep.send("10.0.0.7:41234", tensor)    # dialled on first use, then reused
        src, obj = await ep.recv()                  # from any peer, in order per peer

Built on the link layer shared with Pipe (:mod:`aiokvpipe.links`): one
listener (handshake deadline, cap on unauthenticated connections), the token
handshake both ways, transports chosen per direction by ``choose_transport``,
and sending through the same :class:`~aiokvpipe.outbound.Outbound` as Pipe
(window, Transfer, errors, cancellation). Per direction the sender dials a
*session* (heartbeats, :mod:`aiokvpipe.links.heartbeat`) and a *data*
connection (the transport); :mod:`aiokvpipe.peers` keeps the per-peer state.

Liveness and fencing: a peer silent for ``peer_timeout``, or whose process
exited, is declared dead: every send, flush and Transfer bound to it fails
with PeerClosedError naming it (and how long it was silent). A new instance
on a known address (a restart) fences the old one the same way and drops
its undelivered messages. The next ``send`` dials afresh.

Hooks for services on the same links (paged blocks): :meth:`serve` and
:meth:`dial` give authenticated sockets for a purpose of your own;
:meth:`on_peer_event` reports instances that died, closed or were replaced.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch

from ._timeouts import deadline
from .blocks import BlockRegion, BlockService, Lease
from .blocks.wiring import attach as attach_blocks
from .config import EndpointConfig
from .cuda.runtime import require_usable_device
from .errors import (
    ConfigError,
    PeerClosedError,
    PeerUnreachableError,
    PipeClosedError,
    ProtocolError,
    TransferTimeout,
)
from .links.accept import Handler, Incoming, Listener
from .links.channels import open_receiver, open_sender
from .links.dial import Dialed, dial
from .links.heartbeat import EndKind, Heartbeat
from .links.net import host_identity
from .metrics import LatencyHistogram
from .outbound import Outbound, Transfer
from .peers import (
    Inbox,
    InLink,
    Interruptible,
    OutLink,
    PeerEvent,
    PeerState,
    PeerStats,
    parse_address,
)
from .transport.base import Link, PeerInfo
from .wire import message_charge

__all__ = ["Endpoint", "PeerEvent", "PeerStats"]

RESERVED_PURPOSES = frozenset({"session", "data", "register", "ring"})
_DEFAULT: Any = object()
# Direct reads (see Endpoint._next) need Task.cancelling() (3.11) to tell an
# interrupt from a cancel that arrived at the same time; 3.10 always pumps.
_DIRECT = sys.version_info >= (3, 11)


class _DirectRead:
    """A recv task parked on a channel in a direct read, and how to stop it.

    :meth:`interrupt` cancels the task (which cancels the channel future it
    waits on, or makes its next step raise); the read withdraws that cancel
    with ``uncancel`` and looks again. ``cancels`` is the task's count of
    pending cancel requests before ours: any more means someone else
    cancelled it too, and that cancel propagates.
    """

    __slots__ = ("cancels", "interrupted", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.cancels = task.cancelling()
        self.interrupted = False

    def interrupt(self) -> None:
        if not self.interrupted:
            self.interrupted = True
            self.task.cancel()


def _cancels() -> int:
    """Cancel requests pending on the current task (3.11+; 0 before).

    Compared before and after an interrupted read: a count that grew means
    the task was also cancelled, and that cancel must propagate.
    """
    task = asyncio.current_task()
    return task.cancelling() if _DIRECT and task is not None else 0


class Endpoint:
    """One instance's end of a fleet of links. Create with :meth:`start`."""

    def __init__(self, config: EndpointConfig, listener: Listener, local: PeerInfo) -> None:
        self.config = config
        self._listener = listener
        self._local = local
        self.name = local.label
        self._peers: dict[str, PeerState] = {}
        self._canon: dict[str, str] = {}
        self._sessions: dict[str, InLink] = {}
        self._inbox = Inbox(config.buffer_bytes)
        # Links whose pump runs (until the stream ends); with exactly one, recv
        # may read it directly (_direct_link, the reads in _direct_reads).
        self._live_in: set[InLink] = set()
        self._direct_link: InLink | None = None
        self._direct_reads: set[_DirectRead] = set()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._listeners: list[Callable[[PeerEvent], None]] = []
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        self.latency = LatencyHistogram()
        self._blocks: BlockService | None = None  # set by start(): paged-block transfers

    # -- construction ----------------------------------------------------------
    @classmethod
    async def start(cls, config: EndpointConfig) -> Endpoint:
        """Listen on ``config.host:config.port`` and serve peers; returns at once."""
        require_usable_device(config.device, config.transport)
        listener = Listener(
            config.host,
            config.port,
            token=config.token_bytes,
            what=f"endpoint {config.name or config.host}",
            handshake_timeout=config.handshake_timeout,
            max_pending=config.max_pending_handshakes,
        )
        local = PeerInfo(
            rank=-1,
            address=config.advertise_host or config.host,
            port=listener.port,
            host_id=host_identity(),
            pid=os.getpid(),
            device=config.device,
            transport=config.transport,
            instance=secrets.token_hex(8),
        )
        local = PeerInfo(**{**local.__dict__, "name": config.name or local.endpoint})
        ep = cls(config, listener, local)
        listener.serve("session", ep._on_session)
        listener.serve("data", ep._on_data)
        ep._blocks = attach_blocks(ep, op_timeout=config.op_timeout)
        listener.start()
        return ep

    # -- properties ------------------------------------------------------------
    @property
    def address(self) -> str:
        """``host:port`` that peers dial (``[v6]:port`` for IPv6)."""
        return self._local.endpoint

    @property
    def local(self) -> PeerInfo:
        """What this endpoint tells peers about itself (its instance id included)."""
        return self._local

    @property
    def instance(self) -> str:
        """Fresh per start: a restart on the same address is a new instance."""
        return self._local.instance

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise PipeClosedError(f"endpoint {self.name} is closed")

    def _state(self, key: str) -> PeerState:
        state = self._peers.get(key)
        if state is None:
            state = self._peers[key] = PeerState(key)
        return state

    def _key(self, address: str) -> str:
        key = self._canon.get(address)
        if key is None:
            key = parse_address(address)[2]
            if len(self._canon) > 4096:
                self._canon.clear()
            self._canon[address] = key
        return key

    # -- sending ---------------------------------------------------------------
    async def send(
        self, address: str, tensor: torch.Tensor | None, *, timeout: float | None = _DEFAULT
    ) -> Transfer:
        """Accept ``tensor`` (or None) for the endpoint at ``address``, in order.

        Same contract as :meth:`Pipe.send <aiokvpipe.pipe.Pipe.send>`. The
        first send to an address dials it (bounded by ``connect_timeout``,
        else PeerUnreachableError). After the peer died, the next send raises
        its PeerClosedError once if data accepted for it never left, and
        dials afresh after that.
        """
        self._check_open()
        state = self._peers.get(self._key(address))
        out = state.out if state is not None else None
        if out is None or not out.ready:
            out = await self._ready_out(self._key(address))
        assert out.outbound is not None
        wait = self.config.op_timeout if timeout is _DEFAULT else timeout
        return await out.outbound.send(tensor, wait)

    async def _ready_out(self, key: str) -> OutLink:
        state = self._state(key)
        out = state.out
        if out is not None and out.dead is not None:
            state.out = None
            outbound = out.outbound
            if outbound is not None and outbound.error is not None:
                if not outbound.error_reported:
                    outbound.error_reported = True
                    raise outbound.error  # data accepted for the dead peer never left
            out = None
        if out is None:
            host, port, _ = parse_address(key)
            out = state.out = OutLink(host, port, key)
            task = asyncio.ensure_future(self._connect(state, out))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            out.connecting = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        assert out.connecting is not None
        before, mine = out.turn, asyncio.get_running_loop().create_future()
        out.turn = mine
        try:
            await asyncio.shield(out.connecting)
            if before is not None and not before.done():
                await asyncio.shield(before)  # the sender queued before us goes first
        except BaseException:
            if out.connecting.done() and state.out is out:
                state.out = None  # the next send dials again
            raise
        finally:
            # Our turn is over once the caller enters the outbound queue, which
            # it does before the next waiter wakes (a callback: next loop turn).
            # Cancelled while an earlier sender still waits: the turn passes
            # on only after that one's.
            def over(_: object = None) -> None:
                mine.set_result(None)
                if out.turn is mine:
                    out.turn = None

            if before is None or before.done():
                over()
            else:
                before.add_done_callback(over)
        if out.dead is not None:
            raise out.dead
        return out

    async def _connect(self, state: PeerState, out: OutLink) -> None:
        cfg = self.config
        until = time.monotonic() + cfg.connect_timeout
        what = f"{self.name} -> {out.address}"
        session_id = secrets.token_hex(8)
        try:
            session = await dial(
                out.host,
                out.port,
                purpose="session",
                local=self._local,
                token=cfg.token_bytes,
                until=until,
                what=what,
                extra={"session": session_id},
            )
        except (TransferTimeout, PeerClosedError) as exc:
            self._count_error(state, exc)
            raise PeerUnreachableError(
                f"{what}: no endpoint answered within connect_timeout={cfg.connect_timeout:g}s "
                f"({exc})"
            ) from exc
        peer = session.peer
        if peer is None or not peer.instance:
            session.sock.close()
            raise ProtocolError(f"{what}: the peer did not say who it is")
        self._met(state, peer)
        out.peer = peer
        out.heartbeat = self._heartbeat(session.sock, state, peer)
        try:
            data = await dial(
                out.host,
                out.port,
                purpose="data",
                local=self._local,
                token=cfg.token_bytes,
                until=until,
                what=what,
                extra={"session": session_id, "to_instance": peer.instance},
            )
            out.transport, sender = await open_sender(
                Link(cfg, data.sock, "send", self._local, peer)
            )
            # A GPU transport's set-up failure is the first send's error, not a
            # later surprise in the background.
            await sender.ready()
        except BaseException as exc:
            if isinstance(exc, Exception):
                self._count_error(state, exc)
            out.heartbeat.stop()
            raise
        outbound = Outbound(
            sender,
            window_bytes=cfg.buffer_bytes,
            max_frame_bytes=cfg.max_frame_bytes,
            describe=lambda op: f"{op} on {self.name} -> {peer.label}",
            closed_error=lambda: PipeClosedError(f"endpoint {self.name} is closed"),
        )
        outbound.on_sent = lambda nbytes, seconds: self._on_sent(state, nbytes, seconds)
        out.outbound = outbound
        if out.dead is not None:  # the session ended while the data link opened
            self._end_out(out, out.dead)

    def _on_sent(self, state: PeerState, nbytes: int, seconds: float) -> None:
        state.bytes_sent += nbytes
        state.messages_sent += 1
        self.latency.observe(seconds)

    async def flush(self, address: str | None = None, *, timeout: float | None = _DEFAULT) -> None:
        """Wait until everything accepted for ``address`` (None: every peer) has left.

        Raises why a transfer could not complete (the first such error).
        """
        self._check_open()
        wait = self.config.op_timeout if timeout is _DEFAULT else timeout
        if address is not None:
            state = self._peers.get(self._key(address))
            outs = [state.out] if state is not None and state.out is not None else []
        else:
            outs = [s.out for s in self._peers.values() if s.out is not None]
        drains = [o.outbound.drain(wait) for o in outs if o.outbound is not None]
        errors = [r for r in await asyncio.gather(*drains, return_exceptions=True) if r]
        if errors:
            raise errors[0]

    # -- receiving ------------------------------------------------------------
    async def recv(self, *, timeout: float | None = _DEFAULT) -> tuple[str, torch.Tensor | None]:
        """The next ``(peer address, tensor or None)`` from any peer; in order per peer.

        With the inbox empty and exactly one live link, the channel's own
        ``recv`` is awaited right here (a *direct read*: the transport wakes
        this task itself, as in a Pipe; no pump hop, no extra frame). When
        another link needs serving, the link is fenced, or we close,
        :meth:`_leave_direct` takes the read back off the channel (a cancel
        of this task that is withdrawn at once: the channel's recv is
        cancellation-safe, so it took nothing) and the loop falls back to
        the inbox.
        """
        if self._closed:
            self._check_open()
        wait = self.config.op_timeout if timeout is _DEFAULT else timeout
        if wait is not None:
            async with deadline(wait, lambda: f"recv on {self.name}: nothing arrived"):
                return await self.recv(timeout=None)
        inbox = self._inbox
        while _DIRECT and not len(inbox):
            link = self._direct_link or self._enter_direct()
            if link is None:
                break
            receiver = link.receiver
            assert receiver is not None
            task = asyncio.current_task()
            assert task is not None
            read = _DirectRead(task)
            self._direct_reads.add(read)
            try:
                obj = await receiver.recv()
            except asyncio.CancelledError:
                self._direct_reads.discard(read)
                if read.interrupted and task.uncancel() == read.cancels:
                    continue  # only our interrupt: nothing was consumed, look again
                # Cancelled (a timeout, or the caller's own cancel): a caller
                # that stopped reading gets the pump back, so that what
                # arrives meanwhile is queued (and counted) in the inbox.
                if not self._direct_reads:
                    self._leave_direct()
                raise
            except (PeerClosedError, PipeClosedError, ProtocolError):
                # The stream ended or broke (the error is sticky): the pump,
                # released, meets it too and ends the link as usual.
                self._direct_reads.discard(read)
                link.direct_ok = False
                self._leave_direct()
                continue
            except BaseException:
                self._direct_reads.discard(read)
                raise
            self._direct_reads.discard(read)
            state = link.state
            assert state is not None
            state.bytes_received += 0 if obj is None else obj.numel() * obj.element_size()
            state.messages_received += 1
            return link.address, obj
        link, obj, charge = await inbox.get()
        inbox.window.release(charge)
        return link.address, obj

    def _enter_direct(self) -> InLink | None:
        """Make the only live link readable by recv directly, if there is one
        and nothing of it is queued or in the pump's hands."""
        if self._closed or len(self._live_in) != 1:
            return None
        link = next(iter(self._live_in))
        if (
            link.dead is not None
            or not link.direct_ok
            or link.holding
            or (link.after is not None and not link.after.finished.is_set())
        ):
            return None
        self._direct_link = link
        link.gate = asyncio.get_running_loop().create_future()
        if link.reading is not None:
            link.reading.interrupt()  # the pump's parked recv: it takes nothing more
        return link

    def _leave_direct(self) -> None:
        """Hand the direct link back to its pump (every direct read stops taking)."""
        link = self._direct_link
        if link is None:
            return
        self._direct_link = None
        for read in self._direct_reads:
            read.interrupt()  # never the running task: it left the set first
        gate, link.gate = link.gate, None
        if gate is not None and not gate.done():
            gate.set_result(None)

    # -- the listening side ----------------------------------------------------
    async def _on_session(self, incoming: Incoming) -> None:
        peer, session_id = incoming.peer, str(incoming.message.get("session", ""))
        if self._closed:
            await incoming.refuse(f"endpoint {self.name} is closing")
            return
        if not session_id or session_id in self._sessions:
            await incoming.refuse("a session needs a fresh id")
            return
        state = self._state(peer.endpoint)
        self._met(state, peer)
        await incoming.accept(self._local)
        link = InLink(peer, session_id, heartbeat=None, state=state)  # type: ignore[arg-type]
        link.heartbeat = self._heartbeat(incoming.sock, state, peer, inlink=link)
        self._sessions[session_id] = link
        state.inlinks.append(link)

    async def _on_data(self, incoming: Incoming) -> None:
        peer = incoming.peer
        link = self._sessions.pop(str(incoming.message.get("session", "")), None)
        if (
            link is None
            or link.dead is not None
            or (peer.instance, peer.process_id) != (link.peer.instance, link.peer.process_id)
            or incoming.message.get("to_instance") != self._local.instance
        ):
            await incoming.refuse("no such session here (or it belongs to another instance)")
            return
        await incoming.accept()
        state = self._state(peer.endpoint)
        try:
            link.transport, receiver = await open_receiver(
                Link(self.config, incoming.sock, "recv", self._local, link.peer)
            )
        except BaseException as exc:
            if isinstance(exc, Exception):
                self._count_error(state, exc)
            link.heartbeat.stop()
            self._drop_inlink(state, link)
            raise
        link.receiver = receiver
        older = [o for o in state.inlinks if o is not link and not o.finished.is_set()]
        link.after = older[-1] if older else None
        link.pump = asyncio.ensure_future(self._pump(state, link))
        self._tasks.add(link.pump)
        link.pump.add_done_callback(self._tasks.discard)
        self._live_in.add(link)
        if len(self._live_in) > 1:
            self._leave_direct()  # two links now: both are pumped into the inbox
        if not link.alive:  # its session ended while the receiver opened
            link.pump.cancel()

    async def _pump(self, state: PeerState, link: InLink) -> None:
        """Move one peer session's messages into the inbox, in order."""
        receiver = link.receiver
        assert receiver is not None
        try:
            if link.after is not None:
                await link.after.finished.wait()  # an older link of this peer first
            while True:
                if link.gate is not None:  # recv reads this link directly meanwhile
                    await link.gate
                    continue
                read = link.reading = Interruptible(receiver.recv())
                cancels = _cancels()
                try:
                    obj = await read
                except asyncio.CancelledError:
                    if read.interrupted and _cancels() == cancels:
                        continue  # recv took the link over; nothing was taken
                    raise
                finally:
                    link.reading = None
                link.holding = True
                nbytes = 0 if obj is None else obj.numel() * obj.element_size()
                charge = message_charge(nbytes)
                await self._inbox.window.acquire(charge)
                state.bytes_received += nbytes
                state.messages_received += 1
                self._inbox.put((link, obj, charge))
                link.holding = False
        except ProtocolError as exc:  # garbage from an authenticated peer
            self._count_error(state, exc)
            self._declare(state, link.peer.instance, exc, "dead", "broken")
        except (PeerClosedError, PipeClosedError):
            pass  # its session tells whether the peer closed, died, or we closed
        finally:
            self._live_in.discard(link)
            if self._direct_link is link:
                self._leave_direct()
            link.finished.set()
            self._drop_inlink(state, link)
            await asyncio.shield(receiver.aclose())

    def _drop_inlink(self, state: PeerState, link: InLink) -> None:
        if link in state.inlinks and (link.dead is not None or link.receiver is None):
            state.inlinks.remove(link)

    # -- liveness and fencing ------------------------------------------------------
    def _heartbeat(
        self,
        sock: Any,
        state: PeerState,
        peer: PeerInfo,
        inlink: InLink | None = None,
    ) -> Heartbeat:
        def ended(error: PeerClosedError, kind: EndKind) -> None:
            if inlink is not None:
                self._inlink_ended(state, inlink, error, kind)
            event = "closed" if kind == "goodbye" else "dead"
            self._declare(state, peer.instance, error, event, kind)

        hb = Heartbeat(
            sock,
            interval=self.config.heartbeat_interval,
            timeout=self.config.peer_timeout,
            what=f"{self.name}: peer {peer.label} at {peer.endpoint}",
            on_end=ended,
        )
        hb.start()
        return hb

    def _met(self, state: PeerState, peer: PeerInfo) -> None:
        """We learned which instance serves ``state.address``; a new one fences the old."""
        old = state.instance
        if old and old != peer.instance:
            error = PeerClosedError(
                f"{state.name or state.address} at {state.address} restarted: instance {old} "
                f"was replaced by {peer.instance}; what was bound to the old one is void"
            )
            self._declare(state, old, error, "replaced", "silent")
            # Nothing the old instance sent surfaces once the new one is here.
            self._inbox.drop(lambda item: item[0].peer.instance != old)
        state.instance = peer.instance
        state.name = peer.label
        state.announced.discard(peer.instance)
        state.gone = None

    def _declare(
        self, state: PeerState, instance: str, error: BaseException, kind: Any, end: EndKind
    ) -> None:
        """Instance ``instance`` of ``state.address`` is gone: end all its links
        (``end``: how, which decides whether inbound data still drains) and
        tell the listeners once."""
        out = state.out
        if out is not None and out.dead is None and out.peer is not None:
            if out.peer.instance == instance:
                self._end_out(out, error)
        for link in list(state.inlinks):
            if link.peer.instance == instance and link.dead is None:
                self._inlink_ended(state, link, error, end)
        if instance in state.announced or self._closed:
            return
        state.announced.add(instance)
        state.gone = kind
        if kind != "closed":
            self._count_error(state, error)
        event = PeerEvent(state.address, instance, kind, error)
        for callback in list(self._listeners):
            try:
                callback(event)
            except Exception as exc:  # a listener's bug must not break liveness
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "peer event callback failed", "exception": exc}
                )

    def _end_out(self, out: OutLink, error: BaseException) -> None:
        out.dead = error
        if out.heartbeat is not None:
            out.heartbeat.stop()
        if out.outbound is not None:
            out.outbound.fence(error)
            closing = asyncio.ensure_future(out.outbound.sender.aclose(graceful=False))
            self._tasks.add(closing)
            closing.add_done_callback(self._tasks.discard)

    def _inlink_ended(
        self, state: PeerState, link: InLink, error: BaseException, kind: EndKind
    ) -> None:
        if link.dead is not None:
            return
        link.dead = error
        link.heartbeat.stop()
        self._sessions.pop(link.session, None)
        if self._direct_link is link:
            # Now, not when the pump gets its turn: a fenced instance's next
            # message must not reach a direct read in between.
            self._leave_direct()
        pump = link.pump
        if pump is None:
            self._drop_inlink(state, link)
        elif kind in ("eof", "goodbye"):
            # The peer closed or exited: its data connection ends right after
            # what it sent; let the pump deliver that, within close_timeout.
            timer = asyncio.get_running_loop().call_later(self.config.close_timeout, pump.cancel)
            pump.add_done_callback(lambda _t: timer.cancel())
        else:
            pump.cancel()  # silent or replaced: nothing more from it is trusted

    def _count_error(self, state: PeerState, error: BaseException) -> None:
        state.errors += 1
        state.last_error = f"{type(error).__name__}: {error}"

    # -- hooks for services on the same links ---------------------------------------
    def on_peer_event(self, callback: Callable[[PeerEvent], None]) -> Callable[[], None]:
        """Call ``callback(PeerEvent)`` (on the loop, synchronously) whenever a
        peer instance is declared dead, closes, or is replaced by a restart.
        Returns a function that unsubscribes."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def serve(self, purpose: str, handler: Handler) -> None:
        """Hand authenticated inbound connections dialled with ``purpose`` to
        ``handler(incoming)``, which owns ``incoming.sock`` (answer with
        ``await incoming.accept(ep.local)`` or ``incoming.refuse(reason)``;
        ``incoming.peer`` names the caller's address and instance)."""
        if purpose in RESERVED_PURPOSES:
            raise ConfigError("purpose", f"{purpose!r} is reserved by the link layer")
        self._listener.serve(purpose, handler)

    async def dial(
        self,
        address: str,
        purpose: str,
        *,
        extra: dict[str, Any] | None = None,
        retry_refused: bool = True,
    ) -> Dialed:
        """An authenticated connection to the endpoint at ``address`` for
        ``purpose`` (served there with :meth:`serve`), owned by the caller.

        ``Dialed.peer`` is the acceptor's PeerInfo if its handler sent one.
        Bounded by ``connect_timeout``; PeerUnreachableError if nobody answers.
        A refused connection is retried (the peer may be starting) unless
        ``retry_refused`` is False: then it fails at once, for calls that need
        state only the instance that was there had (a lease, say).
        """
        self._check_open()
        if purpose in RESERVED_PURPOSES:
            raise ConfigError("purpose", f"{purpose!r} is reserved by the link layer")
        host, port, key = parse_address(address)
        what = f"{self.name} -> {key} ({purpose})"
        try:
            return await dial(
                host,
                port,
                purpose=purpose,
                local=self._local,
                token=self.config.token_bytes,
                until=time.monotonic() + self.config.connect_timeout,
                what=what,
                extra=extra,
                retry_refused=retry_refused,
            )
        except (TransferTimeout, PeerClosedError) as exc:
            if isinstance(exc, PeerClosedError) and "refused:" in str(exc):
                raise
            raise PeerUnreachableError(f"{what}: {exc}") from exc

    # -- paged blocks (aiokvpipe.blocks; docs/blocks.md) --------------------------
    @property
    def blocks(self) -> BlockService:
        """The paged-block service on this endpoint's links (regions, leases, counters)."""
        self._check_open()
        assert self._blocks is not None
        return self._blocks

    def register(self, name: str, tensors: Any, block_dim: int) -> BlockRegion:
        """Register ``tensors`` (one tensor or a list, e.g. one per layer) as paged
        memory ``name``; block ``i`` of a tensor is index ``i`` on ``block_dim``.
        Peers reach it only through leases (:meth:`expose`, :meth:`expect`)."""
        return self.blocks.register(name, tensors, block_dim)

    def unregister(self, name: str) -> None:
        """Forget region ``name``; its leases end and its transfers stop."""
        self.blocks.unregister(name)

    def expose(
        self, request_id: str, name: str, blocks: Any, ttl: float, layers: Any = None
    ) -> Lease:
        """Grant peers READ access to ``blocks`` of ``name`` for ``request_id``, for ``ttl`` s.

        ``await lease.wait()`` returns once a reader took every block (and
        layer), raises TransferTimeout at ``ttl`` and PeerClosedError if the
        reader dies mid-read; until then the blocks must not be reused.
        """
        return self.blocks.expose(request_id, name, blocks, ttl, layers)

    def expect(
        self, request_id: str, name: str, blocks: Any, ttl: float, layers: Any = None
    ) -> Lease:
        """Grant peers WRITE access to ``blocks``; the lease completes when every
        layer of every block has landed (a push may come layer by layer)."""
        return self.blocks.expect(request_id, name, blocks, ttl, layers)

    async def read(
        self,
        owner_address: str,
        request_id: str,
        name: str,
        remote_blocks: Any,
        local_blocks: Any,
        layers: Any = None,
        *,
        timeout: float | None = _DEFAULT,
    ) -> None:
        """Pull the owner's exposed ``remote_blocks`` into our ``local_blocks`` (same order).

        If the owner dies mid-read: PeerClosedError, and the destination
        blocks are undefined (nothing else is written).
        """
        self._check_open()
        await self.blocks.read(
            owner_address,
            request_id,
            name,
            remote_blocks,
            local_blocks,
            layers,
            **({} if timeout is _DEFAULT else {"timeout": timeout}),
        )

    async def write(
        self,
        owner_address: str,
        request_id: str,
        name: str,
        local_blocks: Any,
        remote_blocks: Any,
        layers: Any = None,
        *,
        timeout: float | None = _DEFAULT,
    ) -> None:
        """Push our ``local_blocks`` into the owner's expected ``remote_blocks``;
        returns once they landed. Call once per layer to overlap with compute."""
        self._check_open()
        await self.blocks.write(
            owner_address,
            request_id,
            name,
            local_blocks,
            remote_blocks,
            layers,
            **({} if timeout is _DEFAULT else {"timeout": timeout}),
        )

    # -- metrics -----------------------------------------------------------------
    def stats(self) -> dict[str, PeerStats]:
        """Per peer address: bytes and messages each way, last heard, transports, errors."""
        return {key: state.snapshot() for key, state in self._peers.items()}

    # -- closing ----------------------------------------------------------------
    async def aclose(self) -> None:
        """Flush every peer (bounded by ``close_timeout``), say goodbye, free everything.

        Idempotent; frees sockets and tasks even when cancelled. Raises a send
        error no earlier call reported (data that never left).
        """
        if self._closing is not None:
            await asyncio.shield(self._closing)
            return
        self._closing = asyncio.get_running_loop().create_future()
        closing = asyncio.ensure_future(self._shutdown())
        try:
            unreported = await asyncio.shield(closing)
        finally:
            if not closing.done():
                await asyncio.wait({closing})
            if not self._closing.done():
                self._closing.set_result(None)
        if unreported is not None:
            raise unreported

    async def _shutdown(self) -> BaseException | None:
        if self._blocks is not None:
            await self._blocks.aclose()  # before the listener: it owns block sockets
        await self._listener.aclose()
        outs = [s.out for s in self._peers.values() if s.out is not None]
        for out in outs:
            if out.connecting is not None and not out.connecting.done():
                out.connecting.cancel()
        results = await asyncio.gather(
            *(o.outbound.aclose(self.config.close_timeout) for o in outs if o.outbound),
            return_exceptions=True,
        )
        self._closed = True
        self._leave_direct()
        for state in self._peers.values():
            if state.out is not None and state.out.heartbeat is not None:
                state.out.heartbeat.stop(goodbye=True)
            for link in list(state.inlinks):
                link.heartbeat.stop(goodbye=True)
                link.dead = link.dead or PipeClosedError(f"endpoint {self.name} is closed")
                if link.pump is not None:
                    link.pump.cancel()
        self._inbox.close(PipeClosedError(f"endpoint {self.name} is closed"))
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        unreported = [r for r in results if isinstance(r, BaseException)]
        return unreported[0] if unreported else None

    async def __aenter__(self) -> Endpoint:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Endpoint {self.name} at {self.address} peers={len(self._peers)} {state}>"
