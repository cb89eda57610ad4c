"""The receiving side of an :class:`~aiokvpipe.endpoint.Endpoint`: inbound links and their pumps.

A peer dials a *session* (heartbeats) and then a *data* connection bound to
it; :meth:`ReceivingSide._on_data` opens the channel and starts a pump
(:meth:`ReceivingSide._pump`) that moves its messages into the shared inbox
in order, after any older link of the same peer. While ``recv`` reads the
only live link directly (:mod:`.endpoint_core`), the pump waits at that
link's gate; when recv takes the link over from a pump parked in a read,
:func:`_cancels` tells that interrupt from a real cancel of the pump.
"""

from __future__ import annotations

import asyncio

from .endpoint_core import _DIRECT
from .endpoint_liveness import Liveness
from .errors import PeerClosedError, PipeClosedError, ProtocolError
from .links.accept import Incoming
from .links.channels import open_receiver
from .peers import InLink, Interruptible, PeerState
from .transport.base import Link
from .wire import message_charge


def _cancels() -> int:
    """Cancel requests pending on the current task (3.11+; 0 before).

    Compared before and after an interrupted read: a count that grew means
    the task was also cancelled, and that cancel must propagate.
    """
    task = asyncio.current_task()
    return task.cancelling() if _DIRECT and task is not None else 0


class ReceivingSide(Liveness):
    """Inbound sessions, data links and pumps into the inbox; mixed into Endpoint."""

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
