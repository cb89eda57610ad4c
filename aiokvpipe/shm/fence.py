"""A full memory fence callable from Python.

Shared-memory flags are plain byte stores through a memoryview, which the C
compiler and the CPU may reorder with other loads and stores. Two orderings
matter to the ring:

* *publish/observe* (store-store, load-load): a chunk's bytes must be visible
  before its "written" flag, and a reader must read the flag before the bytes.
* *announce-then-recheck* (store-load, Dekker style): a waiter stores "parked"
  and then loads the flag it waits for; the other side stores that flag and
  then loads "parked". Without a full fence each side may read the other's
  old value and both go to sleep: a lost wake-up. x86 (TSO) allows exactly
  this store-load reordering, so a real fence is needed even there.

Python has no fence primitive, but a lock round trip contains one:

* x86-64: acquiring and releasing a ``threading.Lock`` executes ``lock``-
  prefixed read-modify-writes (``sem_wait``/``sem_post`` or a mutex CAS), each
  a full barrier.
* aarch64 and other weakly ordered CPUs: an acquire (LDAXR) followed by a
  release (STLR) is not a full barrier by itself, but release ->
  acquire on the next round trip is ordered (ARMv8 RCsc), so two round trips
  give: earlier stores visible before the first release, the first release
  before the second acquire, the second acquire before later loads.

Where the fence is weaker than assumed the ring stays correct, because every
parked waiter also rechecks on a slow safety timer; only latency would suffer.

Only the Dekker case needs a fence on x86: TSO already keeps stores in order
with stores and loads in order with loads and later stores, so there the
publish/observe orderings cost nothing. :data:`ORDERING_FENCE_NEEDED` says
whether a publish/observe point must call :func:`fence` (False on x86). The
C compiler cannot move the flag accesses either way: each is a separate
opaque call made by the interpreter. Skipping them matters on VMs, where a
cold fence on a hot path costs a microsecond or more.
"""

from __future__ import annotations

import platform
import threading

__all__ = ["ORDERING_FENCE_NEEDED", "STRONGLY_ORDERED", "fence"]

STRONGLY_ORDERED = platform.machine().lower() in {"x86_64", "amd64", "i386", "i686", "x86"}
ORDERING_FENCE_NEEDED = not STRONGLY_ORDERED  # store-store / load-load / load-store

_lock = threading.Lock()
_acquire = _lock.acquire
_release = _lock.release

if STRONGLY_ORDERED:

    def fence() -> None:
        """Full barrier: no load or store moves across this call."""
        _acquire()
        _release()

else:

    def fence() -> None:
        """Full barrier: no load or store moves across this call."""
        _acquire()
        _release()
        _acquire()
        _release()
