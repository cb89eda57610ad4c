"""A fake GPU's device, streams, events and stream operations (CPU only).

:class:`FakeDevice` runs the work queued on its streams (:class:`FakeStream`) in
stream order, lazily, whenever an event or stream is polled; :class:`FakeOps`
is a :class:`~aiokvpipe.cuda.streams.DeviceOps` over CPU tensors on it. The
NCCL and IPC fakes (:mod:`.fake_nccl`, :mod:`.fake_gpu`) queue their work on
these streams. Import them from :mod:`aiokvpipe.cuda.testing`, which
describes all the fakes.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

_ids = itertools.count(1)


def _on_loop_thread() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@dataclass
class _Op:
    label: str
    run: Callable[[], None] = lambda: None
    runnable: Callable[[], bool] = lambda: True


class FakeDevice:
    """A pretend GPU: queued work runs in stream order when progress is polled."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.streams: dict[int, FakeStream] = {}
        self.log: list[tuple[str, str, str]] = []
        self.paused = False
        self.polls = 0

    def stream(self, name: str) -> FakeStream:
        return FakeStream(self, name)

    def record(self, stream: str, action: str, what: str = "") -> None:
        with self.lock:
            self.log.append((stream, action, what))

    def actions(self, stream: str | None = None) -> list[str]:
        """Logged actions (``"wait producer-1"``...), of one stream or all."""
        with self.lock:
            return [
                f"{action} {what}".strip()
                for name, action, what in self.log
                if stream is None or name == stream
            ]

    def advance(self) -> None:
        """Run every op whose turn has come (in each stream's order)."""
        with self.lock:
            self.polls += 1
            if self.paused:
                return
            progress = True
            while progress:
                progress = False
                for stream in list(self.streams.values()):
                    while stream.ops and stream.ops[0].runnable():
                        stream.ops.popleft().run()
                        progress = True

    def drain(self, idle: Callable[[], bool], timeout: float = 10.0) -> None:
        """Blocking wait (worker threads only) until ``idle()``; what synchronize() does."""
        if _on_loop_thread():
            raise AssertionError("synchronize() called on the event loop thread")
        limit = time.monotonic() + timeout
        while True:
            self.advance()
            with self.lock:
                if idle():
                    return
            if time.monotonic() > limit:
                raise RuntimeError("fake device: work never completed")
            time.sleep(0.0005)


class FakeEvent:
    """torch.cuda.Event's polling surface."""

    def __init__(self, device: FakeDevice, name: str) -> None:
        self.device = device
        self.name = name
        self.complete = False
        self.queries = 0

    def query(self) -> bool:
        self.queries += 1
        self.device.advance()
        return self.complete

    def synchronize(self) -> None:
        self.device.drain(lambda: self.complete)

    def __repr__(self) -> str:
        return f"FakeEvent({self.name}, complete={self.complete})"


class FakeStream:
    """torch.cuda.Stream's surface; ``cuda_stream`` is the handle NCCL calls get."""

    def __init__(self, device: FakeDevice, name: str) -> None:
        self.device = device
        self.name = name
        self.ops: deque[_Op] = deque()
        self.cuda_stream = next(_ids)
        self._events = itertools.count(1)
        with device.lock:
            device.streams[self.cuda_stream] = self

    def enqueue(self, op: _Op, what: str = "") -> None:
        with self.device.lock:
            self.ops.append(op)
            self.device.record(self.name, op.label, what)

    def record_event(self, event: Any = None) -> FakeEvent:
        recorded = FakeEvent(self.device, f"{self.name}-{next(self._events)}")

        def mark() -> None:
            recorded.complete = True

        self.enqueue(_Op("record", mark), recorded.name)
        return recorded

    def wait_event(self, event: FakeEvent) -> None:
        self.enqueue(_Op("wait", runnable=lambda: event.complete), event.name)

    def wait_stream(self, other: FakeStream) -> None:
        self.wait_event(other.record_event())

    def query(self) -> bool:
        self.device.advance()
        with self.device.lock:
            return not self.ops

    def synchronize(self) -> None:
        self.device.drain(lambda: not self.ops)


class FakeOps:
    """:class:`~aiokvpipe.cuda.streams.DeviceOps` over CPU tensors and fake streams."""

    def __init__(self, device: FakeDevice | None = None, name: str = "") -> None:
        self.fake = device if device is not None else FakeDevice()
        prefix = f"{name}." if name else ""
        self._prefix = prefix
        self.current = self.fake.stream(f"{prefix}current")
        self._streams = itertools.count(1)
        self._staging: FakeStream | None = None
        self.new_streams = 0  # how many dedicated streams were asked for

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def current_stream(self) -> FakeStream:
        return self.current

    def new_stream(self) -> FakeStream:
        self.new_streams += 1
        return self.fake.stream(f"{self._prefix}side{next(self._streams)}")

    def staging_stream(self) -> FakeStream:
        if self._staging is None:
            self._staging = self.fake.stream(f"{self._prefix}staging")
        return self._staging

    def copy(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        def run() -> None:
            dst.copy_(src)

        stream.enqueue(_Op("copy", run), f"{src.numel()}x{src.dtype}")

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        self.fake.record(stream.name, "record_stream")

    def empty_pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)
