"""The TCP control connection of the GPU transports.

NCCL and CUDA IPC move the payload; the link's socket carries everything
else: the frame headers (so ordering, validation and sequence numbers are the
same as on the tcp transport), a hello that sets the transport up (the NCCL
unique id, or "this rank cannot do it, because..."), IPC memory descriptors
and acknowledgements. All of it is raw fixed-layout bytes; nothing is pickled.

Socket failures become PeerClosedError naming the link, stalls beyond the
operation timeout become TransferTimeout; a peer that is merely idle is never
a timeout (waiting for the *first* byte of a header is unbounded).
"""

from __future__ import annotations

import asyncio
import enum
import socket
import struct

from .._timeouts import deadline
from ..errors import (
    BadMagicError,
    CudaUnavailableError,
    MalformedFrameError,
    PeerClosedError,
    UnsupportedVersionError,
)
from ..wire import HEADER_SIZE, FrameHeader, decode_header

HELLO_MAGIC = b"AKVG"
HELLO_VERSION = 2  # 2: NCCL set-up answers the receiver's hello with a third one
# magic, version, transport kind, status, (pad), payload length
_HELLO = struct.Struct("<4sBBBxI")
MAX_HELLO_PAYLOAD = 1 << 16


class HelloKind(enum.IntEnum):
    """Which GPU transport a hello belongs to (a mismatch is a protocol error)."""

    NCCL = 1
    CUDA_IPC = 2


class HelloStatus(enum.IntEnum):
    OK = 0
    REFUSED = 1


class ControlSocket:
    """Exact-size reads and whole writes on one non-blocking socket."""

    def __init__(self, sock: socket.socket, *, describe: str, op_timeout: float | None) -> None:
        self.sock = sock
        self.describe = describe
        self.op_timeout = op_timeout
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, data: bytes, *, timeout: float | None = None) -> None:
        """Write all of ``data`` (bounded by ``timeout``, default op_timeout)."""
        limit = self.op_timeout if timeout is None else timeout
        if limit is None:  # the per-message path: no timeout scope to build
            await self._sendall(data)
            return
        async with deadline(limit, lambda: f"{self.describe}: sending {len(data)} control bytes"):
            await self._sendall(data)

    async def _sendall(self, data: bytes) -> None:
        try:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)
        except OSError as exc:
            raise PeerClosedError(f"{self.describe}: connection lost sending ({exc})") from exc

    async def recv_exact(
        self, n: int, *, timeout: float | None = None, idle_ok: bool = False
    ) -> bytes:
        """Read exactly ``n`` bytes.

        With ``idle_ok`` the wait for the first byte is unbounded (a quiet
        peer is fine) and only the rest of the message is timed.
        """
        loop = asyncio.get_running_loop()
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        limit = self.op_timeout if timeout is None else timeout
        if idle_ok and n:
            got = await self._recv_some(loop, view)
        if limit is None:
            while got < n:
                got += await self._recv_some(loop, view[got:])
            return bytes(buf)
        async with deadline(limit, lambda: f"{self.describe}: receiving {n} control bytes"):
            while got < n:
                got += await self._recv_some(loop, view[got:])
        return bytes(buf)

    async def _recv_some(self, loop: asyncio.AbstractEventLoop, view: memoryview) -> int:
        try:
            count = await loop.sock_recv_into(self.sock, view)
        except OSError as exc:
            raise PeerClosedError(f"{self.describe}: connection lost ({exc})") from exc
        if count == 0:
            raise PeerClosedError(f"{self.describe}: peer closed the connection")
        return count

    async def recv_header(self, *, expected_seq: int, max_frame_bytes: int) -> FrameHeader:
        """The next frame header, validated (waits indefinitely for it to start)."""
        data = await self.recv_exact(HEADER_SIZE, idle_ok=True)
        return decode_header(data, expected_seq=expected_seq, max_frame_bytes=max_frame_bytes)

    async def send_hello(
        self,
        kind: HelloKind,
        payload: bytes = b"",
        *,
        status: HelloStatus = HelloStatus.OK,
        timeout: float | None = None,
    ) -> None:
        if len(payload) > MAX_HELLO_PAYLOAD:
            raise ValueError(f"hello payload of {len(payload)} bytes is too large")
        head = _HELLO.pack(HELLO_MAGIC, HELLO_VERSION, int(kind), int(status), len(payload))
        await self.send(head + payload, timeout=timeout)

    async def refuse(self, kind: HelloKind, reason: str, *, timeout: float | None = None) -> None:
        """Tell the peer this rank cannot run the transport (best effort)."""
        try:
            payload = reason.encode()[:MAX_HELLO_PAYLOAD]
            await self.send_hello(kind, payload, status=HelloStatus.REFUSED, timeout=timeout)
        except (PeerClosedError, TimeoutError):
            pass

    async def refuse_and_close(self, kind: HelloKind, reason: str, *, timeout: float) -> None:
        """A rank that cannot run the transport says why, then hangs up."""
        try:
            await self.refuse(kind, reason, timeout=timeout)
        finally:
            self.close()

    async def recv_hello(self, kind: HelloKind, *, timeout: float | None = None) -> bytes:
        """The peer's hello payload; CudaUnavailableError if the peer refused."""
        head = await self.recv_exact(_HELLO.size, timeout=timeout)
        magic, version, got_kind, status, length = _HELLO.unpack(head)
        if magic != HELLO_MAGIC:
            raise BadMagicError(f"{self.describe}: bad transport hello magic {magic!r}")
        if version != HELLO_VERSION:
            raise UnsupportedVersionError(
                f"{self.describe}: peer speaks GPU transport hello version {version}, "
                f"this build speaks {HELLO_VERSION}"
            )
        if got_kind != int(kind):
            raise MalformedFrameError(
                f"{self.describe}: peer set up transport kind {got_kind}, expected {int(kind)} "
                f"({kind.name})"
            )
        if length > MAX_HELLO_PAYLOAD:
            raise MalformedFrameError(f"{self.describe}: hello payload of {length} bytes")
        payload = await self.recv_exact(length, timeout=timeout)
        if status == HelloStatus.REFUSED:
            raise CudaUnavailableError(
                f"{self.describe}: the peer cannot use {kind.name.lower()}: "
                f"{payload.decode(errors='replace')}"
            )
        if status != HelloStatus.OK:
            raise MalformedFrameError(f"{self.describe}: unknown hello status {status}")
        return payload

    def close(self) -> None:
        """Close the socket (idempotent); the peer sees EOF."""
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.close()
        except OSError:
            pass
