"""Liveness over a link's control connection.

Each direction between two endpoints has, beside its data connection, a
small *session* connection that carries nothing but heartbeats, both ways.
A data connection belongs to its transport (tcp writes payload on it, shm
and the GPU transports their own control messages), so liveness cannot ride
on it without every transport knowing; a second socket costs one fd and
keeps the transports unchanged.

Both ends write one byte every ``interval`` and note when they last heard
anything; an end silent for ``timeout`` is declared dead. One timer callback
per interval does everything: it drains what the peer wrote (non-blocking
``recv``), checks the silence, writes its own beat. No task, no reader
callback per incoming beat: an idle link costs one wake-up and two tiny
syscalls per interval and end. The price is that EOF and goodbyes are seen
at the next beat (within ``interval``), which is well inside ``timeout``;
data connections see a dead peer's EOF at once anyway.

What ends a session, as :class:`PeerClosedError` and a kind given to
``on_end``: ``"silent"`` (a frozen or unreachable peer), ``"eof"`` (its
process exited or it dropped the link: the kernel said so), ``"broken"`` (a
socket error), ``"goodbye"`` (it closed its endpoint on purpose).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Literal

from ..errors import PeerClosedError

EndKind = Literal["silent", "eof", "broken", "goodbye"]
_BEAT = b"H"
_GOODBYE = b"G"


class Heartbeat:
    """Beats on ``sock`` and watches the peer's beats; owns ``sock`` from :meth:`start`.

    ``on_end(error, kind)`` is called once, on the loop, when the session
    ends for any reason other than :meth:`stop`.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        interval: float,
        timeout: float,
        what: str,
        on_end: Callable[[PeerClosedError, EndKind], None],
    ) -> None:
        self._sock = sock
        self.interval = interval
        self.timeout = timeout
        self.what = what
        self._on_end = on_end
        self.last_heard = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.ended = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.last_heard = time.monotonic()
        self._beat()

    @property
    def silent_for(self) -> float:
        return time.monotonic() - self.last_heard

    def stop(self, goodbye: bool = False) -> None:
        """End the session on our side (with ``goodbye``: tell the peer we closed on purpose)."""
        if goodbye and not self.ended:
            try:
                self._sock.send(_GOODBYE)
            except OSError:
                pass
        self._finish()

    # -- internals -------------------------------------------------------------
    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._sock.close()
        self.ended = True

    def _end(self, error: PeerClosedError, kind: EndKind) -> None:
        if self.ended:
            return
        self._finish()
        self._on_end(error, kind)

    def _drain(self) -> bool:
        """Read what the peer wrote since the last beat; False if the session ended."""
        while True:
            try:
                data = self._sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as exc:
                self._end(PeerClosedError(f"{self.what}: connection broken: {exc}"), "broken")
                return False
            if not data:
                reason = "the peer's process exited or it dropped the link"
                self._end(PeerClosedError(f"{self.what}: {reason}"), "eof")
                return False
            self.last_heard = time.monotonic()
            if _GOODBYE in data:
                self._end(PeerClosedError(f"{self.what}: the peer closed its endpoint"), "goodbye")
                return False
            if len(data) < 4096:
                return True

    def _beat(self) -> None:
        self._timer = None
        if not self._drain():
            return
        silent = self.silent_for
        if silent >= self.timeout:
            self._end(
                PeerClosedError(
                    f"{self.what}: silent for {silent:.1f}s (peer_timeout={self.timeout:g}s); "
                    "the peer is frozen, overloaded or unreachable"
                ),
                "silent",
            )
            return
        try:
            self._sock.send(_BEAT)
        except (BlockingIOError, InterruptedError):
            pass  # its buffer is full of our beats: it is not reading; silence will tell
        except OSError as exc:
            self._end(PeerClosedError(f"{self.what}: connection broken: {exc}"), "broken")
            return
        assert self._loop is not None
        # Wake at the next beat, or exactly when the peer would pass the timeout.
        delay = min(self.interval, max(self.timeout - silent, 0.0) + 1e-3)
        self._timer = self._loop.call_later(delay, self._beat)
