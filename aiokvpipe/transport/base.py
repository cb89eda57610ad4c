"""What every transport implements.

A transport moves frames over one *link*: one authenticated, connected socket
between a sender rank and the next rank (the receiver). Rendezvous builds the
links; a transport turns the sender's end into a :class:`SendChannel` and the
receiver's end into a :class:`RecvChannel`. Data flows one way per link; the
socket's reverse direction is free for the transport's own control messages
(acks, handles), and TCP transports carry the payload on it as well.

Both ends of a link must pick the same transport. :func:`choose_transport`
is a pure function of both ranks' :class:`PeerInfo`, so each end computes the
same answer, and the sender announces its choice so a mismatch is detected.
"""

from __future__ import annotations

import abc
import asyncio
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch

from ..errors import PeerClosedError, PipeClosedError, ProtocolError
from ..wire import FrameHeader

#: A random id of this process, fresh per interpreter. Pids do not tell
#: processes apart: two containers of one pod share the boot id and the
#: namespaces and are both pid 1. Carried in every hello as
#: ``PeerInfo.process_id``.
PROCESS_ID = secrets.token_hex(16)


class LinkConfig(Protocol):
    """What a transport reads from its link's configuration.

    Both :class:`~aiokvpipe.config.PipeConfig` and
    :class:`~aiokvpipe.config.EndpointConfig` have this shape, so every
    transport serves a ring of ranks and named endpoints unchanged.
    """

    @property
    def device(self) -> str: ...
    @property
    def buffer_bytes(self) -> int: ...
    @property
    def max_frame_bytes(self) -> int: ...
    @property
    def anticipate(self) -> bool: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def op_timeout(self) -> float | None: ...
    @property
    def close_timeout(self) -> float: ...


@dataclass(frozen=True)
class PeerInfo:
    """What one end tells the other about itself in its hello.

    ``rank`` is the ring position of a Pipe's rank (-1 for an Endpoint);
    ``name`` labels it in messages (``"rank 3"``, ``"prefill-0"``);
    ``address``/``port`` are where its listener accepts; ``instance`` is
    fresh per started Pipe/Endpoint (a restart on the same address is a new
    instance); ``process_id`` is :data:`PROCESS_ID` of its process.
    """

    rank: int
    address: str
    port: int
    host_id: str
    pid: int
    device: str
    transport: str
    name: str = ""
    instance: str = ""
    process_id: str = PROCESS_ID

    @property
    def label(self) -> str:
        """How messages name this end."""
        return self.name or f"rank {self.rank}"

    @property
    def endpoint(self) -> str:
        """``host:port`` of its listener (``[v6]:port`` for IPv6)."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@dataclass
class Link:
    """One direction between two ends (a ring's ranks or two endpoints)."""

    config: LinkConfig
    sock: socket.socket
    role: Literal["send", "recv"]
    local: PeerInfo
    peer: PeerInfo

    @property
    def describe(self) -> str:
        arrow = "->" if self.role == "send" else "<-"
        return f"{self.local.label} {arrow} {self.peer.label}"


@dataclass
class OutgoingMessage:
    """A message accepted by the pipe and handed to a send channel.

    ``done`` resolves when the transport no longer needs ``tensor``'s memory
    (written to the kernel, copied into shared memory, or its CUDA event
    completed); it fails with the error that stopped the transfer. ``ready``
    is the producer fence of a GPU tensor the caller named (a CUDA event, or
    a stream whose queued work is marked at submit); None means the current
    stream at submit.
    """

    header: FrameHeader
    tensor: torch.Tensor | None
    done: asyncio.Future[None] = field(repr=False)
    ready: Any = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return self.header.nbytes


class SendChannel(abc.ABC):
    """The sending end of a link. Owns its socket and background tasks."""

    @abc.abstractmethod
    def submit(self, message: OutgoingMessage) -> None:
        """Queue ``message`` behind every earlier one; never blocks.

        Failures are reported through ``message.done`` and :attr:`error`.
        """

    def _refused(self, message: OutgoingMessage, closed: bool, describe: str) -> bool:
        """Fail ``message`` at once if this channel broke or was closed (True if it did)."""
        error = self.error
        if error is not None:
            message.done.set_exception(error)
            return True
        if closed:
            message.done.set_exception(PipeClosedError(f"{describe}: channel closed"))
            return True
        return False

    @staticmethod
    def _receiver_spoke(
        sock: socket.socket, describe: str
    ) -> tuple[BaseException, BaseException | None, bool] | None:
        """Read what made a link readable whose receiver never writes to it.

        None: nothing (a spurious wake-up). Otherwise the error that breaks
        the channel, its cause, and whether it was a plain EOF (the peer
        closed the connection).
        """
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            return PeerClosedError(f"{describe}: connection broken: {exc}"), exc, False
        if data:
            return ProtocolError(f"{describe}: receiver sent unexpected bytes"), None, False
        return PeerClosedError(f"{describe}: peer closed the connection"), None, True

    @property
    @abc.abstractmethod
    def error(self) -> BaseException | None:
        """The fatal error that broke this channel, if any."""

    async def ready(self) -> None:
        """Return once the channel is set up; raise what stopped its set-up.

        Channels that set up in the background (the GPU transports) override
        this, so that ``connect`` reports a failed set-up instead of the first
        ``send``/``recv``; the others are ready when opened.
        """
        return None

    @abc.abstractmethod
    async def aclose(self, graceful: bool = True) -> None:
        """Close; with ``graceful`` first tell the peer (a CLOSE frame).

        Idempotent; frees the socket and tasks even if cancelled.
        """


class RecvChannel(abc.ABC):
    """The receiving end of a link."""

    @abc.abstractmethod
    async def recv(self) -> torch.Tensor | None:
        """Next message in order. Cancellation never loses or reorders one."""

    @property
    @abc.abstractmethod
    def error(self) -> BaseException | None:
        """The fatal error that broke this channel, if any."""

    async def ready(self) -> None:
        """Return once the channel is set up; raise what stopped its set-up.

        Channels that set up in the background (the GPU transports) override
        this, so that ``connect`` reports a failed set-up instead of the first
        ``send``/``recv``; the others are ready when opened.
        """
        return None

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close; idempotent; pending ``recv`` calls fail with PipeClosedError."""


class Transport(abc.ABC):
    """A backend: a name and a way to open either end of a link."""

    name: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    async def open_sender(cls, link: Link) -> SendChannel: ...

    @classmethod
    @abc.abstractmethod
    async def open_receiver(cls, link: Link) -> RecvChannel: ...
