"""Two hosts, simulated: an endpoint in each of two network namespaces
joined by a veth pair (issue 12). Needs root (``ip netns``); skipped with the
reason otherwise. The namespaces are always removed, even on failure.
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from netns import ip, two_namespaces

WORKER = str(Path(__file__).with_name("netns_worker.py"))
PEER_TIMEOUT = 1.0


class NsEndpoint:
    """A netns_worker.py in a namespace; its output lines on a queue."""

    def __init__(self, ns: str, name: str, host: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, WORKER, "--name", name, "--host", host],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.address = self.wait("address", timeout=30)["address"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def wait(self, op: str, timeout: float, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for seen in self.seen:
            if seen["op"] == op and all(seen.get(k) == v for k, v in match.items()):
                self.seen.remove(seen)
                return seen
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {op} {match} within {timeout} s; seen {self.seen}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line["op"] == op and all(line.get(k) == v for k, v in match.items()):
                return line
            self.seen.append(line)

    def result(self, seq: int, timeout: float) -> dict[str, Any]:
        """The ``sent`` or ``error`` line of send ``seq``."""
        deadline = time.monotonic() + timeout
        while True:
            for op in ("sent", "error"):
                with contextlib.suppress(AssertionError):
                    return self.wait(op, 0.05, seq=seq)
            assert time.monotonic() < deadline, f"send {seq}: no outcome in {timeout} s"

    def command(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def close(self) -> str:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        err = self.proc.stderr.read() if self.proc.stderr else ""
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return err


@pytest.mark.timeout(90)
def test_two_hosts_partition_and_heal() -> None:
    with two_namespaces() as (ns_a, ns_b, ip_a, ip_b, veth_a):
        a = b = None
        try:
            a, b = NsEndpoint(ns_a, "a", ip_a), NsEndpoint(ns_b, "b", ip_b)
            a.command(op="send", to=b.address, seq=1)
            a.wait("sent", 10, seq=1)
            assert b.wait("got", 10, seq=1)["src"] == a.address
            b.command(op="send", to=a.address, seq=2)
            a.wait("got", 10, seq=2)
            a.command(op="stats")
            peer = a.wait("stats", 10)["peers"][b.address]
            assert (peer["send_transport"], peer["recv_transport"]) == ("tcp", "tcp")

            ip("-n", ns_a, "link", "set", veth_a, "down")  # the cable is pulled
            cut = time.monotonic()
            for side, other in ((a, b), (b, a)):
                event = side.wait("event", PEER_TIMEOUT + 5, address=other.address)
                assert event["kind"] == "dead" and event["error"] == "PeerClosedError", event
                assert event["t"] - cut < PEER_TIMEOUT + 1.0, event
            b.command(op="send", to=a.address, seq=3)  # while cut: a clear error
            failed = b.wait("error", 10, seq=3)
            assert failed["error"] in ("PeerUnreachableError", "PeerClosedError"), failed

            ip("-n", ns_a, "link", "set", veth_a, "up")
            healed = time.monotonic()
            seq = 4
            while True:  # a new send reconnects (once the link carries packets again)
                a.command(op="send", to=b.address, seq=seq)
                if a.result(seq, 10)["op"] == "sent":
                    break
                assert time.monotonic() - healed < 10, "no reconnect after the link came back"
                seq += 1
                time.sleep(0.2)
            assert b.wait("got", 10, seq=seq)["src"] == a.address
        finally:
            errors = [side.close() for side in (a, b) if side is not None]
            for err in errors:
                assert "Traceback" not in err, err
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert ns_a not in listed and ns_b not in listed  # always removed
