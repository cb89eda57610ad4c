"""Picking a rendezvous port that stays free until someone listens on it.

The usual trick, bind to port 0 and close, hands back a port from the
kernel's *ephemeral* range, the same range every outgoing ``connect()``
draws its local port from. Between the close and the listener's bind, any
connection made on the machine can take that port, and the listener fails
with "address already in use". On a busy host (two test workers, a server
with many links) that is a real, intermittent failure.

``free_port`` therefore picks from outside the ephemeral range, where
nothing is handed out automatically, and checks by binding. Concurrent
pickers are kept apart too: pytest-xdist workers each draw from their own
slice, and each process walks its slice from a random start, so two
processes rarely try the same port and a bind check settles the rest.
"""

from __future__ import annotations

import os
import random
import socket
import threading

_FALLBACK_EPHEMERAL = (32768, 60999)  # Linux's default
_LOWEST = 20000  # below this sit well-known services; stay clear of them
_SLICES = 16  # xdist workers beyond this share a slice (bind checks keep it safe)
_ATTEMPTS = 2000

_lock = threading.Lock()
_cursor: int | None = None


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for automatically assigned local ports."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as fh:
            low, high = (int(part) for part in fh.read().split())
    except (OSError, ValueError):
        return _FALLBACK_EPHEMERAL
    return low, high


def _pool() -> list[range]:
    """The port ranges nothing assigns automatically: below and above the
    ephemeral range, clipped to [_LOWEST, 65535]."""
    low, high = ephemeral_range()
    ranges = [range(_LOWEST, low), range(high + 1, 65536)]
    return [r for r in ranges if len(r) > 0]


def _slice(ports: list[int]) -> list[int]:
    """This process's share of ``ports``: its xdist worker's slice, if any."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not worker[2:].isdigit():
        return ports
    share = len(ports) // _SLICES
    if share < 64:
        return ports
    index = int(worker[2:]) % _SLICES
    return ports[index * share : (index + 1) * share]


def _family(host: str) -> socket.AddressFamily:
    # links.net.family says the same, but importing aiokvpipe.links loads
    # torch (through its channels), and ``import aiokvpipe`` imports this.
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _all_bind(host: str, first: int, count: int) -> bool:
    family = _family(host)
    held: list[socket.socket] = []
    try:
        for port in range(first, first + count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind((host, port))
    except OSError:
        return False
    finally:
        for sock in held:
            sock.close()
    return True


def _kernel_pick(host: str) -> int:
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_port(host: str = "127.0.0.1", count: int = 1) -> int:
    """A port ``p`` on ``host`` such that ``p .. p + count - 1`` are free now
    and outside the range the kernel gives to outgoing connections.

    Meant for tests, examples and launch scripts that must tell two
    processes one rendezvous port in advance. A server that can report its
    address afterwards should listen on port 0 instead.
    """
    global _cursor
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    ports = [p for r in _pool() for p in r]
    mine = _slice(ports)
    if len(mine) < count:
        if count == 1:  # an unusual kernel setting left nothing outside
            return _kernel_pick(host)
        raise RuntimeError(f"no room for {count} consecutive ports outside the ephemeral range")
    with _lock:
        if _cursor is None:
            _cursor = random.randrange(len(mine))
        for _ in range(min(_ATTEMPTS, len(mine))):
            start = _cursor % len(mine)
            _cursor = start + count
            first = mine[start]
            if start + count > len(mine) or mine[start + count - 1] != first + count - 1:
                continue  # the run would cross a gap or the slice's end
            if _all_bind(host, first, count):
                return first
    raise RuntimeError(f"no {count} consecutive free ports on {host} after {_ATTEMPTS} tries")
