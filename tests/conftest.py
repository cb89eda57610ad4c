"""Shared fixtures: both event loops, strict leak checks, helpers.

Every async test runs under the default asyncio loop and under uvloop. An
autouse fixture fails a test that leaks file descriptors, threads, asyncio
tasks, ``/dev/shm`` segments, or lets an exception reach the loop's handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from aiokvpipe.ports import free_port

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extra
    uvloop = None  # type: ignore[assignment]

SHM_PREFIXES = ("aiokv", "akv")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Move torch's and numpy's import-time objects out of the collector's way.

    The leak checks call ``gc.collect()`` per test; with torch imported a full
    collection costs ~80 ms, after ``gc.freeze()`` it only walks new objects.
    """
    import numpy  # noqa: F401
    import torch  # noqa: F401

    import aiokvpipe  # noqa: F401
    from aiokvpipe.bench.procs import worker_context

    gc.collect()
    gc.freeze()
    # Worker processes fork from a server that imported torch once (~2 s of
    # CPU saved per child); start it, and the resource tracker it uses, before
    # the first test's fd snapshot.
    if worker_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Run every async test on both loops (the vLLM-style servers run uvloop)."""
    factories: dict[str, Any] = {"asyncio": asyncio.new_event_loop}
    if uvloop is not None:
        factories["uvloop"] = uvloop.new_event_loop
    return factories


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _is_ours(pid: int) -> bool:
    """True if ``pid`` is this process, a descendant of it, or no longer running."""
    me = os.getpid()
    while pid > 1:
        if pid == me:
            return True
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])  # the parent's pid
        except (OSError, ValueError, IndexError):
            return True  # exited: whoever left its segment behind leaked it
    return False


def _shm_entries() -> set[str]:
    """Our segments in /dev/shm: those whose creator is this test process's family.

    Segments of unrelated processes (a benchmark running beside the tests)
    are not this test's leaks. The creator's pid sits in the ring header.
    """
    from aiokvpipe.shm.ring import CREATOR_OFF, IDENTITY

    try:
        names = [n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIXES)]
    except FileNotFoundError:  # pragma: no cover
        return set()
    ours = set()
    for name in names:
        try:
            with open(f"/dev/shm/{name}", "rb") as fh:
                head = fh.read(CREATOR_OFF + IDENTITY.size)
            pid = IDENTITY.unpack_from(head, CREATOR_OFF)[0]
        except (OSError, struct.error):
            ours.add(name)  # unreadable or foreign layout: count it, to be safe
            continue
        if _is_ours(pid):
            ours.add(name)
    return ours


def _describe_fds(fds: set[int]) -> list[str]:
    out = []
    for fd in sorted(fds):
        try:
            out.append(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            out.append(str(fd))
    return out


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaked fds, threads or shared-memory segments."""
    gc.collect()
    fds_before = _open_fds()
    threads_before = {t.ident for t in threading.enumerate()}
    shm_before = _shm_entries()
    yield
    if request.node.get_closest_marker("allow_leaks"):
        return
    leaked_fds: set[int] = set()
    for _ in range(50):
        gc.collect()
        leaked_fds = _open_fds() - fds_before
        leaked_threads = [
            t for t in threading.enumerate() if t.ident not in threads_before and t.is_alive()
        ]
        leaked_shm = _shm_entries() - shm_before
        if not leaked_fds and not leaked_threads and not leaked_shm:
            return
        threading.Event().wait(0.02)
    assert not leaked_fds, f"leaked file descriptors: {_describe_fds(leaked_fds)}"
    assert not leaked_threads, f"leaked threads: {leaked_threads}"
    assert not leaked_shm, f"leaked /dev/shm segments: {sorted(leaked_shm)}"


#: Test modules whose code hands work to other threads (the NCCL thread, CUDA
#: event polling, vLLM's loop thread, torch.distributed set-up for rings).
THREADED_MODULES = ("cuda", "nccl", "gpu", "vllm", "shm", "ring")


@pytest.fixture(autouse=True)
async def loop_checks(request: pytest.FixtureRequest) -> Any:
    """Fail on leaked tasks and on exceptions that reached the loop's handler."""
    loop = asyncio.get_running_loop()
    # asyncio's debug mode raises on loop calls from a foreign thread, which
    # the thread-handing code relies on, but records a stack per callback:
    # it nearly doubled the suite's CPU time (a flood test: 3.0 s on asyncio
    # with it, 0.7 s on uvloop without). So it runs where threads are in
    # play, on the asyncio run of each such test (every test runs on both
    # loops); AIOKVPIPE_TEST_LOOP_DEBUG=1 turns it on everywhere.
    uvloop_run = type(loop).__module__.startswith("uvloop")
    threaded = any(part in request.node.module.__name__ for part in THREADED_MODULES)
    everywhere = os.environ.get("AIOKVPIPE_TEST_LOOP_DEBUG") == "1"
    loop.set_debug(everywhere or (threaded and not uvloop_run))
    loop.slow_callback_duration = 1.0
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    current = asyncio.current_task()
    before = asyncio.all_tasks() - {current}
    yield
    for _ in range(20):
        leftover = {t for t in asyncio.all_tasks() - before if not t.done()} - {
            asyncio.current_task()
        }
        if not leftover:
            break
        await asyncio.sleep(0.01)
    assert not leftover, f"leaked tasks: {leftover}"
    gc.collect()
    await asyncio.sleep(0)
    assert not errors, f"exceptions reached the loop's handler: {errors}"


@pytest.fixture
def port() -> int:
    return free_port()


async def connect_beside(config: Any, proc: Any) -> Any:
    """``Pipe.connect(config)`` while the peer runs in ``proc`` (a Popen).

    Fails the test with the child's stderr if it exits before the pipe is up,
    instead of waiting out ``connect_timeout``.
    """
    from aiokvpipe.pipe import Pipe

    connect = asyncio.ensure_future(Pipe.connect(config))
    while not connect.done():
        if proc.poll() is not None:
            connect.cancel()
            with contextlib.suppress(BaseException):
                await connect
            pytest.fail(f"peer exited early: {proc.communicate()[1].decode()}")
        await asyncio.wait({connect}, timeout=0.05)
    return connect.result()


@pytest.fixture
def loopback_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback TCP pair (client, accepted server end), blocking; closed after."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    try:
        yield client, server
    finally:
        client.close()
        server.close()
