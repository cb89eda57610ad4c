"""Leases: the only way a peer reaches registered blocks.

The owner grants a lease per request id and region: :meth:`LeaseTable.grant`
with ``kind="read"`` (``expose``) or ``"write"`` (``expect``), for some
blocks and layers, for ``ttl`` seconds. A lease ends exactly once:

* completed: every (layer, block) it grants was reported read by the reader
  (read) or landed from the writer (write); ``wait()`` returns;
* expired at ``ttl``: ``wait()`` raises :class:`LeaseExpiredError` (a
  ``TransferTimeout``);
* the peer that used it died (``peer_lost``, or its connection broke in the
  middle of a transfer): :class:`PeerClosedError`;
* cancelled by the owner, or the endpoint closed: :class:`LeaseCancelledError`.

When it ends, transfers still streaming under it are redirected to scratch
memory (:meth:`aiokvpipe.blocks.sgio.Segments.redirect`) before ``cancel()``
or the expiry returns, so the owner may reuse the blocks at once. A
transfer cut short never counts: only whole (layer, block) pieces of a
transfer that finished are marked.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from ..errors import (
    ConfigError,
    LeaseCancelledError,
    LeaseCompletedError,
    LeaseError,
    LeaseExpiredError,
    LeaseNotGrantedError,
)
from .sgio import Segments

LeaseKind = Literal["read", "write"]
_TOMBSTONES = 4096  # ended leases remembered, to say "expired" rather than "never granted"


class Lease:
    """A grant of read or write access to some blocks; see the module doc."""

    def __init__(
        self,
        table: LeaseTable,
        kind: LeaseKind,
        request_id: str,
        region: str,
        blocks: tuple[int, ...],
        layers: tuple[int, ...],
        ttl: float,
    ) -> None:
        self.kind: LeaseKind = kind
        self.request_id = request_id
        self.region = region
        self.blocks = blocks
        self.layers = layers
        self.ttl = ttl
        self.peers: set[str] = set()  # who has used it: their death ends it
        #: GPU regions: an event marking the owner's work queued when the lease
        #: was granted; peers' copies of the blocks start only after it.
        self.fence: Any = None
        self._table = table
        self._block_set = frozenset(blocks)
        # Blocks still to be transferred, per layer: a transfer marks one set
        # difference per layer (C), not one discard per (layer, block).
        self._pending = {layer: set(blocks) for layer in layers if blocks}
        self._streams: set[Segments] = set()
        loop = asyncio.get_running_loop()
        self._result: asyncio.Future[None] = loop.create_future()
        # Nobody may ever wait() on a lease: its error must not reach the loop's handler.
        self._result.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._timer = loop.call_later(ttl, self._expire)

    def __repr__(self) -> str:
        state = "active" if not self.ended else "ended"
        return (
            f"<Lease {self.kind} {self.request_id!r} on {self.region!r}: {len(self.blocks)} "
            f"blocks x {len(self.layers)} layers, {state}>"
        )

    @property
    def describe(self) -> str:
        return f"{self.kind} lease {self.request_id!r} on region {self.region!r}"

    @property
    def ended(self) -> bool:
        return self._result.done()

    @property
    def completed(self) -> bool:
        return self.ended and not self._result.cancelled() and self._result.exception() is None

    @property
    def remaining(self) -> int:
        """(layer, block) pieces still to be transferred."""
        return sum(len(left) for left in self._pending.values())

    async def wait(self) -> None:
        """Until the lease ends: returns when completed, else raises why it ended."""
        await asyncio.shield(self._result)

    def cancel(self) -> None:
        """End the lease now (no-op if it already ended); the blocks are free on return."""
        self._end(LeaseCancelledError(f"{self.describe}: cancelled by the owner"))

    # -- used by the service --------------------------------------------------
    def check(self, kind: LeaseKind, blocks: Sequence[int], layers: Sequence[int]) -> None:
        """Refuse access outside the grant (LeaseNotGrantedError naming what)."""
        if kind != self.kind:
            raise LeaseNotGrantedError(
                f"request {self.request_id!r} on region {self.region!r} is granted "
                f"{self.kind}, not {kind}"
            )
        extra = [] if self._block_set.issuperset(blocks) else sorted(set(blocks) - self._block_set)
        if extra:
            raise LeaseNotGrantedError(
                f"{self.describe} does not grant blocks {_few(extra)} "
                f"(granted: {_few(self.blocks)})"
            )
        bad = sorted(set(layers) - set(self.layers))
        if bad:
            raise LeaseNotGrantedError(
                f"{self.describe} does not grant layers {_few(bad)} (granted: {_few(self.layers)})"
            )

    def attach(self, stream: Segments) -> None:
        """A transfer is streaming under this lease: redirect it if the lease ends."""
        if self.ended:
            stream.redirect()
        self._streams.add(stream)

    def detach(self, stream: Segments) -> None:
        self._streams.discard(stream)

    def mark(self, blocks: Iterable[int], layers: Iterable[int]) -> None:
        """These pieces were transferred in full; completes the lease when none are left."""
        if self.ended:
            return
        blocks = tuple(blocks)
        pending = self._pending
        for layer in layers:
            left = pending.get(layer)
            if left is not None:
                left.difference_update(blocks)
                if not left:
                    del pending[layer]
        if not pending:
            self._end(None)

    def fail(self, error: BaseException) -> None:
        self._end(error)

    def ended_error(self) -> BaseException:
        """Why a request under this ended lease is refused (for a late peer)."""
        if self.completed:
            return LeaseCompletedError(
                f"{self.describe} already completed; its blocks may have been reused"
            )
        exc = self._result.exception()
        if isinstance(exc, LeaseError):
            return type(exc)(str(exc))
        return LeaseCancelledError(f"{self.describe} ended: {exc}")

    def _expire(self) -> None:
        done = len(self.blocks) * len(self.layers) - self.remaining
        self._end(
            LeaseExpiredError(
                f"{self.describe} expired after ttl={self.ttl:g}s with {done} of "
                f"{len(self.blocks) * len(self.layers)} block-layers transferred"
            )
        )

    def _end(self, error: BaseException | None) -> None:
        if self.ended:
            return
        self._timer.cancel()
        # Before anything else: no byte may reach the blocks after this returns.
        for stream in self._streams:
            stream.redirect()
        if error is None:
            self._result.set_result(None)
        else:
            self._result.set_exception(error)
        self._table._on_end(self)


class LeaseTable:
    """The live leases of one endpoint, by (kind, request id, region)."""

    def __init__(self) -> None:
        self._live: dict[tuple[str, str, str], Lease] = {}
        self._ended: OrderedDict[tuple[str, str, str], Lease] = OrderedDict()

    def grant(
        self,
        kind: LeaseKind,
        request_id: str,
        region: str,
        blocks: tuple[int, ...],
        layers: tuple[int, ...],
        ttl: float,
    ) -> Lease:
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 256:
            raise ConfigError("request_id", f"must be a str of 1..256 chars, not {request_id!r}")
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < math.inf:
            raise ConfigError("ttl", f"must be a positive number of seconds, not {ttl!r}")
        key = (kind, request_id, region)
        if key in self._live:
            raise LeaseError(
                f"request {request_id!r} already holds a live {kind} lease on region {region!r}"
            )
        lease = Lease(self, kind, request_id, region, blocks, layers, float(ttl))
        self._ended.pop(key, None)
        self._live[key] = lease
        return lease

    def find(self, kind: LeaseKind, request_id: str, region: str) -> Lease:
        """The live lease a peer's request names, or the typed error refusing it."""
        key = (kind, request_id, region)
        lease = self._live.get(key)
        if lease is not None:
            return lease
        old = self._ended.get(key)
        if old is not None:
            raise old.ended_error()
        other = "write" if kind == "read" else "read"
        if (other, request_id, region) in self._live:
            raise LeaseNotGrantedError(
                f"request {request_id!r} on region {region!r} is granted {other}, not {kind}"
            )
        raise LeaseNotGrantedError(
            f"no {kind} lease for request {request_id!r} on region {region!r}"
        )

    def holds(self, request_id: str, region: str) -> bool:
        """A live lease of either kind for ``request_id`` on ``region``."""
        return any((kind, request_id, region) in self._live for kind in ("read", "write"))

    def _on_end(self, lease: Lease) -> None:
        key = (lease.kind, lease.request_id, lease.region)
        if self._live.get(key) is lease:
            del self._live[key]
            self._ended[key] = lease
            while len(self._ended) > _TOMBSTONES:
                self._ended.popitem(last=False)

    def leases(self) -> list[Lease]:
        return list(self._live.values())

    def peer_lost(self, peer: str, error: BaseException) -> None:
        """Fail every live lease ``peer`` used."""
        for lease in self.leases():
            if peer in lease.peers:
                lease.fail(_copy(error, lease))

    def end_region(self, region: str, error: BaseException) -> None:
        for lease in self.leases():
            if lease.region == region:
                lease.fail(_copy(error, lease))

    def close(self, error: BaseException) -> None:
        for lease in self.leases():
            lease.fail(_copy(error, lease))


def _copy(error: BaseException, lease: Lease) -> BaseException:
    """A fresh exception per lease (one instance raised from many waits grows its traceback)."""
    fresh = type(error)(f"{lease.describe}: {error}")
    fresh.__cause__ = error.__cause__
    return fresh


def _few(values: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" (+{len(values) - limit} more)" if len(values) > limit else "")
