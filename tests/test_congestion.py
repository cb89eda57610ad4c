"""Same-host TCP connections run a loss-based congestion control; others keep the system's.

On this machine class TCP defaults to BBR, whose pacing halved a raw
socket's 64 MiB loopback throughput (see docs/latency.md), and kept pacing
when switched away from after the connection was made. So our listeners
and same-host dials choose before the connection exists, and
``tune_data_socket`` (every link socket, both ends) gives an accepted
remote connection the system's algorithm back.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from netns import two_namespaces

from aiokvpipe.links.net import (
    avoid_pacing_congestion_control,
    is_local_address,
    listening_socket,
    tune_data_socket,
)

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


@pytest.mark.timeout(20)
def test_a_listeners_connections_start_loss_based_before_any_tuning() -> None:
    with listening_socket("127.0.0.1", 0, 1) as listener:
        listener.setblocking(True)
        if algorithm(listener) != "bbr" and not _can_use("bbr"):
            pytest.skip("bbr is not available here: nothing to avoid")
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    with client, server:
        assert algorithm(server) in ("cubic", "reno")  # inherited, not switched later


def _can_use(name: str) -> bool:
    with socket.socket() as probe:
        try:
            probe.setsockopt(socket.IPPROTO_TCP, CONGESTION, name.encode())  # type: ignore[arg-type]
        except OSError:
            return False
    return True


def test_local_addresses_are_told_apart_from_remote_ones() -> None:
    assert is_local_address("127.0.0.1")
    assert is_local_address("127.3.2.1")
    assert is_local_address("localhost")
    assert is_local_address("::ffff:127.0.0.1")  # a v4 peer seen by a dual-stack socket
    assert not is_local_address("192.0.2.7")  # TEST-NET-1: nobody's address
    assert not is_local_address("example.invalid")  # a name we do not resolve


_PROBE = """
import asyncio, json, socket, sys, time
from aiokvpipe.links.net import connect_with_retry, listening_socket, tune_data_socket

def cc(s):
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\\0").decode()

own, other, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = {}
if other == "listen":  # another host's listener: what its accepted connection runs
    with listening_socket(own, port, 1) as srv:
        srv.setblocking(True)
        print("ready", flush=True)
        conn, _ = srv.accept()
        with conn:
            out["accepted, as inherited"] = cc(conn)
            tune_data_socket(conn)
            out["accepted"] = cc(conn)
            conn.recv(1)
else:
    async def dial(host, port):
        return await connect_with_retry(host, port, time.monotonic() + 10, "probe")
    with listening_socket(own, port, 1) as srv:  # our own address: same host
        srv.setblocking(True)
        local = asyncio.run(dial(own, port))
        conn, _ = srv.accept()
        with local, conn:
            out["own address, dialled"] = cc(local)
            out["own address, accepted"] = cc(conn)
    remote = asyncio.run(dial(other, port))
    with remote:
        out["other host, dialled"] = cc(remote)
        remote.sendall(b"x")
print(json.dumps(out), flush=True)
"""


@pytest.mark.timeout(120)
def test_a_connection_to_another_host_keeps_the_systems_algorithm() -> None:
    """Two namespaces joined by a veth pair, each on bbr: across the pair both
    ends keep it (a real path to model); to a namespace's own address both
    ends are loss-based."""
    with two_namespaces() as (ns_a, ns_b, ip_a, ip_b, _veth):
        for ns in (ns_a, ns_b):
            done = subprocess.run(
                ["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_congestion_control=bbr"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if done.returncode:
                pytest.skip(f"cannot make bbr the namespace's default: {done.stderr.strip()}")
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
            assert ready == "ready", listener.stderr.read() if listener.stderr else ""
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
        assert dialed["other host, dialled"] == "bbr", dialed
        assert dialed["own address, dialled"] in ("cubic", "reno"), dialed
        assert dialed["own address, accepted"] in ("cubic", "reno"), dialed
        remote = json.loads(accepted.strip().splitlines()[-1])
        assert remote["accepted, as inherited"] in ("cubic", "reno"), remote  # the listener's
        assert remote["accepted"] == "bbr", remote  # given back: the peer is another host
