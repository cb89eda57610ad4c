"""free_port: rendezvous ports that outgoing connections cannot take first."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys

import pytest

from aiokvpipe import ports
from aiokvpipe.ports import ephemeral_range, free_port

pytestmark = pytest.mark.timeout(60)


def _listen(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_ports_lie_outside_the_range_outgoing_connections_draw_from() -> None:
    low, high = ephemeral_range()
    for _ in range(50):
        port = free_port()
        assert not low <= port <= high
        assert 20000 <= port <= 65535
        _listen(port).close()


def test_count_gives_that_many_consecutive_listenable_ports() -> None:
    first = free_port(count=3)
    with contextlib.ExitStack() as stack:
        for port in range(first, first + 3):
            stack.enter_context(_listen(port))


def test_a_port_someone_listens_on_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    base = free_port(count=5)
    monkeypatch.setattr(ports, "_pool", lambda: [range(base, base + 5)])
    monkeypatch.setattr(ports, "_cursor", 0)
    with contextlib.ExitStack() as stack:
        for port in (base, base + 1, base + 3):
            stack.enter_context(_listen(port))
        assert free_port() == base + 2
        assert free_port() == base + 4
        # two consecutive free ports no longer exist among the five
        with pytest.raises(RuntimeError, match="consecutive"):
            free_port(count=2)


def test_count_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="count"):
        free_port(count=0)


def _draw_in_worker(worker: str, n: int) -> set[int]:
    code = f"from aiokvpipe.ports import free_port; print(*[free_port() for _ in range({n})])"
    env = {**os.environ, "PYTEST_XDIST_WORKER": worker}
    argv = [sys.executable, "-c", code]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=True)
    return {int(p) for p in out.stdout.split()}


def test_two_xdist_workers_draw_from_disjoint_slices() -> None:
    first, second = _draw_in_worker("gw0", 40), _draw_in_worker("gw1", 40)
    assert len(first) == len(second) == 40
    assert not first & second
