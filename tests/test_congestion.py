"""Same-host TCP connections leave a pacing congestion control; others keep the system's.

On this machine class loopback TCP defaults to BBR, whose pacing halved a raw
socket's 64 MiB throughput (see docs/latency.md). ``tune_data_socket`` (every
link socket, both ends) moves a same-host connection to cubic or reno.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from netns import two_namespaces

from aiokvpipe.links.net import avoid_pacing_congestion_control, tune_data_socket

CONGESTION = getattr(socket, "TCP_CONGESTION", None)
pytestmark = pytest.mark.skipif(CONGESTION is None, reason="no per-socket congestion control")


def algorithm(sock: socket.socket) -> str:
    assert CONGESTION is not None
    return sock.getsockopt(socket.IPPROTO_TCP, CONGESTION, 16).rstrip(b"\0").decode()


def force(sock: socket.socket, name: str) -> None:
    """Put ``sock`` on ``name``, or skip where this kernel lacks it."""
    assert CONGESTION is not None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, CONGESTION, name.encode())
    except OSError as exc:
        pytest.skip(f"congestion control {name!r} is not available here: {exc}")


@pytest.fixture
def loopback_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    try:
        yield client, server
    finally:
        client.close()
        server.close()


@pytest.mark.timeout(20)
def test_a_loopback_connection_on_bbr_moves_to_a_loss_based_algorithm(
    loopback_pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = loopback_pair
    for sock in loopback_pair:
        force(sock, "bbr")
        tune_data_socket(sock)
        assert algorithm(sock) in ("cubic", "reno")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    payload = bytes(range(256)) * 4096  # 1 MiB still crosses, in order
    client.sendall(payload)
    got = bytearray()
    while len(got) < len(payload):
        got += server.recv(len(payload) - len(got))
    assert got == payload


@pytest.mark.timeout(20)
def test_a_loss_based_choice_is_left_as_it_is(
    loopback_pair: tuple[socket.socket, socket.socket],
) -> None:
    client, _ = loopback_pair
    force(client, "reno")
    assert avoid_pacing_congestion_control(client) == "reno"
    assert algorithm(client) == "reno"


@pytest.mark.timeout(20)
def test_a_unix_socket_is_untouched() -> None:
    a, b = socket.socketpair()
    with a, b:
        tune_data_socket(a)  # no TCP options on a unix socket: nothing raised


_PROBE = """
import json, socket, sys
from aiokvpipe.links.net import tune_data_socket
CC = socket.TCP_CONGESTION
def cc(s):
    return s.getsockopt(socket.IPPROTO_TCP, CC, 16).rstrip(b"\\0").decode()
own, other, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = {}
if other == "listen":
    with socket.create_server((own, port)) as srv:
        print("ready", flush=True)
        conn, _ = srv.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, CC, b"bbr")
            tune_data_socket(conn)
            out["accepted"] = cc(conn)
            conn.recv(1)
else:
    for label, host in (("other host", other), ("own address", own)):
        if label == "own address":
            srv = socket.create_server((own, port + 1))
        with socket.create_connection((host, port if label == "other host" else port + 1)) as s:
            s.setsockopt(socket.IPPROTO_TCP, CC, b"bbr")
            tune_data_socket(s)
            out[label] = cc(s)
            if label == "other host":
                s.sendall(b"x")
        if label == "own address":
            srv.close()
print(json.dumps(out), flush=True)
"""


@pytest.mark.timeout(60)
def test_a_connection_to_another_host_keeps_the_systems_algorithm() -> None:
    """Two namespaces joined by a veth pair: across it BBR stays (a real path
    to model); to the namespace's own address it goes, as on loopback."""
    with two_namespaces() as (ns_a, ns_b, ip_a, ip_b, _veth):
        port = 31000
        probe = [sys.executable, "-c", _PROBE]
        listener = subprocess.Popen(
            ["ip", "netns", "exec", ns_b, *probe, ip_b, "listen", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert listener.stdout is not None
            ready = listener.stdout.readline().strip()
            if ready != "ready":
                err = listener.stderr.read() if listener.stderr else ""
                if "bbr" in err or "No such file" in err:
                    pytest.skip(f"bbr is not available here: {err.strip()[-200:]}")
                raise AssertionError(f"listener did not start: {err}")
            dialer = subprocess.run(
                ["ip", "netns", "exec", ns_a, *probe, ip_a, ip_b, str(port)],
                capture_output=True,
                text=True,
                timeout=40,
            )
            assert dialer.returncode == 0, dialer.stderr
            accepted, _ = listener.communicate(timeout=20)
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait()
            for stream in (listener.stdout, listener.stderr):
                if stream is not None:
                    stream.close()
        dialed = json.loads(dialer.stdout.strip().splitlines()[-1])
        assert dialed == {"other host": "bbr", "own address": dialed["own address"]}
        assert dialed["own address"] in ("cubic", "reno")
        assert json.loads(accepted.strip().splitlines()[-1]) == {"accepted": "bbr"}
