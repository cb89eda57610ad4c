"""One listener, one accept loop, and a purpose for every authenticated connection.

Every accepted connection proves the token (:mod:`aiokvpipe.handshake`) and
sends a hello ``{"purpose": ..., "peer": PeerInfo, ...}`` before anything
else is read. Both must arrive within ``handshake_timeout``; the listener then
hands the socket to the handler registered for that purpose, which owns it
from then on. A purpose nobody serves is refused with a reason.

Unauthenticated connections are bounded three ways, so a stranger cannot
starve the legitimate peers:

* a deadline per handshake (``handshake_timeout``): silence costs nothing
  after it;
* a cap on connections still in their handshake (``max_pending``): the
  oldest is dropped to make room, so a flood of idle connections cannot
  keep a real peer (who finishes its handshake in a round trip) out;
* out of file descriptors (``EMFILE``/``ENFILE``), the loop halves the cap
  (strangers may hold at most half the descriptors they reached, which
  leaves room for the real peers' transports), drops the oldest pending
  connections down to it, backs off and keeps accepting instead of dying.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .._timeouts import deadline
from ..errors import (
    AuthenticationError,
    ConfigError,
    PeerClosedError,
    ProtocolError,
    TransferTimeout,
)
from ..handshake import authenticate_acceptor, recv_message, send_message
from ..transport.base import PeerInfo
from .net import listening_socket, tune_data_socket

HANDSHAKE_TIMEOUT = 5.0
MAX_PENDING = 64
_OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_BACKOFF_MIN = 0.01
_BACKOFF_MAX = 0.5


def peer_from_hello(value: Any, what: str) -> PeerInfo:
    """The PeerInfo in a hello or reply; ProtocolError if malformed."""
    try:
        info = PeerInfo(
            rank=int(value["rank"]),
            address=str(value["address"]),
            port=int(value["port"]),
            host_id=str(value["host_id"]),
            pid=int(value["pid"]),
            device=str(value["device"]),
            transport=str(value["transport"]),
            name=str(value.get("name", "")),
            instance=str(value.get("instance", "")),
            process_id=str(value["process_id"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProtocolError(f"{what}: malformed peer description") from exc
    if not 0 < info.port < 65536:
        raise ProtocolError(f"{what}: peer port out of range: {info.port}")
    return info


@dataclass
class Incoming:
    """An authenticated connection and its hello, handed to a purpose's handler.

    The handler owns ``sock``: it answers with :meth:`accept` or
    :meth:`refuse`, and keeps or closes the socket. If the handler raises (or
    is cancelled), the listener closes the socket.
    """

    sock: socket.socket
    purpose: str
    peer: PeerInfo
    message: dict[str, Any] = field(repr=False)
    what: str = ""

    async def accept(self, local: PeerInfo | None = None, **extra: Any) -> None:
        """Tell the dialler yes (with our own PeerInfo if given)."""
        reply: dict[str, Any] = {"ok": True, **extra}
        if local is not None:
            reply["peer"] = asdict(local)
        await send_message(self.sock, reply, self.what)

    async def refuse(self, reason: str, field: str | None = None) -> None:
        """Tell the dialler no and why, then close. With ``field`` the dialler
        raises ConfigError(field) (it is configured differently), otherwise
        PeerClosedError."""
        reply: dict[str, Any] = {"ok": False, "error": reason}
        if field is not None:
            reply["field"] = field
        try:
            await send_message(self.sock, reply, self.what)
        except PeerClosedError:
            pass
        finally:
            self.sock.close()


Handler = Callable[[Incoming], Awaitable[None]]


class Listener:
    """A listening socket that authenticates callers and dispatches them by purpose.

    Create, :meth:`serve` purposes (before or after :meth:`start`), and
    :meth:`aclose` when done (closes the socket and every connection still
    being vetted or handled).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        token: bytes | None,
        what: str,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_pending: int = MAX_PENDING,
        backlog: int = 128,
    ) -> None:
        self._sock = listening_socket(host, port, backlog)
        self.host = host
        self.port = int(self._sock.getsockname()[1])
        self._token = token
        self._what = what
        self.handshake_timeout = handshake_timeout
        self.max_pending = max_pending
        self._handlers: dict[str, Handler] = {}
        # Connections still proving themselves, oldest first (dicts keep order).
        self._pending: dict[asyncio.Task[None], socket.socket] = {}
        self._serving: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self.dropped = 0  # connections closed for being too slow or too many (metrics)

    # -- public ------------------------------------------------------------------
    def serve(self, purpose: str, handler: Handler) -> None:
        """Hand authenticated connections with this ``purpose`` to ``handler``."""
        if purpose in self._handlers:
            raise ConfigError("purpose", f"{purpose!r} is already served on this listener")
        self._handlers[purpose] = handler

    def unserve(self, purpose: str) -> None:
        self._handlers.pop(purpose, None)

    def start(self) -> Listener:
        if self._loop_task is None:
            self._loop_task = asyncio.ensure_future(self._accept_loop())
        return self

    @property
    def pending(self) -> int:
        """Connections accepted but not yet authenticated."""
        return len(self._pending)

    async def aclose(self) -> None:
        """Stop accepting; close the socket and every connection not handed off."""
        tasks = [t for t in (self._loop_task, *self._pending, *self._serving) if t is not None]
        for task in tasks:
            task.cancel()
        self._sock.close()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for conn in self._pending.values():
            conn.close()
        self._pending.clear()

    # -- internals ---------------------------------------------------------------
    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = _BACKOFF_MIN
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS:
                    # The caller stays in the kernel's backlog; make room
                    # and retry later instead of letting the loop die.
                    self.max_pending = max(1, len(self._pending) // 2)
                    while len(self._pending) > self.max_pending:
                        self._drop_oldest()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR):
                    continue  # that caller gave up before we took it
                raise
            backoff = _BACKOFF_MIN
            conn.setblocking(False)
            tune_data_socket(conn)
            if len(self._pending) >= self.max_pending:
                self._drop_oldest()
            task = asyncio.ensure_future(self._vet(conn))
            self._pending[task] = conn

    def _drop_oldest(self) -> None:
        for task, conn in self._pending.items():
            del self._pending[task]
            self.dropped += 1
            conn.close()
            task.cancel()
            return

    async def _vet(self, conn: socket.socket) -> None:
        what = self._what
        task = asyncio.current_task()
        assert task is not None
        try:
            async with deadline(self.handshake_timeout, lambda: f"{what}: handshake"):
                await authenticate_acceptor(conn, self._token, what)
                hello = await recv_message(conn, what)
            purpose = str(hello.get("purpose"))
            peer = peer_from_hello(hello.get("peer"), what)
        except (ProtocolError, AuthenticationError, PeerClosedError, TransferTimeout):
            self._pending.pop(task, None)
            conn.close()  # a stranger, a broken or a too slow peer: drop it
            return
        except BaseException:
            self._pending.pop(task, None)
            conn.close()  # dropped to make room, or the listener closes
            raise
        if self._pending.pop(task, None) is None:
            conn.close()  # dropped to make room while we got here
            return
        self._serving.add(task)
        try:
            incoming = Incoming(conn, purpose, peer, hello, f"{what} <- {peer.label}")
            handler = self._handlers.get(purpose)
            if handler is None:
                await incoming.refuse(f"nothing here serves {purpose!r}")
                return
            await handler(incoming)
        except (ProtocolError, PeerClosedError, TransferTimeout):
            conn.close()  # the handler gave up on this caller
        except BaseException:
            conn.close()
            raise
        finally:
            self._serving.discard(task)
