"""Two simulated hosts on one machine: network namespaces joined by a veth pair.

Needs root (``ip netns``); skips with the reason otherwise. The namespaces
are always removed, even on failure.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator

import pytest


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def two_namespaces() -> Iterator[tuple[str, str, str, str, str]]:
    """``(ns_a, ns_b, ip_a, ip_b, veth_a)``; skips where namespaces cannot be made."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (ip netns)")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's 'ip' command")
    tag = secrets.token_hex(3)
    ns_a, ns_b, veth_a, veth_b = f"akv{tag}a", f"akv{tag}b", f"akv{tag}a", f"akv{tag}b"
    net = f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"
    ip_a, ip_b = f"{net}.1", f"{net}.2"
    made: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            try:
                ip("netns", "add", ns)
            except subprocess.CalledProcessError as exc:
                pytest.skip(f"cannot create network namespaces here: {exc.stderr.decode().strip()}")
            made.append(ns)
        ip("link", "add", veth_a, "netns", ns_a, "type", "veth", "peer", veth_b, "netns", ns_b)
        for ns, veth, addr in ((ns_a, veth_a, ip_a), (ns_b, veth_b, ip_b)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            ip("-n", ns, "link", "set", veth, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield ns_a, ns_b, ip_a, ip_b, veth_a
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
