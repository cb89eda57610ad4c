"""The state every part of an :class:`~aiokvpipe.endpoint.Endpoint` shares.

:class:`EndpointCore` holds the peer table, the inbound sessions, the inbox
and the background tasks, plus the few helpers more than one part uses:
finding a peer's state, and the direct-read hand-over (which live link
``recv`` reads itself, and giving it back to its pump), which the receive
path, liveness (a fenced link) and closing all need. Liveness and fencing
(:mod:`.endpoint_liveness`) is a mixin over it; the sending side
(:mod:`.endpoint_send`) and the receiving side (:mod:`.endpoint_recv`) build
on that, and :mod:`.endpoint` puts them together behind the public calls.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

from .blocks import BlockService
from .config import EndpointConfig
from .errors import PipeClosedError
from .links.accept import Listener
from .metrics import LatencyHistogram
from .peers import Inbox, InLink, PeerEvent, PeerState, parse_address
from .transport.base import PeerInfo

# Direct reads (see Endpoint.recv) need Task.cancelling() (3.11) to tell an
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


class EndpointCore:
    """State and shared helpers; see the module doc."""

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

    # -- peers ------------------------------------------------------------------
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

    # -- inbound links: the direct-read hand-over ------------------------------
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

    def _drop_inlink(self, state: PeerState, link: InLink) -> None:
        if link in state.inlinks and (link.dead is not None or link.receiver is None):
            state.inlinks.remove(link)
