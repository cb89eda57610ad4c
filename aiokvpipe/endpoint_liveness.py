"""Liveness and fencing for an :class:`~aiokvpipe.endpoint.Endpoint`.

The rules that end links live here, apart from moving data: a heartbeat
that ends (silence, EOF, a goodbye) ends the links of that instance; a new
instance on a known address (a restart) fences the old one and drops its
undelivered messages; :class:`~aiokvpipe.peers.PeerEvent` listeners hear of
each instance once. The sending side (:mod:`.endpoint_send`) and the
receiving side (:mod:`.endpoint_recv`) both build on this mixin.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .endpoint_core import EndpointCore
from .errors import PeerClosedError
from .links.heartbeat import EndKind, Heartbeat
from .peers import InLink, OutLink, PeerEvent, PeerState
from .transport.base import PeerInfo


class Liveness(EndpointCore):
    """Heartbeats, fencing and peer events; mixed into Endpoint."""

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
