"""The sending side of an :class:`~aiokvpipe.endpoint.Endpoint`: one outbound link per peer.

A peer's first send dials it (:meth:`SendingSide._connect`: a session with
heartbeats, then the data connection and its transport), and the sends that
arrive meanwhile wait for that dial and go on in call order (a FIFO turn,
:meth:`SendingSide._ready_out`). After the peer died, the next send reports
data accepted for it that never left, once, and dials afresh. Sending itself
is the link's :class:`~aiokvpipe.outbound.Outbound`, as in a Pipe.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Coroutine
from typing import Any

from .endpoint_liveness import Liveness
from .errors import (
    PeerClosedError,
    PeerUnreachableError,
    PipeClosedError,
    ProtocolError,
    TransferTimeout,
)
from .links.channels import open_sender
from .links.dial import Dialed, dial
from .outbound import Outbound
from .peers import OutLink, PeerState, parse_address
from .transport.base import Link


class SendingSide(Liveness):
    """Outbound links: dialling, call order across the dial, counters; mixed into Endpoint."""

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
            dial = out.connecting
            failed = dial.done() and (dial.cancelled() or dial.exception() is not None)
            if failed and state.out is out:
                state.out = None  # the next send dials again
            # (A sender cancelled while it waited, on the dial or for its turn,
            # leaves a link that is up, or still coming, to the others.)
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

        def open_link(purpose: str, **extra: str) -> Coroutine[Any, Any, Dialed]:
            """The session and the data link: one dial each, same peer and deadline."""
            return dial(
                out.host,
                out.port,
                purpose=purpose,
                local=self._local,
                token=cfg.token_bytes,
                until=until,
                what=what,
                extra={"session": session_id, **extra},
            )

        try:
            session = await open_link("session")
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
            data = await open_link("data", to_instance=peer.instance)
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
