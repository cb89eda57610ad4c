"""Doorbell: a wake-up fd, so a parked ring peer costs no CPU.

Each peer of a ring (the writer, each reader) owns one unix datagram socket
bound to an address derived from the ring name and its role. A parked peer
waits until the socket is readable (``loop.add_reader``, or ``poll`` on the
blocking path); the other side rings it by sending one byte.

* Linux: abstract-namespace addresses, so nothing appears in the filesystem
  and the kernel frees the name when the owner dies. Abstract sockets carry
  no permissions: another local process could send spurious rings (harmless:
  a woken peer always rechecks the shared flags) or squat a name before it is
  bound (the bind then fails with a clear error, never silently).
* Elsewhere: a socket file in ``<tempdir>/aiokvpipe-<uid>``, unlinked on
  close. The directory must be a real directory (not a symlink) owned by
  this user with no group or other access, or nothing is bound there: in a
  shared temp dir another user could create that path first, and whoever
  owns the directory can swap our sockets for theirs.

A ring that fails (peer not bound yet or gone: ECONNREFUSED/ENOENT; queue
full: EAGAIN, meaning a ring is already pending) is ignored. The receiver's
loop callback takes every queued ring as it arrives, waiter or not, so
bursts never fill the socket buffer; the blocking path drains on wake.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable

from .._timerfd import LoopTimer
from ..errors import HandleError

__all__ = [
    "CLOSED",
    "EXTRA",
    "RUNG",
    "TIMEOUT",
    "TIMER",
    "Doorbell",
    "check_private_dir",
    "doorbell_address",
]

_ABSTRACT = sys.platform == "linux"
_DRAIN_BYTES = 4096


def _socket_dir() -> str:
    path = os.path.join(tempfile.gettempdir(), f"aiokvpipe-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    check_private_dir(path)
    return path


def check_private_dir(path: str) -> None:
    """Raise HandleError unless ``path`` is a directory only this user can use.

    That is: not a symlink (``lstat``: whoever made the link chose where it
    points), a directory, owned by our uid, no permission bits for group or
    others (0700 or stricter). The temp dir is shared and sticky, so once it
    passes nobody else can rename or replace it.
    """
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise HandleError(
            f"doorbell directory {path!r} cannot be checked: {exc.strerror or exc}"
        ) from exc
    uid = os.getuid()
    problems = []
    if stat.S_ISLNK(st.st_mode):
        problems.append("a symlink")
    elif not stat.S_ISDIR(st.st_mode):
        problems.append("not a directory")
    else:
        if st.st_uid != uid:
            problems.append(f"owned by uid {st.st_uid}")
        if stat.S_IMODE(st.st_mode) & 0o077:
            problems.append(f"mode {stat.S_IMODE(st.st_mode):04o}")
    if problems:
        raise HandleError(
            f"doorbell directory {path!r} is {' and '.join(problems)}: it must be a "
            f"directory owned by uid {uid} with mode 0700, or other users could ring, "
            "squat or replace the ring's doorbells; remove it (it is recreated) or "
            "set TMPDIR to a private directory"
        )


def doorbell_address(ring_name: str, role: str, abstract: bool = _ABSTRACT) -> str | bytes:
    """The address of ``role``'s doorbell ("w", or "r<rank>") on ring ``ring_name``."""
    bare = ring_name.lstrip("/")
    if abstract:
        return f"\0{bare}.{role}".encode()
    return os.path.join(_socket_dir(), f"{bare}.{role}")


RUNG = "rung"
EXTRA = "extra"
TIMEOUT = "timeout"
TIMER = "timer"  # the precise wake-up asked for with ``wake_at``
CLOSED = "closed"


def _resolve(fut: asyncio.Future[str], reason: str) -> None:
    if not fut.done():
        fut.set_result(reason)


class Doorbell:
    """One peer's doorbell: bound on creation, rings others, waits on itself."""

    def __init__(self, address: str | bytes) -> None:
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.setblocking(False)
            self._sock.bind(address)
        except OSError as exc:
            self._sock.close()
            shown = address[1:].decode() if isinstance(address, bytes) else address
            raise HandleError(
                f"cannot bind doorbell {shown!r}: {exc.strerror or exc} "
                "(is this role already attached to the ring?)"
            ) from exc
        self._fd = self._sock.fileno()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched: list[int] = []
        self._fired: set[int] = set()
        self._fut: asyncio.Future[str] | None = None
        self._on_rung: Callable[[], bool] | None = None  # the current wait's hook
        self._timer = LoopTimer(self._on_timer)

    @property
    def fileno(self) -> int:
        return self._fd

    def ring(self, address: str | bytes) -> None:
        """Wake the peer at ``address`` (never blocks, never raises for a gone peer)."""
        try:
            self._sock.sendto(b"\1", address)
        except (BlockingIOError, ConnectionRefusedError, FileNotFoundError):
            pass  # already rung, or nobody parked there any more
        except OSError:
            if not self._closed:
                raise

    def drain(self) -> None:
        """Discard every queued ring."""
        recv = self._sock.recv
        try:
            while recv(_DRAIN_BYTES):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            if not self._closed:
                raise

    def exited(self, fd: int) -> bool:
        """Whether the extra fd ``fd`` (a pidfd) has been seen readable."""
        return fd in self._fired

    def _wake(self, reason: str) -> None:
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(reason)

    def _on_ring(self) -> None:
        # One datagram per callback: the fd is level-triggered, so any others
        # call back again (as stale rings, drained with no waiter to wake).
        try:
            self._sock.recv(_DRAIN_BYTES)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            if not self._closed:
                raise
        fut = self._fut
        if fut is None or fut.done():
            return  # a stale ring (nobody waits), or the wait already ended
        hook = self._on_rung
        if hook is not None:
            # The waiter's own work, done in this callback: whatever the hook
            # wakes runs in the loop's next turn, not one after the waiter's.
            try:
                if hook():
                    return  # done here; the wait goes on
            except Exception as exc:
                fut.set_exception(exc)
                return
        fut.set_result(RUNG)

    def _on_extra(self, fd: int) -> None:
        # A pidfd stays readable once its process exited: remember, stop watching.
        self._fired.add(fd)
        if self._loop is not None and fd in self._watched:
            self._loop.remove_reader(fd)
            self._watched.remove(fd)
        self._wake(EXTRA)

    def _on_timer(self) -> None:
        self._wake(TIMER)

    def _watch(self, loop: asyncio.AbstractEventLoop, extra_fd: int | None) -> None:
        # Registrations persist between waits: parking then costs no epoll_ctl.
        if self._loop is not loop:
            self._unwatch()
            loop.add_reader(self._fd, self._on_ring)
            self._loop, self._watched = loop, [self._fd]
        if extra_fd is not None and extra_fd not in self._watched and extra_fd not in self._fired:
            loop.add_reader(extra_fd, self._on_extra, extra_fd)
            self._watched.append(extra_fd)

    def _arm(
        self, wake_at: float | None, timeout: float, loop: asyncio.AbstractEventLoop | None
    ) -> tuple[bool, float]:
        """Arm the precise timer for ``wake_at`` (monotonic); coarse fallback: a shorter timeout."""
        if wake_at is None:
            return False, timeout
        if self._timer.arm(wake_at, loop):
            return True, timeout
        return False, min(timeout, max(0.0, wake_at - time.monotonic()))

    def _unwatch(self) -> None:
        loop, watched = self._loop, self._watched
        self._loop, self._watched = None, []
        if loop is not None and not loop.is_closed():
            for fd in watched:
                loop.remove_reader(fd)

    async def wait(
        self,
        timeout: float,
        extra_fd: int | None = None,
        wake_at: float | None = None,
        on_rung: Callable[[], bool] | None = None,
    ) -> str:
        """Wait until rung, ``extra_fd`` is readable, ``timeout`` passes, or close.

        ``wake_at`` (a ``time.monotonic()`` instant) also ends the wait, to
        within microseconds where timerfd exists (loop timers round to ms).
        Returns why: :data:`RUNG`, :data:`EXTRA`, :data:`TIMER`,
        :data:`TIMEOUT` or :data:`CLOSED`. Stale rings (queued while nobody
        waited) may wake it early: callers always recheck what they wait for.

        ``on_rung`` runs inside the fd callback of each ring while this wait
        lasts (never after it ended, was cancelled or timed out), before the
        waiter is resumed. It returns True to go on waiting (it did the
        waiter's work itself), False to end the wait with :data:`RUNG`; an
        exception it raises is raised here.
        """
        if self._closed:
            return CLOSED
        if extra_fd is not None and extra_fd in self._fired:
            return EXTRA
        loop = asyncio.get_running_loop()
        precise, timeout = self._arm(wake_at, timeout, loop)
        self._watch(loop, extra_fd)
        fut: asyncio.Future[str] = loop.create_future()
        self._fut, self._on_rung = fut, on_rung
        timer = loop.call_later(timeout, _resolve, fut, TIMEOUT)
        try:
            return await fut
        finally:
            timer.cancel()
            self._fut = self._on_rung = None
            if precise:
                self._timer.disarm()  # also drops an expiry that raced the ring

    def wait_blocking(
        self, timeout: float, extra_fd: int | None = None, wake_at: float | None = None
    ) -> str:
        """The same wait for non-async callers (blocks the calling thread)."""
        if self._closed:
            return CLOSED
        if extra_fd is not None and extra_fd in self._fired:
            return EXTRA
        precise, timeout = self._arm(wake_at, timeout, None)
        timer_fd = self._timer.timer.fileno if precise and self._timer.timer else -1
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        if extra_fd is not None:
            poller.register(extra_fd, select.POLLIN)
        if precise:
            poller.register(timer_fd, select.POLLIN)
        try:
            events = poller.poll(max(0, int(timeout * 1000 + 0.999)))
        except InterruptedError:
            events = []
        finally:
            if precise:
                self._timer.disarm()
        reason = TIMEOUT
        for fd, _ in events:
            if fd == self._fd:
                self.drain()
                reason = RUNG
            elif precise and fd == timer_fd:
                reason = RUNG if reason == RUNG else TIMER
            else:
                self._fired.add(fd)
                return EXTRA
        return reason

    def close(self) -> None:
        """Wake a current waiter, stop watching, close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._unwatch()
        self._wake(CLOSED)
        self._sock.close()
        self._timer.close()
        if isinstance(self.address, str):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address)
