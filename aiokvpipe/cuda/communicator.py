"""One NCCL communicator, owned by one object, used only on the NCCL thread.

cupy's ``NcclCommunicator.abort`` is not atomic (it checks its handle, aborts,
then zeroes it), so two aborts at once free the communicator twice. Here the
raw communicator is touched only under :attr:`Communicator._lock`, only on the
process's :class:`~aiokvpipe.cuda.nccl_thread.NcclThread`, and aborted from
one place, :meth:`Communicator.abort_now`, which the aborted flag makes
idempotent. The loop side queues work (:meth:`queue_send`, ...) and awaits
events; it never calls NCCL.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CudaTransferError
from .events import wait_event
from .runtime import cuda_errors

if TYPE_CHECKING:
    from .nccl_thread import NcclThread


def nbytes_of(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def abort_raw(comm: Any) -> None:
    """Abort a raw communicator that no :class:`Communicator` owns (NCCL thread only)."""
    try:
        comm.abort()
    except Exception:  # cleanup of a communicator nobody waits for any more
        pass


class Communicator:
    """A communicator, the stream its operations run on, and its aborted state."""

    def __init__(self, thread: NcclThread, nccl: Any, comm: Any, stream: Any, what: str) -> None:
        self.thread = thread
        self.nccl = nccl
        self.stream = stream
        self.what = what
        self._comm = comm
        self._lock = threading.Lock()
        self._aborted = False
        self._async_error: BaseException | None = None
        thread.watch(self)

    @property
    def aborted(self) -> bool:
        return self._aborted

    # -- on the NCCL thread ---------------------------------------------------
    def _use(self, what: str, fn: Callable[[Any], None]) -> None:
        with self._lock, cuda_errors(f"{self.what}: {what}"):
            if self._aborted:
                raise CudaTransferError(f"{self.what}: {what} on an aborted communicator")
            fn(self._comm)

    def _queue(self, op: Callable[..., None], tensor: torch.Tensor, peer: int) -> None:
        # Whole tensors go as bytes: every dtype works, even ones NCCL lacks.
        stream = self.stream.cuda_stream
        op(tensor.data_ptr(), nbytes_of(tensor), self.nccl.NCCL_UINT8, peer, stream)

    def _after(self, ready: Any | None) -> None:
        if ready is not None:
            self.stream.wait_event(ready)

    def send_now(self, tensor: torch.Tensor, peer: int, ready: Any | None = None) -> Any:
        """``ncclSend`` after ``ready``; returns the event that marks its end."""
        self._after(ready)
        self._use(
            f"ncclSend of {nbytes_of(tensor)} bytes",
            lambda comm: self._queue(comm.send, tensor, peer),
        )
        return self.stream.record_event()

    def recv_now(self, tensor: torch.Tensor, peer: int, ready: Any | None = None) -> Any:
        """``ncclRecv`` into ``tensor`` after ``ready``; returns its end event."""
        self._after(ready)
        self._use(
            f"ncclRecv of {nbytes_of(tensor)} bytes",
            lambda comm: self._queue(comm.recv, tensor, peer),
        )
        return self.stream.record_event()

    def exchange_now(self, src: torch.Tensor, dst: torch.Tensor, peer: int) -> Any:
        """Send ``src`` to and receive ``dst`` from ``peer`` as one NCCL group.

        Grouping lets both run concurrently; it is also the only way a rank can
        send to itself (a one-rank communicator) without deadlocking. The event
        is recorded after ``groupEnd``, which is when the kernels are launched.
        """

        def both(comm: Any) -> None:
            self.nccl.groupStart()
            try:
                self._queue(comm.send, src, peer)
                self._queue(comm.recv, dst, peer)
            finally:
                self.nccl.groupEnd()

        self._use(f"grouped send/recv of {nbytes_of(src)} bytes", both)
        return self.stream.record_event()

    def group_now(
        self,
        sends: Sequence[torch.Tensor],
        recvs: Sequence[torch.Tensor],
        peer: int,
        ready: Sequence[Any] = (),
    ) -> Any:
        """Every send and recv with ``peer`` as one NCCL group, after ``ready``; its end event.

        The peer posts the matching operations in the same order (NCCL pairs
        the n-th send with the peer's n-th recv, sizes equal).
        """
        for event in ready:
            self._after(event)

        def grouped(comm: Any) -> None:
            self.nccl.groupStart()
            try:
                for tensor in sends:
                    self._queue(comm.send, tensor, peer)
                for tensor in recvs:
                    self._queue(comm.recv, tensor, peer)
            finally:
                self.nccl.groupEnd()

        nbytes = sum(nbytes_of(t) for t in (*sends, *recvs))
        label = f"grouped {len(sends)} sends / {len(recvs)} recvs of {nbytes} bytes"
        self._use(label, grouped)
        return self.stream.record_event()

    def poll_async_error(self) -> None:
        """Read ``ncclCommGetAsyncError`` and keep the first error (NCCL thread)."""
        with self._lock:
            if self._aborted or self._async_error is not None:
                return
            try:
                self._comm.check_async_error()
            except Exception as exc:
                self._async_error = exc

    def abort_now(self) -> None:
        """The one place a communicator is aborted: stuck kernels exit. Idempotent."""
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
            self.thread.unwatch(self)
            abort_raw(self._comm)

    # -- on the event loop ------------------------------------------------------
    def queue_send(
        self, tensor: torch.Tensor, peer: int, ready: Any | None = None
    ) -> concurrent.futures.Future[Any]:
        return self.thread.submit(lambda: self.send_now(tensor, peer, ready))

    def queue_recv(
        self, tensor: torch.Tensor, peer: int, ready: Any | None = None
    ) -> concurrent.futures.Future[Any]:
        return self.thread.submit(lambda: self.recv_now(tensor, peer, ready))

    async def exchange(
        self, src: torch.Tensor, dst: torch.Tensor, peer: int, *, timeout: float | None = None
    ) -> Any:
        """Queue a grouped send/recv with ``peer``; returns the event marking its end."""
        what = f"{self.what}: queuing a grouped send/recv"
        return await self.thread.call(
            lambda: self.exchange_now(src, dst, peer), timeout=timeout, what=what
        )

    async def group(
        self,
        sends: Sequence[torch.Tensor],
        recvs: Sequence[torch.Tensor],
        peer: int,
        ready: Sequence[Any] = (),
        *,
        timeout: float | None = None,
    ) -> Any:
        """Queue :meth:`group_now` on the NCCL thread; the event marking its end."""
        what = f"{self.what}: queuing {len(sends) + len(recvs)} grouped NCCL operations"
        return await self.thread.call(
            lambda: self.group_now(sends, recvs, peer, ready), timeout=timeout, what=what
        )

    async def queued(self, job: concurrent.futures.Future[Any], *, timeout: float | None) -> Any:
        """The event a queued send/recv returned, once the NCCL thread has run it."""
        return await self.thread.wait(job, timeout=timeout, what=f"{self.what}: queuing NCCL work")

    def check(self) -> None:
        """Raise CudaTransferError if NCCL recorded an asynchronous error (peer lost...)."""
        error = self._async_error
        if error is not None:
            raise CudaTransferError(
                f"{self.what}: NCCL reported an asynchronous error: {error}"
            ) from error

    async def wait(self, event: Any, *, timeout: float | None, what: str) -> None:
        await wait_event(event, timeout=timeout, check=self.check, what=f"{self.what}: {what}")

    async def abort(self, *, timeout: float | None) -> None:
        """Abort on the NCCL thread (see :meth:`abort_now`); bounded by ``timeout``."""
        if self._aborted:
            return
        await self.thread.call(self.abort_now, timeout=timeout, what=f"{self.what}: ncclCommAbort")
