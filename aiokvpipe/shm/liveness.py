"""Is the process on the other side of a ring still alive?

A pid alone is not an identity: pids are reused, a killed child stays a
zombie until reaped (``kill(pid, 0)`` still succeeds), and a process in
another pid namespace sees different numbers. So a process is recorded as
``(pid, start time, pid-namespace id)``; a peer is considered gone when the
pid no longer exists, is a zombie, or now names a process that started at a
different time. Checks are skipped (the peer is assumed alive) when the
namespaces differ, because the numbers would then mean nothing.

On Linux a pidfd gives the prompt answer: it becomes readable the moment the
process exits, so a parked reader can watch it next to its doorbell.
"""

from __future__ import annotations

import contextlib
import os
import select
from dataclasses import dataclass

__all__ = ["ProcessIdentity", "open_pidfd", "pidfd_exited"]


def _read_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) from /proc, or None if absent."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return ("?", 0)
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return fields[0].decode("ascii", "replace"), int(fields[19])
    except (IndexError, ValueError):
        return ("?", 0)


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


@dataclass(frozen=True)
class ProcessIdentity:
    """Enough to tell "this very process" from a later one with the same pid."""

    pid: int
    start: int
    namespace: int

    @classmethod
    def current(cls) -> ProcessIdentity:
        pid = os.getpid()
        stat = _read_stat(pid)
        return cls(pid, stat[1] if stat else 0, _pid_namespace())

    @property
    def comparable(self) -> bool:
        """Whether pid checks mean anything from this process (same namespace)."""
        return self.pid > 0 and self.namespace == _pid_namespace()

    def is_alive(self) -> bool:
        """False once the process exited (zombies count as exited)."""
        if not self.comparable:
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by someone else; the start time decides
        stat = _read_stat(self.pid)
        if stat is None:
            # With /proc, a missing entry means it just exited; without /proc
            # (not Linux), kill() succeeding is all we can know.
            return not os.path.isdir("/proc/self")
        state, start = stat
        if state in ("Z", "X"):
            return False
        return not (self.start and start and start != self.start)


def open_pidfd(identity: ProcessIdentity) -> int | None:
    """A pidfd for ``identity`` (caller closes it), or None where unsupported.

    Raises ProcessLookupError when the process is already gone. The identity is
    re-checked after opening, so the fd cannot name a recycled pid.
    """
    if not identity.comparable or not hasattr(os, "pidfd_open"):
        return None
    try:
        fd = os.pidfd_open(identity.pid)
    except ProcessLookupError:
        raise
    except OSError:
        return None
    if not identity.is_alive():
        os.close(fd)
        raise ProcessLookupError(identity.pid)
    return fd


def pidfd_exited(fd: int) -> bool:
    """True when the process behind ``fd`` has exited (never blocks)."""
    with contextlib.suppress(OSError):
        readable, _, _ = select.select([fd], [], [], 0)
        return bool(readable)
    return False
