"""One thread per process makes every NCCL call, in one order.

NCCL calls on independent communicators of one device from several threads
are unsafe, and a communicator set-up that blocks (``ncclCommInitRank`` waits
for every rank; the first transfer waits for the peer's connection) must not
block the event loop. So every NCCL call of the process, set-up, warm-up,
``ncclSend``/``ncclRecv``, ``ncclCommGetAsyncError`` and ``ncclCommAbort``,
runs on one :class:`NcclThread`, which takes jobs in submission order.

Set-ups are the hard part: each one blocks until the peer's end takes part,
and with one thread per process, two processes that each start a different
communicator first would wait for each other forever. Set-ups are therefore
*reserved* first and *armed* once the peer has reserved its end too (the
transport's hellos carry that), and the thread starts set-ups only when every
reservation it holds is armed, all of them at once in one NCCL group (so
set-ups of both ends of a communicator in one process, or of two
communicators with two peers, never wait on each other). Why that cannot
deadlock: if process P's group waits for Q on communicator C, Q reserved C
before P armed it; had Q reserved C before its own running group started, that
group would contain C. So Q's group started before P's, and a cycle of waits
would order a group before itself.

The thread also polls ``check_async_error`` of live communicators every few
milliseconds, so that the loop learns of a failed peer without calling NCCL
itself (:meth:`Communicator.check` reads the stored result). It exits when
it has been idle with no live communicator for a moment; the next call starts
a new one (calls are never concurrent, which is what NCCL needs).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .._timeouts import deadline
from .runtime import cuda_errors

if TYPE_CHECKING:
    from .communicator import Communicator

T = TypeVar("T")

_IDLE_EXIT = 0.2  # seconds without work (and without live communicators) before exiting
_POLL_INTERVAL = 0.005  # how often live communicators' async errors are read


@dataclass(eq=False)
class InitTicket:
    """A reserved communicator set-up (see module docstring).

    ``build`` runs on the NCCL thread inside a group and returns the raw
    communicator; ``warmup`` (if any) queues its first transfer inside a
    second group, after which an event is recorded on ``stream``.
    ``future`` resolves to ``(Communicator, warm-up event or None)``.
    """

    nccl: Any
    build: Callable[[], Any]
    stream: Any
    warmup: Callable[[Any], None] | None
    what: str
    future: concurrent.futures.Future[tuple[Communicator, Any]] = field(
        default_factory=concurrent.futures.Future
    )
    armed: bool = False
    _thread: NcclThread | None = None

    def arm(self) -> None:
        """The peer has reserved its end: this set-up may start."""
        assert self._thread is not None
        self._thread._arm(self)

    def cancel(self) -> None:
        """Give up on a set-up that has not started (a started one is aborted when done)."""
        self.future.cancel()


class NcclThread:
    """The thread that runs every NCCL call of a process (see module docstring)."""

    def __init__(
        self,
        *,
        name: str = "aiokvpipe: nccl",
        idle_exit: float = _IDLE_EXIT,
        poll_interval: float = _POLL_INTERVAL,
    ) -> None:
        self._name = name
        self._idle_exit = idle_exit
        self._poll_interval = poll_interval
        self._cond = threading.Condition()
        self._jobs: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._tickets: list[InitTicket] = []
        self._watched: set[Communicator] = set()
        self._thread: threading.Thread | None = None

    # -- submitting ----------------------------------------------------------
    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Queue ``fn`` behind every earlier job; its outcome lands in the future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            self._jobs.append((fn, future))
            self._wake_locked()
        return future

    async def call(
        self,
        fn: Callable[[], T],
        *,
        timeout: float | None,
        what: str,
        on_abandoned: Callable[[T], object] | None = None,
    ) -> T:
        """Run ``fn`` on the thread and await it (see :meth:`wait`)."""
        return await self.wait(
            self.submit(fn), timeout=timeout, what=what, on_abandoned=on_abandoned
        )

    async def wait(
        self,
        future: concurrent.futures.Future[T],
        *,
        timeout: float | None,
        what: str,
        on_abandoned: Callable[[T], object] | None = None,
    ) -> T:
        """Await a job's future; TransferTimeout after ``timeout``.

        A job that has not started when the caller gives up never runs; one
        that is running cannot be stopped, and if it produces a result,
        ``on_abandoned`` gets it, as a job of its own on this thread (e.g. to
        abort a communicator nobody will use).
        """
        try:
            async with deadline(timeout, lambda: what):
                return await asyncio.wrap_future(future)
        except BaseException:
            future.cancel()  # no-op once running
            if on_abandoned is not None:
                cleanup = on_abandoned
                future.add_done_callback(lambda f: self._abandoned(f, cleanup))
            raise

    def _abandoned(
        self, future: concurrent.futures.Future[T], cleanup: Callable[[T], object]
    ) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        result = future.result()
        self.submit(lambda: cleanup(result))

    def reserve(
        self,
        nccl: Any,
        build: Callable[[], Any],
        *,
        stream: Any,
        warmup: Callable[[Any], None] | None,
        what: str,
    ) -> InitTicket:
        """Reserve a communicator set-up; it starts once armed (see module docstring)."""
        ticket = InitTicket(nccl, build, stream, warmup, what, _thread=self)
        ticket.future.add_done_callback(lambda _f: self._wake())  # a cancel may unblock
        with self._cond:
            self._tickets.append(ticket)
            self._wake_locked()
        return ticket

    def _arm(self, ticket: InitTicket) -> None:
        with self._cond:
            ticket.armed = True
            self._wake_locked()

    # -- live communicators ---------------------------------------------------
    def watch(self, communicator: Communicator) -> None:
        with self._cond:
            self._watched.add(communicator)

    def unwatch(self, communicator: Communicator) -> None:
        with self._cond:
            self._watched.discard(communicator)

    @property
    def ident(self) -> int | None:
        """The running thread's ident (None while none runs)."""
        thread = self._thread
        return None if thread is None else thread.ident

    # -- the thread ------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._wake_locked()

    def _wake_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._cond.notify()

    def _take_group(self) -> list[InitTicket] | None:
        """Every reserved set-up, if all are armed (cancelled ones dropped)."""
        self._tickets = [t for t in self._tickets if not t.future.cancelled()]
        if not self._tickets or not all(t.armed for t in self._tickets):
            return None
        group = [t for t in self._tickets if t.future.set_running_or_notify_cancel()]
        self._tickets = []
        return group or None

    def _run(self) -> None:
        idle_since = last_poll = time.monotonic()
        while True:
            group: list[InitTicket] | None = None
            job: tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None = None
            with self._cond:
                group = self._take_group()
                if group is None and self._jobs:
                    job = self._jobs.popleft()
                if group is None and job is None:
                    idle = time.monotonic() - idle_since
                    if not self._watched and not self._tickets and idle >= self._idle_exit:
                        self._thread = None
                        return
                    self._cond.wait(self._poll_interval if self._watched else self._idle_exit)
                watched = list(self._watched)
            if group is not None:
                _run_group(group)
                idle_since = time.monotonic()
            elif job is not None:
                _run_job(*job)
                idle_since = time.monotonic()
            now = time.monotonic()
            if watched and now - last_poll >= self._poll_interval:
                last_poll = now
                for communicator in watched:
                    communicator.poll_async_error()


def _run_job(fn: Callable[[], Any], future: concurrent.futures.Future[Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn()
    except BaseException as exc:  # handed to whoever awaits the future
        future.set_exception(exc)
    else:
        future.set_result(result)


def _run_group(tickets: list[InitTicket]) -> None:
    """Build every ticket's communicator in one NCCL group, then warm them up in another."""
    from .communicator import Communicator, abort_raw  # it imports this module

    nccl = tickets[0].nccl
    what = ", ".join(t.what for t in tickets)
    raw: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}
    try:
        nccl.groupStart()
        try:
            for i, ticket in enumerate(tickets):
                try:
                    raw[i] = ticket.build()
                except Exception as exc:
                    errors[i] = exc
        finally:
            with cuda_errors(f"{what}: NCCL set-up group"):
                nccl.groupEnd()
    except Exception as exc:  # the group failed as a whole: every set-up in it did
        for i in range(len(tickets)):
            errors.setdefault(i, exc)
    warm = [i for i, t in enumerate(tickets) if i not in errors and t.warmup is not None]
    if warm:
        try:
            nccl.groupStart()
            try:
                for i in warm:
                    warmup = tickets[i].warmup
                    assert warmup is not None
                    warmup(raw[i])
            finally:
                with cuda_errors(f"{what}: NCCL warm-up group"):
                    nccl.groupEnd()
        except Exception as exc:
            for i in warm:
                errors.setdefault(i, exc)
    thread = tickets[0]._thread
    assert thread is not None
    for i, ticket in enumerate(tickets):
        error = errors.get(i)
        if error is not None:
            if i in raw:
                abort_raw(raw[i])
            ticket.future.set_exception(error)
            continue
        communicator = Communicator(thread, ticket.nccl, raw[i], ticket.stream, ticket.what)
        event = ticket.stream.record_event() if ticket.warmup is not None else None
        ticket.future.set_result((communicator, event))


_process_thread: NcclThread | None = None
_process_lock = threading.Lock()


def nccl_thread() -> NcclThread:
    """This process's NCCL thread (created on first use)."""
    global _process_thread
    with _process_lock:
        if _process_thread is None:
            _process_thread = NcclThread()
        return _process_thread
