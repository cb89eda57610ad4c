"""A microsecond-precise one-shot timer as a pollable fd (Linux ``timerfd``).

Loop timers are too coarse to wake a waiter "just before" something is due:
asyncio rounds every ``epoll_wait`` timeout up to whole milliseconds, and
libuv (uvloop) keeps milliseconds too. A ``timerfd`` armed at an absolute
``CLOCK_MONOTONIC`` time fires within microseconds and is watched like any
other fd (``loop.add_reader``, ``poll``), so no thread is involved.

Python 3.13 has ``os.timerfd_create``; on older versions the same two libc
calls go through ctypes. Where neither exists (not Linux), :func:`open_timer`
returns None and callers fall back to their coarse timers.

:class:`LoopTimer` is what waiters hold: a timer opened on first use and
watched by whichever loop arms it, calling back when it fires.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import sys
import time
from collections.abc import Callable

__all__ = ["LoopTimer", "PreciseTimer", "open_timer"]

_CLOCK_MONOTONIC = 1
_TFD_TIMER_ABSTIME = 1
_TFD_NONBLOCK = 0o4000
_TFD_CLOEXEC = 0o2000000


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and sys.platform == "linux":
        with contextlib.suppress(OSError):
            lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            lib.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
            lib.timerfd_settime.argtypes = [
                ctypes.c_int,
                ctypes.c_int,
                ctypes.POINTER(_Itimerspec),
                ctypes.c_void_p,
            ]
            _libc = lib
    return _libc


class PreciseTimer:
    """One timerfd: :meth:`arm` at a ``time.monotonic()`` instant, watch :attr:`fileno`."""

    def __init__(self, fd: int, libc: ctypes.CDLL | None) -> None:
        self.fileno = fd
        self._libc = libc
        self.armed = False

    def arm(self, at: float) -> None:
        """Fire once at monotonic time ``at`` (at once if it has passed)."""
        at = max(at, 1e-9)  # 0 would disarm
        seconds = int(at)
        nanos = int((at - seconds) * 1e9)
        if self._libc is None:
            os.timerfd_settime_ns(  # type: ignore[attr-defined]  # Python >= 3.13
                self.fileno, flags=_TFD_TIMER_ABSTIME, initial=seconds * 1_000_000_000 + nanos
            )
        else:
            spec = _Itimerspec(_Timespec(0, 0), _Timespec(seconds, nanos))
            done = self._libc.timerfd_settime(
                self.fileno, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None
            )
            if done != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        self.armed = True

    def disarm(self) -> bool:
        """Cancel the timer; True if it had fired already (that expiry is consumed).

        Either way nothing stays readable: re-setting a timerfd also drops an
        expiry that was not read.
        """
        if not self.armed:
            return False
        if self.clear():
            return True
        if self._libc is None:
            os.timerfd_settime_ns(self.fileno, initial=0)  # type: ignore[attr-defined]
        else:
            spec = _Itimerspec(_Timespec(0, 0), _Timespec(0, 0))
            self._libc.timerfd_settime(self.fileno, 0, ctypes.byref(spec), None)
        self.armed = False
        return False

    def clear(self) -> bool:
        """Consume an expiry; True if the timer had fired."""
        try:
            os.read(self.fileno, 8)
        except (BlockingIOError, InterruptedError):
            return False
        self.armed = False
        return True

    def close(self) -> None:
        if self.fileno >= 0:
            os.close(self.fileno)
            self.fileno = -1


def open_timer() -> PreciseTimer | None:
    """A new timer, or None where timerfd is unavailable."""
    flags = _TFD_NONBLOCK | _TFD_CLOEXEC
    if hasattr(os, "timerfd_create"):
        return PreciseTimer(os.timerfd_create(time.CLOCK_MONOTONIC, flags=flags), None)
    libc = _load_libc()
    if libc is None:
        return None
    fd = libc.timerfd_create(_CLOCK_MONOTONIC, flags)
    if fd < 0:
        return None
    return PreciseTimer(fd, libc)


class LoopTimer:
    """A :class:`PreciseTimer` opened on first use and watched by the loop that arms it.

    ``on_fire`` runs as a loop callback once the armed instant has passed.
    A waiter (a ring doorbell, a receive channel's waiter set) holds one for
    its life and may be used from several loops in turn: the fd follows the
    loop it was last armed from. Arming without a loop (a blocking caller
    that polls :attr:`timer`'s fd itself) leaves any registration alone.
    """

    def __init__(self, on_fire: Callable[[], None]) -> None:
        self._on_fire = on_fire
        self.timer: PreciseTimer | None = None
        self._tried = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = False  # armed, and not disarmed since

    def _open(self) -> PreciseTimer | None:
        if not self._tried:
            self._tried = True
            self.timer = open_timer()
        return self.timer

    def arm(self, at: float, loop: asyncio.AbstractEventLoop | None = None) -> bool:
        """Fire at monotonic time ``at``; False (nothing armed) where there is no timerfd."""
        timer = self._open()
        if timer is None:
            return False
        if loop is not None and self._loop is not loop:
            self._unwatch()
            loop.add_reader(timer.fileno, self._fired)
            self._loop = loop
        timer.arm(at)
        self._pending = True
        return True

    def disarm(self) -> bool:
        """Cancel the armed instant; True if it had passed (consumed either way)."""
        timer = self.timer
        if not self._pending or timer is None:
            return False
        self._pending = False
        if not timer.armed:
            return True  # fired, and the loop callback consumed it
        return timer.disarm()

    def _fired(self) -> None:
        timer = self.timer
        if timer is not None and timer.clear():
            self._on_fire()

    def _unwatch(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed() and self.timer is not None:
            loop.remove_reader(self.timer.fileno)

    def close(self) -> None:
        """Stop watching and close the fd; a closed LoopTimer never arms again."""
        self._unwatch()
        self._pending, self._tried = False, True
        if self.timer is not None:
            self.timer.close()
            self.timer = None
