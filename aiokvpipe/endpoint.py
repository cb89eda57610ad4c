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

The code: :mod:`.endpoint_core` holds the shared state and the direct-read
hand-over, :mod:`.endpoint_liveness` heartbeats and fencing,
:mod:`.endpoint_send` the outbound links and :mod:`.endpoint_recv` the
inbound ones and their pumps; :class:`Endpoint` mixes them and adds the
public calls, the hooks, paged blocks and closing.
"""

from __future__ import annotations

import asyncio
import os
import secrets
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
from .endpoint_core import _DIRECT, _DirectRead
from .endpoint_recv import ReceivingSide
from .endpoint_send import SendingSide
from .errors import (
    ConfigError,
    PeerClosedError,
    PeerUnreachableError,
    PipeClosedError,
    ProtocolError,
    TransferTimeout,
)
from .links.accept import Handler, Listener
from .links.dial import Dialed, dial
from .links.net import host_identity
from .outbound import Transfer
from .peers import PeerEvent, PeerStats, parse_address
from .transport.base import PeerInfo

__all__ = ["Endpoint", "PeerEvent", "PeerStats"]

RESERVED_PURPOSES = frozenset({"session", "data", "register", "ring"})
_DEFAULT: Any = object()


class Endpoint(SendingSide, ReceivingSide):
    """One instance's end of a fleet of links. Create with :meth:`start`."""

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
