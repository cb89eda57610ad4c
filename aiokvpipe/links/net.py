"""Sockets of the link layer: who we are, listening, connecting with retry.

Every socket is a plain non-blocking socket driven through ``loop.sock_*``
calls (supported by asyncio and uvloop alike), then handed to a transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import ipaddress
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from .._timeouts import deadline
from ..errors import ConfigError, PeerClosedError, TransferTimeout

T = TypeVar("T")

_CONNECT_RETRY = 0.05


def host_identity() -> str:
    """An identity shared by exactly the processes that can share memory.

    Compares kernel boot id and the IPC/net namespaces rather than IP
    strings: two containers on one machine with separate /dev/shm differ,
    and one host reached through two addresses does not.
    """
    parts = []
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            parts.append(fh.read().strip())
    except OSError:
        parts.append(socket.gethostname())
    for ns in ("ipc", "net"):
        try:
            parts.append(os.readlink(f"/proc/self/ns/{ns}"))
        except OSError:
            pass
    try:
        st = os.stat("/dev/shm")
        parts.append(f"shm:{st.st_dev}:{st.st_ino}")
    except OSError:
        pass
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A non-blocking listener bound to exactly ``host`` (never a wildcard
    unless ``host`` is one).

    Its connections start on a loss-based congestion control (see
    :func:`tune_data_socket`, which hands a remote peer's back the system's).
    """
    sock = socket.socket(family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        avoid_pacing_congestion_control(sock)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError("host", f"cannot listen on {host}:{port}: {exc}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


def tune_data_socket(sock: socket.socket) -> None:
    """Low latency for small frames; the kernel autotunes buffers for big ones.

    Same-host connections run a loss-based congestion control, other hosts'
    the system's choice. A connection inside one kernel has no bottleneck
    link for BBR (this machine's default) to model, and its pacing capped
    loopback: raw 64 MiB sends 2.4-2.6 GB/s on bbr, 4.8-5.4 GB/s on cubic
    (docs/latency.md). The choice must be made before the connection is
    established: switched afterwards, the kernel keeps pacing (3.0-3.1
    GB/s). So listeners and same-host dials set it up front; here an
    accepted remote connection gets the system's algorithm back, and a
    same-host one that started paced is switched, for what that still gives.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if _same_host(sock):
        avoid_pacing_congestion_control(sock)
    else:
        _use_system_congestion_control(sock)


_CONGESTION: int | None = getattr(socket, "TCP_CONGESTION", None)
_PACING = frozenset(("bbr", "bbr2", "bbr3"))
_LOSS_BASED = (b"cubic", b"reno")  # reno is always allowed to unprivileged processes


def _algorithm(sock: socket.socket) -> str | None:
    if _CONGESTION is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, _CONGESTION, 16)
    except OSError:
        return None
    return raw.rstrip(b"\0").decode("ascii", "replace")


@functools.cache
def system_congestion_control() -> str | None:
    """The algorithm a new TCP socket gets here (None: no per-socket choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return _algorithm(probe)


def avoid_pacing_congestion_control(sock: socket.socket) -> str | None:
    """Switch ``sock`` from a pacing congestion control to cubic (else reno).

    The algorithm now in use, or None where the platform has no per-socket
    choice. Failing to switch leaves the socket as it was: it still works.
    """
    current = _algorithm(sock)
    if current not in _PACING:
        return current
    assert _CONGESTION is not None
    for name in _LOSS_BASED:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _CONGESTION, name)
        except OSError:
            continue
        return name.decode()
    return current


def _use_system_congestion_control(sock: socket.socket) -> None:
    wanted, current = system_congestion_control(), _algorithm(sock)
    if wanted is None or current is None or current == wanted:
        return
    assert _CONGESTION is not None
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, _CONGESTION, wanted.encode())


def is_local_address(host: str) -> bool:
    """Whether ``host`` (an IP literal or "localhost") names this kernel: a
    loopback address, or one we can bind (an address of one of our interfaces)."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:a.b.c.d on a dual-stack socket
    if (mapped or address).is_loopback:
        return True
    try:
        with socket.socket(family(host), socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
    except OSError:
        return False
    return True


def _same_host(sock: socket.socket) -> bool:
    """Whether the peer of a connected socket is in this kernel."""
    try:
        peer = sock.getpeername()[0]
    except OSError:
        return False
    return is_local_address(peer)


async def connect_with_retry(
    host: str, port: int, until: float, what: str, *, retry_refused: bool = True
) -> socket.socket:
    """Connect, retrying refused attempts until ``until`` (the peer may not
    listen yet). Raises TransferTimeout when nobody accepted in time, and
    PeerClosedError for an address that cannot be reached at all, or at the
    first refusal with ``retry_refused=False`` (for callers to whom a peer
    that starts later is no use: its state died with the one that was there)."""
    loop = asyncio.get_running_loop()
    local = is_local_address(host)
    while True:
        sock = socket.socket(family(host), socket.SOCK_STREAM)
        sock.setblocking(False)
        if local:
            avoid_pacing_congestion_control(sock)  # before the connection exists
        try:
            await within(until, what, loop.sock_connect(sock, (host, port)))
            tune_data_socket(sock)
            return sock
        except (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError) as exc:
            sock.close()
            if not retry_refused and isinstance(exc, ConnectionRefusedError):
                raise PeerClosedError(
                    f"{what}: nothing listens at {host}:{port} (connection refused)"
                ) from exc
            if time.monotonic() + _CONNECT_RETRY >= until:
                raise TransferTimeout(f"{what}: nobody accepted at {host}:{port} in time") from exc
            await asyncio.sleep(_CONNECT_RETRY)
        except TransferTimeout as exc:
            sock.close()
            raise TransferTimeout(f"{what}: no answer from {host}:{port} in time") from exc
        except OSError as exc:
            sock.close()
            raise PeerClosedError(f"{what}: cannot connect to {host}:{port}: {exc}") from exc
        except BaseException:
            sock.close()
            raise


@contextlib.asynccontextmanager
async def closing_on_error(sock: socket.socket) -> AsyncIterator[socket.socket]:
    try:
        yield sock
    except BaseException:
        sock.close()
        raise


async def within(until: float, what: str, aw: Awaitable[T]) -> T:
    """Await ``aw`` until the monotonic time ``until`` (TransferTimeout naming ``what``)."""
    async with deadline(max(until - time.monotonic(), 1e-3), lambda: what):
        return await aw
